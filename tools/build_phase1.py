#!/usr/bin/env python
"""Write a Phase 1 checkpoint (trainer-phase1 format, see README) from pretrained encoder folders.

    python tools/build_phase1.py --image models/clip-vit-base-patch16 --audio models/whisper-base \\
        --text models/bert-base-uncased --align-dim 512 [--aligner aligner.safetensors|aligner.pt] \\
        --out phase1.safetensors

Encoders are loaded with transformers from local folders (CLIP or CLIP-vision, Whisper, BERT); any
subset of the three modalities. The aligner (Linear then LayerNorm per modality) comes from `--aligner`
or is freshly initialised from --seed. `--aligner` takes safetensors or a torch file (a state dict or a
Lightning-style checkpoint, read with weights_only: never unpickling code), with keys
`<modality>.0.weight`, `<modality>.0.bias`, `<modality>.1.weight`, `<modality>.1.bias`, or the model's
own names (`aligner.image.0.weight`, `encoders.image....`, optionally under `model.`/`module.`); other
names are renamed with --map OLD=NEW. This is the code path of `trainer phase1 import`
(trainer.models.phase1_import). The result is verified before it is renamed into place.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from trainer.errors import UserError
    from trainer.models.phase1_import import import_phase1, parse_maps

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for m in ("image", "audio", "text"):
        p.add_argument(f"--{m}", type=Path, help=f"local folder of the pretrained {m} encoder")
    p.add_argument(
        "--align-dim", type=int, help="shared space size (needed without --aligner; default: read off its weights)"
    )
    p.add_argument(
        "--aligner", type=Path, help="aligner weights (safetensors or torch file); default: freshly initialised"
    )
    p.add_argument(
        "--map", action="append", default=[], metavar="OLD=NEW", help="rename a key prefix of --aligner (repeatable)"
    )
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="PREFIX",
        help="leave out keys of --aligner starting with PREFIX",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    paths = {m: getattr(args, m) for m in ("image", "audio", "text") if getattr(args, m) is not None}
    try:
        result = import_phase1(
            paths, args.out, args.aligner, args.align_dim, parse_maps(args.map), args.ignore, args.force, args.seed
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())

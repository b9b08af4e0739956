#!/usr/bin/env python
"""Write a Phase 1 checkpoint (trainer-phase1 format, see README) from pretrained encoder folders.

    python tools/build_phase1.py --image models/clip-vit-base-patch16 --audio models/whisper-base \\
        --text models/bert-base-uncased --align-dim 512 [--aligner aligner.safetensors] --out phase1.safetensors

Encoders are loaded with transformers from local folders (CLIP or CLIP-vision, Whisper, BERT); any
subset of the three modalities. The aligner comes from `--aligner` (a safetensors file with keys
`<modality>.0.weight`, `<modality>.0.bias`, `<modality>.1.weight`, `<modality>.1.bias`: Linear then
LayerNorm per modality, e.g. converted from your Phase 1 run) or is freshly initialised. The
result is verified by loading it back.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from trainer.errors import UserError
    from trainer.models.multimodal import load_phase1, phase1_from_pretrained, save_phase1

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for m in ("image", "audio", "text"):
        p.add_argument(f"--{m}", type=Path, help=f"local folder of the pretrained {m} encoder")
    p.add_argument("--align-dim", type=int, required=True)
    p.add_argument("--aligner", type=Path, help="aligner weights (safetensors); default: freshly initialised")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    paths = {m: getattr(args, m) for m in ("image", "audio", "text") if getattr(args, m) is not None}
    try:
        if not paths:
            raise UserError("name at least one of --image, --audio, --text")
        state = None
        if args.aligner is not None:
            from safetensors.torch import load_file

            state = load_file(str(args.aligner))
        model = phase1_from_pretrained(paths, args.align_dim, state, args.seed)
        save_phase1(model, args.out)
        load_phase1(args.out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {', '.join(paths)} encoders + aligner ({n:,} parameters, align_dim {args.align_dim})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

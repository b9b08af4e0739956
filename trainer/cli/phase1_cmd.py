"""`trainer phase1 import ALIGNER.pt ...`: a Phase 1 aligner trained elsewhere -> a trainer-phase1 safetensors file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

app = typer.Typer(help="Phase 1 checkpoints (the frozen encoders and aligner of task: lora).", no_args_is_help=True)


def _folder(modality: str, kind: str) -> Any:
    return typer.Option(
        f"--{modality}",
        metavar="DIR",
        help=f"Local Hugging Face folder of the {modality} encoder ({kind}).",
        show_default=False,
    )


@app.command("import")
def import_(
    aligner: Annotated[
        Path,
        typer.Argument(
            help="Aligner weights: a torch file (state dict, Lightning checkpoint) or"
            " safetensors. Encoder tensors in it replace the folders'.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Phase 1 checkpoint to write (.safetensors).", show_default=False)],
    image: Annotated[Optional[Path], _folder("image", "CLIP or CLIP-vision")] = None,
    audio: Annotated[Optional[Path], _folder("audio", "Whisper")] = None,
    text: Annotated[Optional[Path], _folder("text", "BERT")] = None,
    align_dim: Annotated[
        Optional[int],
        typer.Option(
            "--align-dim",
            metavar="D",
            help="Shared space size; default: read off the aligner's Linear weights.",
            show_default=False,
        ),
    ] = None,
    maps: Annotated[
        Optional[list[str]],
        typer.Option(
            "--map",
            metavar="OLD=NEW",
            help="Rename a key prefix, OLD=NEW (repeatable), e.g. --map image_head.proj.=aligner.image.0.",
        ),
    ] = None,
    ignore: Annotated[
        Optional[list[str]],
        typer.Option(
            "--ignore",
            metavar="PREFIX",
            help="Leave out keys starting with PREFIX (repeatable), e.g. a loss's logit_scale.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
) -> None:
    """Write a Phase 1 checkpoint from encoder folders and your aligner weights (read without unpickling code)."""
    from trainer.models.phase1_import import import_phase1, parse_maps

    paths = {m: p for m, p in (("image", image), ("audio", audio), ("text", text)) if p is not None}
    result = import_phase1(paths, out, aligner, align_dim, parse_maps(maps or []), ignore or [], force)
    typer.echo(result.summary())

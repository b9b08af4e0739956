"""`trainer generate SOURCE`: see the model answer (lora: media + instruction; pretrain: a prompt continued)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

PathOpt = Optional[Path]


def generate(
    source: Annotated[
        str,
        typer.Argument(
            help="A checkpoint folder or reference looked up under --runs (TAG, RUN/TAG, RUN,"
            " latest, best), or a `trainer export` folder.",
            show_default=False,
        ),
    ],
    prompt: Annotated[
        Optional[str],
        typer.Option(
            "--prompt",
            help="lora: the instruction (default: the run's data.default_instruction); pretrain: the text to continue.",
        ),
    ] = None,
    image: Annotated[PathOpt, typer.Option("--image", help="lora: an image file.")] = None,
    audio: Annotated[PathOpt, typer.Option("--audio", help="lora: a WAV file.")] = None,
    text: Annotated[PathOpt, typer.Option("--text", help="lora: a text file for the text encoder.")] = None,
    jsonl: Annotated[
        PathOpt,
        typer.Option(
            "--jsonl",
            help="lora: answer every line of this JSONL (the training data's"
            " format; media relative to its folder; a line needs no response).",
        ),
    ] = None,
    out: Annotated[
        PathOpt,
        typer.Option(
            "--out", help="With --jsonl: write the answers here (one JSON line each) instead of standard output."
        ),
    ] = None,
    prompt_ids: Annotated[
        Optional[str], typer.Option("--prompt-ids", help="pretrain: the prompt as token ids, e.g. '5 17 9'.")
    ] = None,
    tokenizer: Annotated[
        Optional[str],
        typer.Option("--tokenizer", help="pretrain: tokenizer.json or folder, for --prompt and the answer as text."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to write at most.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", help="0: greedy (the default); > 0: sampled.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (with --temperature > 0).")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampling.")] = 0,
    device: Annotated[
        Optional[str], typer.Option("--device", help="cpu or cuda (default: cuda when there is a GPU).")
    ] = None,
    runs: Annotated[str, typer.Option("--runs", "-r", help="Folder of runs where references are looked up.")] = "runs",
) -> None:
    """Generate with a trained model: lora answers media + an instruction (or a JSONL of them), pretrain continues a
    prompt."""
    from trainer.errors import UserError
    from trainer.tasks.generate import open_generator, open_source, sampling, samples_of

    if jsonl is not None and (image or audio or text or prompt is not None):
        raise UserError("--jsonl and --image/--audio/--text/--prompt: give one (the JSONL lines name their own)")
    if out is not None and jsonl is None:
        raise UserError("--out goes with --jsonl (a single answer is printed)")
    if out is not None and out.exists():
        raise UserError(f"--out {out}: exists (nothing was written; remove it or name another file)")
    task, src, info = open_source(source, runs)
    if task != "lora" and (jsonl or image or audio or text):
        raise UserError(f"{source}: a {task} model takes --prompt or --prompt-ids, not media or --jsonl")
    if task == "lora" and (prompt_ids or tokenizer):
        raise UserError(
            f"{source}: a lora model takes --prompt and media (its tokenizer is the LLM's), not "
            "--prompt-ids/--tokenizer"
        )
    if task != "lora" and (prompt is None) == (prompt_ids is None):
        raise UserError("give the prompt: --prompt TEXT (with --tokenizer) or --prompt-ids '5 17 9'")
    if task != "lora" and prompt is not None and tokenizer is None:
        raise UserError(
            "--prompt needs --tokenizer (a tokenizer.json or tokenizer folder; pretraining data comes"
            " tokenized), or give token ids with --prompt-ids"
        )
    kwargs = sampling(temperature, top_p, max_new_tokens, seed)  # (the checks above need no torch: they answer at once)
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if task != "lora":
        gen = open_generator(task, src, info, device, tokenizer)
        try:
            ids = gen.encode(prompt) if prompt is not None else [int(x) for x in prompt_ids.replace(",", " ").split()]  # type: ignore[union-attr]
        except ValueError:
            raise UserError(f"--prompt-ids {prompt_ids!r}: expected integers separated by spaces or commas") from None
        new = gen.continue_ids(ids, **kwargs)
        words = gen.decode(new)
        typer.echo(words if words is not None else " ".join(map(str, new)))
        return
    samples = samples_of(info, jsonl, {"image": image, "audio": audio, "text": text}, prompt)
    gen = open_generator(task, src, info, device, None)
    if gen.trained_sha256 and gen.frozen_sha256 != gen.trained_sha256:
        typer.echo(
            f"warning: the base LLM and Phase 1 weights hash to {gen.frozen_sha256[:16]}..., the adapter was trained on"
            f" {gen.trained_sha256[:16]}...: answers come from other base weights than trained",
            err=True,
        )
    tok = gen.featurizer.tok
    if jsonl is None:
        typer.echo(tok.decode(gen.answer(samples[0], **kwargs), skip_special_tokens=True))
        return
    lines = []
    for s in samples:
        ids = gen.answer(s, **kwargs)
        row = {
            "sample_id": s.sample_id,
            "line": s.line,
            "instruction": s.instruction,
            "answer": tok.decode(ids, skip_special_tokens=True),
            "tokens": len(ids),
        }
        if s.response:
            row["reference"] = s.response
        lines.append(json.dumps(row))
        if out is None:
            typer.echo(lines[-1])
    if out is not None:
        tmp = out.with_name(f".{out.name}.partial")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.rename(out)
        typer.echo(f"wrote {len(lines)} answer(s) to {out}")

"""`trainer generate`: a trained model answering, on a CPU or one GPU, without DeepSpeed.

Sources: a checkpoint (a folder, or a reference such as `best`, `RUN/TAG` looked up under the runs
folder), or an export folder (`trainer export`: a PEFT adapter with projectors, or a transformers model).
A lora model answers samples (media files and an instruction, or a JSONL file of them, read with the
same checks as training data); a pretrained model continues a prompt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from trainer.errors import UserError


def sampling(temperature: float, top_p: float, max_new_tokens: int, seed: int) -> dict[str, Any]:
    """transformers `generate` arguments: greedy at temperature 0, else sampled (seeded) with temperature and top-p."""
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
        raise UserError(
            f"--temperature {temperature:g} (>= 0), --top-p {top_p:g} (in (0, 1]), --max-new-tokens {max_new_tokens}"
            " (>= 1): one is out of range"
        )
    import torch

    torch.manual_seed(seed)
    if temperature == 0:
        return {"do_sample": False, "max_new_tokens": max_new_tokens, "temperature": None, "top_p": None, "top_k": None}
    return {
        "do_sample": True,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": None,
        "max_new_tokens": max_new_tokens,
    }


def open_source(ref: str, runs: str) -> tuple[str, Path, dict]:
    """(task, folder, info) of what `ref` names: an export folder, a checkpoint folder, or a checkpoint reference."""
    from trainer.checkpoint.catalog import resolve
    from trainer.checkpoint.store import read_metadata

    path = Path(ref)
    if path.is_dir() and not (path / "metadata.json").is_file():
        if (path / "trainer_export.json").is_file():
            return "lora", path, json.loads((path / "trainer_export.json").read_text())
        if (path / "config.json").is_file():
            return "pretrain", path, {}
        if not any(path.glob("*/checkpoints")) and not (path / "checkpoints").is_dir():
            raise UserError(
                f"{ref}: neither a checkpoint nor an export folder (no metadata.json, trainer_export.json or"
                " config.json)"
            )
    entry = resolve(ref, runs)
    if entry.local is None:
        raise UserError(
            f"{ref}: a checkpoint in the bucket; restore it first (`trainer train` with --resume auto does)"
        )
    meta = read_metadata(entry.local)
    return str(meta.get("task", "pretrain")), entry.local, meta


def open_generator(task: str, src: Path, info: dict, device: str, tokenizer: Optional[str]) -> Any:
    if task == "lora":
        from trainer.tasks.lora_files import LoraGenerator

        return LoraGenerator(src, info, device)
    from trainer.tasks.pretrain import PretrainGenerator

    if info:  # a checkpoint: its shards consolidated with the config it was trained with
        from trainer.config.load import load_config
        from trainer.tasks.pretrain import PretrainTask

        if not (src / "config.yaml").is_file():
            raise UserError(f"{src}: no config.yaml beside the metadata (a checkpoint from an older trainer?)")
        model = PretrainTask(load_config(src / "config.yaml")).hf_model(src)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(src))
    return PretrainGenerator(model, tokenizer, device)


def prompt_inputs(info: dict[str, Any]) -> tuple[tuple[str, ...], str, dict[str, str]]:
    """What a Phase 2 model's prompts are made of, from its metadata (or export record) alone: its modalities, its
    default instruction and the JSONL field names it was trained with."""
    from trainer.config.schema import DataConfig

    soft = info.get("soft_tokens") or {}
    if not soft:
        raise UserError("its metadata lacks soft_tokens (a lora checkpoint from an older trainer?)")
    return (
        tuple(m for m in ("image", "audio", "text") if m in soft),
        str(info.get("default_instruction") or DataConfig().default_instruction),
        dict(info.get("fields") or {}),
    )


def samples_of(
    info: dict[str, Any], jsonl: Optional[Path], media: dict[str, Optional[Path]], prompt: Optional[str]
) -> list[Any]:
    """The samples to answer: every line of `jsonl` (checked as training lines are; a line needs no response), or
    one sample of the media files given. Checked before any model is loaded: bad input is answered at once."""
    from trainer.data.multimodal import Sample, check_media, first_problems, scan_index

    mods, default_instruction, fields = prompt_inputs(info)
    if jsonl is not None:
        samples, problems = scan_index(
            jsonl.parent, jsonl.name, mods, default_instruction, field="--jsonl", names=fields, need_response=False
        )
        if problems:
            raise UserError(
                f"{len(problems)} bad line(s) in {jsonl}: {first_problems(problems)} (nothing was generated)"
            )
        if not samples:
            raise UserError(f"--jsonl {jsonl}: no samples")
        return samples
    given: dict[str, Path] = {}
    for kind, path in media.items():
        if path is None:
            continue
        if kind not in mods:
            raise UserError(
                f"--{kind}: this model has no {kind} encoder (it takes {', '.join('--' + m for m in mods)})"
            )
        bad = check_media(kind, path)
        if bad:
            raise UserError(f"--{kind} {path}: unreadable ({bad})")
        given[kind] = path
    return [Sample(0, "prompt", prompt or default_instruction, "", given)]

"""Phase 2 multimodal model: frozen encoders and Phase 1 aligner, trainable projectors, a LoRA LLM.

Phase 1 checkpoint format (one `.safetensors` file, no pickle):
- tensors: the state dict of `Phase1Model`: `encoders.<modality>.*` (CLIP vision / Whisper encoder
  / BERT) and `aligner.<modality>.*` (Linear + LayerNorm into the shared `align_dim` space);
- header metadata: `format` = "trainer-phase1", `format_version` = "1", and `architecture`: JSON
  `{"align_dim": D, "modalities": {"image": {"type": "clip_vision", "config": {...}}, ...}}`
  holding the transformers config of every encoder, enough to rebuild the module without files.

`load_phase1` verifies all of it and raises `UserError` naming the first problem. A torch file is never
unpickled here: `trainer phase1 import` (trainer.models.phase1_import) converts one once.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterable, Optional

from trainer.errors import UserError

PHASE1_FORMAT = "trainer-phase1"
PHASE1_VERSION = 1
MODALITIES = ("image", "audio", "text")
ENCODER_TYPES = {"image": "clip_vision", "audio": "whisper_encoder", "text": "bert"}


def _encoder(kind: str, config: dict) -> Any:
    """The encoder module of one modality, built from its transformers config (random weights)."""
    if kind == "clip_vision":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        return CLIPVisionModel(CLIPVisionConfig(**config))
    if kind == "whisper_encoder":
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return WhisperEncoder(WhisperConfig(**config))
    if kind == "bert":
        from transformers import BertConfig, BertModel

        return BertModel(BertConfig(**config), add_pooling_layer=False)
    raise UserError(f"unknown encoder type {kind!r} (expected one of {sorted(set(ENCODER_TYPES.values()))})")


def encoder_width(kind: str, config: dict) -> int:
    return int(config["d_model"] if kind == "whisper_encoder" else config["hidden_size"])


def tiny_architecture(text_vocab_size: int) -> dict:
    """A Phase 1 architecture small enough for tests on a CPU (the encoders are the real classes)."""
    small = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "hidden_size": 32}
    return {
        "align_dim": 32,
        "modalities": {
            "image": {"type": "clip_vision", "config": {**small, "image_size": 32, "patch_size": 8}},
            "audio": {
                "type": "whisper_encoder",
                "config": {
                    "d_model": 32,
                    "encoder_layers": 2,
                    "encoder_attention_heads": 2,
                    "encoder_ffn_dim": 64,
                    "num_mel_bins": 80,
                    "max_source_positions": 50,
                    "decoder_layers": 1,
                    "decoder_attention_heads": 2,
                    "decoder_ffn_dim": 64,
                    "vocab_size": 64,
                    "pad_token_id": 0,
                    "bos_token_id": 1,
                    "eos_token_id": 2,
                    "decoder_start_token_id": 1,
                },
            },
            "text": {
                "type": "bert",
                "config": {**small, "vocab_size": text_vocab_size, "max_position_embeddings": 128},
            },
        },
    }


def full_architecture(text_vocab_size: int = 30522) -> dict:
    """Real encoder sizes: CLIP ViT-B/16, Whisper-base encoder, BERT-base; shared space of 512."""
    return {
        "align_dim": 512,
        "modalities": {
            "image": {
                "type": "clip_vision",
                "config": {
                    "hidden_size": 768,
                    "intermediate_size": 3072,
                    "num_hidden_layers": 12,
                    "num_attention_heads": 12,
                    "image_size": 224,
                    "patch_size": 16,
                },
            },
            "audio": {
                "type": "whisper_encoder",
                "config": {
                    "d_model": 512,
                    "encoder_layers": 6,
                    "encoder_attention_heads": 8,
                    "encoder_ffn_dim": 2048,
                    "num_mel_bins": 80,
                    "max_source_positions": 1500,
                },
            },
            "text": {
                "type": "bert",
                "config": {
                    "vocab_size": text_vocab_size,
                    "hidden_size": 768,
                    "num_hidden_layers": 12,
                    "num_attention_heads": 12,
                    "intermediate_size": 3072,
                },
            },
        },
    }


def _modules() -> tuple[Any, Any]:
    import torch
    from torch import nn

    class Phase1Model(nn.Module):
        """Encoders and aligner of Phase 1: raw inputs -> one `align_dim` vector per modality."""

        def __init__(self, architecture: dict):
            super().__init__()
            self.architecture = architecture
            d = int(architecture["align_dim"])
            mods = architecture["modalities"]
            self.encoders = nn.ModuleDict({m: _encoder(spec["type"], spec["config"]) for m, spec in mods.items()})
            self.aligner = nn.ModuleDict(
                {
                    m: nn.Sequential(nn.Linear(encoder_width(spec["type"], spec["config"]), d), nn.LayerNorm(d))
                    for m, spec in mods.items()
                }
            )

        def encode(self, modality: str, inputs: dict) -> Any:
            enc = self.encoders[modality]
            if modality == "image":
                feat = enc(pixel_values=inputs["pixel_values"]).pooler_output
            elif modality == "audio":
                feat = enc(inputs["input_features"]).last_hidden_state.mean(dim=1)
            else:
                mask = inputs["text_attention_mask"]
                h = enc(input_ids=inputs["text_input_ids"], attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).to(h.dtype)
                feat = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
            return self.aligner[modality](feat)

    class Projector(nn.Module):
        """Aligned feature -> K soft tokens of the LLM's hidden size; a sample without the modality gets
        K learned placeholder vectors instead (exact zero vectors there made the LLM's gradients NaN
        at the Qwen2.5-0.5B shape)."""

        def __init__(self, align_dim: int, hidden: int, llm_hidden: int, tokens: int):
            super().__init__()
            self.tokens, self.llm_hidden = tokens, llm_hidden
            self.net = nn.Sequential(nn.Linear(align_dim, hidden), nn.GELU(), nn.Linear(hidden, tokens * llm_hidden))
            self.absent = nn.Parameter(torch.randn(tokens, llm_hidden) * 0.02)

        def forward(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
            out = self.net(x.to(self.net[0].weight.dtype)).view(x.shape[0], self.tokens, self.llm_hidden)
            return torch.where(present.view(-1, 1, 1), out, self.absent.unsqueeze(0).to(out.dtype))

    return Phase1Model, Projector


def build_phase1(architecture: dict) -> Any:
    return _modules()[0](architecture)


def load_pretrained_encoders(paths: dict[str, Path]) -> dict[str, Any]:
    """The encoder of each modality, loaded with transformers from a local Hugging Face folder (CLIP or
    CLIP-vision, Whisper, BERT); a folder that does not load is one line naming the modality and folder."""
    loaders = {
        "image": lambda p: __import__("transformers").CLIPVisionModel.from_pretrained(str(p), local_files_only=True),
        "audio": lambda p: (
            __import__("transformers").WhisperModel.from_pretrained(str(p), local_files_only=True).get_encoder()
        ),
        "text": lambda p: __import__("transformers").BertModel.from_pretrained(
            str(p), local_files_only=True, add_pooling_layer=False
        ),
    }
    unknown = sorted(set(paths) - set(loaders))
    if unknown:
        raise UserError(f"no pretrained loader for modality {unknown[0]!r} (expected {list(loaders)})")
    if not paths:
        raise UserError("no encoder folder given: name at least one of --image, --audio, --text")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bars would break the one-line errors
    encoders = {}
    try:
        for m, p in paths.items():
            if not Path(p).is_dir():  # never a Hub id: that would go to the network
                raise UserError(f"{m} encoder {p}: no such folder (expected a local Hugging Face model folder)")
            try:
                encoders[m] = loaders[m](p)
            except (OSError, ValueError) as exc:
                raise UserError(f"{m} encoder {p}: cannot load ({str(exc).splitlines()[0][:160]})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return encoders


def phase1_architecture(encoders: dict[str, Any], align_dim: int) -> dict:
    """The architecture header of a Phase 1 model over these encoders (their transformers configs)."""
    return {
        "align_dim": int(align_dim),
        "modalities": {
            m: {"type": ENCODER_TYPES[m], "config": enc.config.to_diff_dict()} for m, enc in encoders.items()
        },
    }


def phase1_shapes(architecture: dict) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor of the Phase 1 model of `architecture` (built on the meta device: no memory)."""
    import torch

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_phase1(architecture).state_dict().items()}


def phase1_from_encoders(encoders: dict[str, Any], align_dim: int, state: Optional[dict] = None, seed: int = 0) -> Any:
    """A Phase 1 model with these encoders' weights, then `state` (full tensor names, any subset) on top;
    what neither gives (the aligner when `state` has none) is initialised from `seed`."""
    import torch

    torch.manual_seed(seed)
    model = build_phase1(phase1_architecture(encoders, align_dim))
    for m, enc in encoders.items():
        model.encoders[m].load_state_dict(enc.state_dict(), strict=True)
    if state:
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise UserError(f"{len(unexpected)} tensor(s) not in the Phase 1 model, first {unexpected[0]!r}")
    return model


def save_phase1(model: Any, path: Path) -> None:
    """Write a Phase 1 checkpoint (the format in this module's docstring)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(
        state,
        str(path),
        metadata={
            "format": PHASE1_FORMAT,
            "format_version": str(PHASE1_VERSION),
            "architecture": json.dumps(model.architecture),
        },
    )


TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
# The first bytes of torch.save's legacy (pre-zip) format: pickle protocol 2 of torch's magic number.
_TORCH_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]


def is_safetensors_file(path: Path) -> bool:
    """Whether the file starts like safetensors: an 8-byte little-endian header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and 0 < int.from_bytes(head[:8], "little") < Path(path).stat().st_size


def written_by_torch_save(path: Path) -> bool:
    """Whether the file has the layout `torch.save` writes: a zip holding `data.pkl`, or the legacy pickle format."""
    with open(path, "rb") as f:
        head = f.read(len(_TORCH_LEGACY_MAGIC))
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                return any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
        except zipfile.BadZipFile:
            return False
    return head == _TORCH_LEGACY_MAGIC


def is_torch_file(path: Path) -> bool:
    """Whether the file is meant for torch.load: written by torch.save, or named so (.pt, .pth, .ckpt, .bin) and not
    safetensors."""
    path = Path(path)
    return written_by_torch_save(path) or (path.suffix.lower() in TORCH_SUFFIXES and not is_safetensors_file(path))


def torch_file_hint(path: Path, what: str = "lora.phase1_checkpoint") -> str:
    """One line for a torch file given where a Phase 1 safetensors file is expected: the command that converts it."""
    path = Path(path)
    out = (
        path.with_name(f"{path.stem}.phase1.safetensors")
        if path.suffix == ".safetensors"
        else path.with_suffix(".safetensors")
    )
    return (
        f"{what} {path} is a torch file; convert it once: trainer phase1 import {path} --image DIR --audio DIR"
        f" --text DIR --out {out} (then point lora.phase1_checkpoint at {out})"
    )


def resolve_phase1_checkpoint(spec: str) -> Path:
    """The file `lora.phase1_checkpoint` names: a path as given, or for a glob (`*`, `?`, `[`) the newest match by
    mtime (equal mtimes: the last in name order). A missing file, a glob without match, or a torch file (which
    the trainer never unpickles) is a one-line UserError; a torch file's says which command converts it."""
    if any(c in spec for c in "*?["):
        matches = [Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p)]
        if not matches:
            raise UserError(f"lora.phase1_checkpoint: no file matches {spec}")
        path = max(matches, key=lambda p: (p.stat().st_mtime, str(p)))
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"lora.phase1_checkpoint {path}: no such file")
    if is_torch_file(path):
        raise UserError(torch_file_hint(path))
    return path


def read_phase1_header(path: Path) -> dict:
    """The architecture of a Phase 1 checkpoint, checked for format and version (no tensors read)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"Phase 1 checkpoint {path}: no such file")
    if is_torch_file(path):
        raise UserError(torch_file_hint(path, "Phase 1 checkpoint"))
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise UserError(
            f"Phase 1 checkpoint {path}: not a safetensors file ({str(exc).splitlines()[0][:120]})"
        ) from None
    if meta.get("format") != PHASE1_FORMAT:
        raise UserError(
            f"Phase 1 checkpoint {path}: header format is {meta.get('format')!r}, expected {PHASE1_FORMAT!r}"
            " (write it with trainer.models.multimodal.save_phase1)"
        )
    if meta.get("format_version") != str(PHASE1_VERSION):
        raise UserError(
            f"Phase 1 checkpoint {path}: format_version {meta.get('format_version')!r}, this trainer reads"
            f" version {PHASE1_VERSION}"
        )
    try:
        arch = json.loads(meta["architecture"])
        mods = arch["modalities"]
        int(arch["align_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"Phase 1 checkpoint {path}: architecture header is unreadable ({exc})") from None
    unknown = sorted(set(mods) - set(MODALITIES))
    if unknown or not mods:
        raise UserError(
            f"Phase 1 checkpoint {path}: modalities {sorted(mods)}, expected a non-empty subset of {list(MODALITIES)}"
        )
    for m, spec in mods.items():
        if spec.get("type") != ENCODER_TYPES[m]:
            raise UserError(
                f"Phase 1 checkpoint {path}: {m} encoder type {spec.get('type')!r}, expected {ENCODER_TYPES[m]!r}"
            )
    return arch


def verify_phase1(path: Path) -> dict:
    """Check a Phase 1 checkpoint without loading its tensors: format, version, and every tensor name and
    shape against the architecture in its header (the modules are built on the meta device). Returns the
    architecture."""
    from safetensors import safe_open

    arch = read_phase1_header(path)
    expected = phase1_shapes(arch)
    with safe_open(str(path), framework="pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing:
        raise UserError(f"Phase 1 checkpoint {path}: {len(missing)} missing tensor(s), first {missing[0]!r}")
    if unexpected:
        raise UserError(f"Phase 1 checkpoint {path}: {len(unexpected)} unexpected tensor(s), first {unexpected[0]!r}")
    for k, shape in expected.items():
        if got[k] != shape:
            raise UserError(
                f"Phase 1 checkpoint {path}: tensor {k!r} has shape {list(got[k])}, the architecture in its"
                f" header needs {list(shape)}"
            )
    return arch


def load_phase1(path: Path) -> Any:
    """Rebuild the Phase 1 model from its checkpoint (verified first) and load the weights strictly."""
    from safetensors.torch import load_file

    model = build_phase1(verify_phase1(path))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model


def make_projectors(architecture: dict, hidden: int, llm_hidden: int, tokens: dict[str, int]) -> Any:
    from torch import nn

    Projector = _modules()[1]
    d = int(architecture["align_dim"])
    return nn.ModuleDict({m: Projector(d, hidden, llm_hidden, k) for m, k in tokens.items()})


def component_of(name: str) -> str:
    """The row of the parameter table a parameter belongs to."""
    parts = name.split(".")
    if parts[0] == "phase1" and len(parts) > 2:
        return f"{'encoder' if parts[1] == 'encoders' else 'aligner'} {parts[2]}"
    if parts[0] == "projectors":
        return f"projector {parts[1]}"
    if parts[0] == "llm":
        return "llm lora" if "lora_" in name else "llm base"
    return parts[0]


def parameter_table(named: Iterable[tuple[str, Any]]) -> list[str]:
    """Lines of a table: per component, parameters, trainable and frozen with percentages of the total."""
    rows: dict[str, list[int]] = {}
    for name, p in named:
        n = int(getattr(p, "ds_numel", p.numel()))
        r = rows.setdefault(component_of(name), [0, 0])
        r[0 if p.requires_grad else 1] += n
    total = sum(a + b for a, b in rows.values()) or 1
    trainable = sum(a for a, _ in rows.values())
    out = [f"{'component':<18} {'parameters':>14} {'trainable':>14} {'frozen':>14} {'share':>7}"]
    for comp, (a, b) in rows.items():
        out.append(f"{comp:<18} {a + b:>14,} {a:>14,} {b:>14,} {(a + b) / total:>7.2%}")
    out.append(f"{'total':<18} {total:>14,} {trainable:>14,} {total - trainable:>14,} {1:>7.2%}")
    out.append(
        f"trainable {trainable:,} ({trainable / total:.2%}), frozen {total - trainable:,} "
        f"({(total - trainable) / total:.2%})"
    )
    return out


def _llm_modules() -> Any:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class MultimodalLM(nn.Module):
        """Soft tokens of every modality, prepended to the prompt's embeddings, into a LoRA LLM.

        A sample without a modality gets its projector's K learned placeholder vectors (same
        shapes for the whole batch). The loss is the mean cross-entropy over response tokens only.
        """

        def __init__(self, phase1: Any, projectors: Any, llm: Any):
            super().__init__()
            self.phase1, self.projectors, self.llm = phase1, projectors, llm

        def soft_tokens(self, batch: dict) -> torch.Tensor:
            out = []
            for m, proj in self.projectors.items():
                with torch.no_grad():
                    feat = self.phase1.encode(m, batch)
                out.append(proj(feat, batch[f"has_{m}"]))
            return torch.cat(out, dim=1)

        def forward(self, reduction: str = "mean", **batch: Any) -> Any:
            """Cross-entropy of the response tokens: their mean (`reduction="mean"`, the training loss) or sum."""
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            embeds = self.llm.get_input_embeddings()(ids)
            soft = self.soft_tokens(batch).to(embeds.dtype)
            inputs = torch.cat([soft, embeds], dim=1)
            full_mask = torch.cat([torch.ones(soft.shape[:2], dtype=mask.dtype, device=mask.device), mask], dim=1)
            logits = self.llm(inputs_embeds=inputs, attention_mask=full_mask, use_cache=False).logits
            logits = logits[:, soft.shape[1] :, :]  # text positions only
            return F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction=reduction
            )

        @torch.no_grad()
        def generate(self, media: dict, prompt_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            """The token ids the LLM writes after the soft tokens of `media` and `prompt_ids` (one row per sample,
            prompts of equal length), as in training; `kwargs` go to transformers' `generate`. New tokens only."""
            embeds = self.llm.get_input_embeddings()(prompt_ids)
            inputs = torch.cat([self.soft_tokens(media).to(embeds.dtype), embeds], dim=1)
            mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)
            return self.llm.generate(inputs_embeds=inputs, attention_mask=mask, use_cache=True, **kwargs)

    return MultimodalLM


def build_multimodal(phase1: Any, projectors: Any, llm: Any) -> Any:
    return _llm_modules()(phase1, projectors, llm)


def adapter_expected_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Configured shape of every LoRA tensor (from the module definitions, valid under ZeRO-3 too)."""
    shapes = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            shapes[name] = tuple(getattr(p, "ds_shape", p.shape))
    return shapes


def check_adapter_tensors(state: dict, expected: dict[str, tuple[int, ...]], where: str) -> None:
    """The guard against silently empty adapters: every LoRA tensor present, non-empty, of its configured shape."""
    if not expected:
        raise RuntimeError(f"{where}: the model has no LoRA parameters")
    got = {k: v for k, v in state.items() if "lora_" in k}
    if len(got) != len(expected):
        raise RuntimeError(f"{where}: {len(got)} LoRA tensors written, the model has {len(expected)}")
    for k, v in got.items():
        if v.numel() == 0:
            raise RuntimeError(
                f"{where}: LoRA tensor {k} is empty {tuple(v.shape)} (ZeRO-3 parameters saved without gathering)"
            )
    for shape in expected.values():
        if 0 in shape:
            raise RuntimeError(f"{where}: a configured LoRA shape is empty {shape}")
    want = sorted(expected.values())
    have = sorted(tuple(v.shape) for v in got.values())
    if want != have:
        raise RuntimeError(f"{where}: LoRA tensor shapes {have[:3]}... differ from the configured {want[:3]}...")

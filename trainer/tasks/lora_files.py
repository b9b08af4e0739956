"""The files of a Phase 2 model outside DeepSpeed's: the PEFT adapter folder and the projectors each checkpoint
carries, the export made from them (`trainer export`: adapter, projectors, trainer_export.json, a README), and
loading either back for `trainer generate` (`LoraGenerator`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.data.multimodal import Featurizer, Sample
from trainer.errors import UserError
from trainer.models.multimodal import build_multimodal, load_phase1, make_projectors, resolve_phase1_checkpoint
from trainer.tasks.generate import prompt_inputs
from trainer.tensors import tensors_sha256

ADAPTER_DIR = "adapter"
EXPORT_INFO = "trainer_export.json"
# what `trainer generate` reads besides the weights
GENERATION_KEYS = ("text_tokenizer", "max_length", "default_instruction", "fields")
PROJECTORS_FILE = "projectors.safetensors"


def export_lora(ckpt: Path, out: Path, metadata: dict[str, Any]) -> list[str]:
    """PEFT adapter folder + projector weights + a README; the adapter is checked again before it is copied."""
    import shutil

    from safetensors.torch import load_file

    src = ckpt / ADAPTER_DIR
    if not (src / "adapter_model.safetensors").is_file() or not (ckpt / PROJECTORS_FILE).is_file():
        raise UserError(
            f"{ckpt}: no {ADAPTER_DIR}/adapter_model.safetensors or {PROJECTORS_FILE} (not a lora checkpoint?)"
        )
    adapter_cfg = json.loads((src / "adapter_config.json").read_text())
    check_adapter_file(load_file(str(src / "adapter_model.safetensors")), int(adapter_cfg["r"]), str(src))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(src / name, out / name)
    shutil.copy2(ckpt / PROJECTORS_FILE, out / PROJECTORS_FILE)
    info = {
        k: metadata.get(k)
        for k in (
            "run_id",
            "step",
            "loss",
            "frozen_sha256",
            "llm_path",
            "phase1_checkpoint",
            "lora",
            "soft_tokens",
            "projector_hidden",
            *GENERATION_KEYS,
        )
    }
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.md").write_text(
        EXPORT_README.format(
            step=metadata.get("step"),
            run=metadata.get("run_id"),
            llm=metadata.get("llm_path"),
            phase1=metadata.get("phase1_checkpoint"),
        )
    )
    return ["adapter_config.json", "adapter_model.safetensors", PROJECTORS_FILE, EXPORT_INFO, "README.md"]


def check_adapter_file(state: dict, r: int, where: str) -> None:
    """An exported adapter: LoRA tensors present, none empty, rank `r` where the rank goes (A: r x in, B: out x r)."""
    lora = {k: v for k, v in state.items() if "lora_" in k}
    if not lora:
        raise UserError(f"{where}: no LoRA tensors in the adapter")
    for k, v in lora.items():
        if v.numel() == 0 or (".lora_A." in k and v.shape[0] != r) or (".lora_B." in k and v.shape[-1] != r):
            raise UserError(
                f"{where}: LoRA tensor {k} has shape {tuple(v.shape)}, expected rank {r} and no empty dimension"
            )


EXPORT_README = """# LoRA adapter and projectors (step {step} of run {run})

- `adapter_config.json`, `adapter_model.safetensors`: a PEFT LoRA adapter for the LLM in `{llm}`.
- `projectors.safetensors`: the trained projectors (aligned feature -> soft tokens), one MLP per modality.
- `trainer_export.json`: step, loss, LoRA settings, soft tokens per modality, and the sha256 of the
  frozen weights it was trained with (Phase 1 checkpoint `{phase1}` and the base LLM).

Load the LLM with its adapter:

```python
from transformers import AutoModelForCausalLM
from peft import PeftModel

base = AutoModelForCausalLM.from_pretrained("{llm}")
model = PeftModel.from_pretrained(base, "THIS_FOLDER")
model = model.merge_and_unload()  # optional: plain weights, no PEFT at inference
```

Rebuild the multimodal front end (frozen encoders + aligner from Phase 1, trained projectors):

```python
from safetensors.torch import load_file
from trainer.models.multimodal import build_multimodal, load_phase1, make_projectors
import json

info = json.load(open("THIS_FOLDER/trainer_export.json"))
phase1 = load_phase1("{phase1}")
projectors = make_projectors(
    phase1.architecture, info["projector_hidden"], model.config.hidden_size, info["soft_tokens"]
)
projectors.load_state_dict(load_file("THIS_FOLDER/projectors.safetensors"))
mm = build_multimodal(phase1, projectors, model)  # mm(**batch) -> loss; mm.soft_tokens(batch) -> soft tokens
```
"""


class LoraGenerator:
    """A trained Phase 2 model for `trainer generate`: the base LLM with the LoRA adapter, the Phase 1 encoders and
    aligner, the trained projectors; from a checkpoint (its `adapter/` and projectors, `info` its metadata) or an
    export folder (`info` its trainer_export.json). Prompts are built as in training."""

    def __init__(self, src: Path, info: dict[str, Any], device: str = "cpu"):
        import torch
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        adapter = src / ADAPTER_DIR if (src / ADAPTER_DIR).is_dir() else src
        for need in (adapter / "adapter_config.json", adapter / "adapter_model.safetensors", src / PROJECTORS_FILE):
            if not need.is_file():
                raise UserError(
                    f"{src}: no {need.relative_to(src)} (a lora checkpoint or `trainer export` folder has it)"
                )
        missing = [k for k in ("llm_path", "phase1_checkpoint", "soft_tokens", "projector_hidden") if not info.get(k)]
        if missing:
            raise UserError(f"{src}: its metadata lacks {', '.join(missing)} (a checkpoint from an older trainer?)")
        self.device = device
        phase1 = load_phase1(resolve_phase1_checkpoint(str(info["phase1_checkpoint"])))
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        llm = AutoModelForCausalLM.from_pretrained(str(info["llm_path"]), dtype=torch.float32)
        llm = PeftModel.from_pretrained(llm, str(adapter))
        soft = {m: int(k) for m, k in info["soft_tokens"].items()}
        projectors = make_projectors(
            phase1.architecture, int(info["projector_hidden"]), int(llm.config.hidden_size), soft
        )
        projectors.load_state_dict(load_file(str(src / PROJECTORS_FILE)), strict=True)
        self.model = build_multimodal(phase1, projectors, llm).to(device).eval()
        self.frozen_sha256 = tensors_sha256(
            (n, p) for n, p in self.model.named_parameters() if "lora_" not in n and not n.startswith("projectors.")
        )
        self.trained_sha256 = info.get("frozen_sha256")
        tok = AutoTokenizer.from_pretrained(str(info["llm_path"]))
        text_tok = AutoTokenizer.from_pretrained(str(info["text_tokenizer"])) if info.get("text_tokenizer") else tok
        modalities, _, _ = prompt_inputs(info)
        self.featurizer = Featurizer(phase1.architecture, modalities, tok, text_tok, int(info.get("max_length") or 512))

    def answer(self, sample: Sample, **generate: Any) -> list[int]:
        """The token ids the model writes for `sample` (its media and instruction; its response is not read)."""
        import torch

        f = self.featurizer
        media = {k: v.unsqueeze(0).to(self.device) for k, v in f.media(sample).items()}
        prompt = torch.tensor([f.prompt_ids(sample.instruction)], device=self.device)
        out = self.model.generate(media, prompt, eos_token_id=f.tok.eos_token_id, pad_token_id=f.pad_id, **generate)
        return out[0].tolist()

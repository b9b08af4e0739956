"""Phase 2: frozen encoders + frozen Phase 1 aligner -> trainable projectors -> a PEFT LoRA LLM.

Checkpoints hold only the trainable state (projectors, LoRA adapters, their optimizer state);
each one also carries `adapter/` (a PEFT adapter directory, gathered under ZeRO-3 and checked
non-empty) and `projectors.safetensors`, so an export is a copy. The frozen weights' sha256 is
recorded at start and a resume from a checkpoint made with other frozen weights is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from trainer.config.plan import DataSizes
from trainer.config.schema import RunConfig
from trainer.data.multimodal import Featurizer, Sample, check_vocab, collate, first_problems, response_room, scan_index
from trainer.data.prefetch import Prefetcher, default_workers
from trainer.data.sampler import ResumableSampler
from trainer.errors import UserError
from trainer.log import get_logger
from trainer.models.multimodal import (
    adapter_expected_shapes,
    build_multimodal,
    check_adapter_tensors,
    load_phase1,
    make_projectors,
    parameter_table,
    read_phase1_header,
    resolve_phase1_checkpoint,
    verify_phase1,
)
from trainer.tensors import tensors_sha256
from trainer.ranks import RankInfo
from trainer.tasks.base import TaskHooks
from trainer.tasks.lora_files import ADAPTER_DIR, PROJECTORS_FILE, export_lora

log = get_logger("lora")


class LoraTask(TaskHooks):
    name = "lora"
    partition_at_init = False  # the pretrained LLM and Phase 1 weights load whole; ZeRO-3 partitions them at initialize
    save_frozen = False

    def __init__(self, cfg: RunConfig):
        assert cfg.lora is not None
        self.cfg, self.lc = cfg, cfg.lora
        self.llm_path = Path(self.lc.llm_path)
        self.samples: list[Sample] = []
        self.val_samples: list[Sample] = []
        self.left_out = 0  # `"split": "test"` lines
        self.skipped: list[str] = []
        self.featurizer: Optional[Featurizer] = None
        self.sampler: Optional[ResumableSampler] = None
        self.prefetch: Optional[Prefetcher] = None
        self.workers = 0
        self.frozen_sha256: Optional[str] = None
        self._arch: Optional[dict] = None
        self._phase1: Optional[Path] = None
        self._llm_config: Optional[dict] = None

    # ------------------------------------------------------------------------------ inputs
    @property
    def phase1_path(self) -> Path:
        """lora.phase1_checkpoint, a glob resolved to its newest match (named in the log; checkpoints record the
        file)."""
        if self._phase1 is None:
            self._phase1 = resolve_phase1_checkpoint(self.lc.phase1_checkpoint)
            if str(self._phase1) != self.lc.phase1_checkpoint:
                log.info(
                    "lora.phase1_checkpoint %s: using the newest match, %s", self.lc.phase1_checkpoint, self._phase1
                )
        return self._phase1

    @property
    def architecture(self) -> dict:
        if self._arch is None:
            self._arch = read_phase1_header(self.phase1_path)
        return self._arch

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(
            m for m in ("image", "audio", "text") if m in self.lc.soft_tokens and m in self.architecture["modalities"]
        )

    def llm_config(self) -> dict:
        if self._llm_config is None:
            f = self.llm_path / "config.json"
            if not f.is_file():
                raise UserError(f"lora.llm_path {self.llm_path}: no config.json (expected a Hugging Face model folder)")
            try:
                self._llm_config = json.loads(f.read_text())
            except json.JSONDecodeError as exc:
                raise UserError(f"{f}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        return self._llm_config

    def _tokenizers(self) -> tuple[Any, Any]:
        from transformers import AutoTokenizer

        def load(path: Path, what: str) -> Any:
            try:
                return AutoTokenizer.from_pretrained(str(path))
            except Exception as exc:
                raise UserError(f"{what} {path}: cannot load a tokenizer ({str(exc).splitlines()[0][:160]})") from None

        tok = load(self.llm_path, "lora.llm_path")
        text = load(Path(self.lc.text_tokenizer), "lora.text_tokenizer") if self.lc.text_tokenizer else tok
        return tok, text

    def _featurizer(self) -> Featurizer:
        if self.featurizer is None:
            tok, text = self._tokenizers()
            self.featurizer = Featurizer(self.architecture, self.modalities, tok, text, self.lc.max_length)
        return self.featurizer

    @property
    def index(self) -> Path:
        return Path(self.cfg.data.path) / self.cfg.data.train_file

    def val_index(self) -> Optional[Path]:
        """The validation JSONL: data.val_file (must exist), else val.jsonl beside the train file if it is there."""
        d = self.cfg.data
        if d.val_file is not None:
            return Path(d.path) / d.val_file
        default = Path(d.path) / "val.jsonl"
        return default if default.is_file() and default != self.index else None

    def _scan(self) -> tuple[list[Sample], list[Sample], list[str]]:
        """(training samples, validation samples, problems): the train file's `split` lines sorted, the val file's
        lines all validation; lines whose prompt leaves no room for the response are problems."""
        d = self.cfg.data
        found, problems = scan_index(Path(d.path), d.train_file, self.modalities, d.default_instruction, names=d.fields)
        val_index = self.val_index()
        if val_index is not None:
            extra, more = scan_index(
                Path(d.path),
                d.val_file or "val.jsonl",
                self.modalities,
                d.default_instruction,
                field="data.val_file",
                names=d.fields,
            )
            found_val = [s for s in extra if s.split != "test"]
            problems += more
        else:
            found_val = []
        too_long = response_room(self._featurizer(), found, self.index)
        val_long = response_room(self._featurizer(), found_val, val_index) if val_index is not None else {}
        self.left_out = sum(1 for s in found if s.split == "test")
        train = [s for s in found if s.split == "train" and s.line not in too_long]
        val = [s for s in found if s.split == "val" and s.line not in too_long] + [
            s for s in found_val if s.line not in val_long
        ]
        return train, val, problems + list(too_long.values()) + list(val_long.values())

    def _files(self) -> str:
        v = self.val_index()
        return f"{self.index}" + (f" and {v}" if v is not None else "")

    def prepare_data(self) -> None:
        return None

    def preflight(self) -> None:
        """Everything a launch needs, checked on one process: LLM folder, Phase 1 checkpoint, tokenizers, every JSONL
        line."""
        cfg = self.llm_config()
        arch = verify_phase1(self.phase1_path)
        absent = [m for m in self.lc.soft_tokens if m not in arch["modalities"]]
        if absent:
            log.warning(
                "lora.soft_tokens names %s, which the Phase 1 checkpoint has no encoder for: not used",
                ", ".join(absent),
            )
        if not self.modalities:
            raise UserError(
                f"lora.soft_tokens {sorted(self.lc.soft_tokens)}: none of these modalities is in the Phase 1"
                f" checkpoint ({sorted(arch['modalities'])})"
            )
        tok, text = self._tokenizers()
        for problem in (
            check_vocab(tok, int(cfg.get("vocab_size", 0)), f"lora.llm_path {self.llm_path}"),
            check_vocab(text, int(arch["modalities"]["text"]["config"]["vocab_size"]), "Phase 1 text encoder")
            if "text" in self.modalities
            else None,
        ):
            if problem:
                raise UserError(problem)
        samples, val, problems = self._scan()
        if problems and self.cfg.data.on_bad_sample == "error":
            raise UserError(
                f"{len(problems)} bad line(s) in {self._files()}: {first_problems(problems)}"
                " (fix them, or set data.on_bad_sample: skip)"
            )
        if problems:
            log.warning(
                "%d bad line(s) in %s will be skipped: %s", len(problems), self._files(), first_problems(problems, 3)
            )
        if not samples:
            raise UserError(f"{self.index}: no usable training samples")
        return DataSizes(len(samples), len(val), str(self.val_index() or f'{self.index} ("split": "val" lines)'))

    def model_hints(self) -> dict[str, int]:
        return (
            {"hidden_size": int(self.llm_config().get("hidden_size", 0))}
            if self.llm_path.joinpath("config.json").is_file()
            else {}
        )

    def import_model_classes(self) -> None:
        from transformers import AutoModelForCausalLM  # noqa: F401

    # ------------------------------------------------------------------------------- model
    def build_model(self) -> Any:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per rank of "Loading weights" adds nothing to the log
        phase1 = load_phase1(self.phase1_path)
        llm = AutoModelForCausalLM.from_pretrained(
            str(self.llm_path), dtype=torch.float32, attn_implementation=self.cfg.model.attn_implementation
        )
        llm.config.use_cache = False
        if self.cfg.model.gradient_checkpointing:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            llm.enable_input_require_grads()
        names = {n.rsplit(".", 1)[-1] for n, _ in llm.named_modules()}
        unknown = [t for t in self.lc.target_modules if t not in names]
        if unknown:
            raise UserError(
                f"lora.target_modules: {unknown} not in the LLM (it has e.g. "
                f"{sorted(n for n in names if n.endswith('proj'))[:8]})"
            )
        lora = LoraConfig(
            r=self.lc.r,
            lora_alpha=self.lc.alpha,
            lora_dropout=self.lc.dropout,
            target_modules=list(self.lc.target_modules),
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(self.cfg.train.seed)
        llm = get_peft_model(llm, lora)
        projectors = make_projectors(
            self.architecture,
            self.lc.projector_hidden,
            int(llm.config.hidden_size),
            {m: self.lc.soft_tokens[m] for m in self.modalities},
        )
        phase1.requires_grad_(False)
        phase1.eval()
        model = build_multimodal(phase1, projectors, llm)
        self.frozen_sha256 = tensors_sha256((n, p) for n, p in model.named_parameters() if not p.requires_grad)
        self.adapter_shapes = adapter_expected_shapes(model)
        return model

    def describe_model(self, model: Any) -> list[str]:
        return [
            f"LLM {self.llm_path} with LoRA r={self.lc.r} alpha={self.lc.alpha:g} on "
            f"{', '.join(self.lc.target_modules)};"
            f" soft tokens {dict((m, self.lc.soft_tokens[m]) for m in self.modalities)}",
            *parameter_table(model.named_parameters()),
            f"frozen weights sha256 {self.frozen_sha256}",
        ]

    # -------------------------------------------------------------------------------- data
    def setup_data(self, ranks: RankInfo, micro_batch: int, grad_accum: int) -> None:
        self.samples, self.val_samples, self.skipped = self._scan()
        if not self.samples:
            raise UserError(f"{self.index}: no usable training samples")
        self.sampler = ResumableSampler(
            len(self.samples), self.cfg.train.seed, ranks.rank, ranks.world_size, micro_batch, grad_accum
        )
        self.workers = default_workers(self.cfg.data.num_workers, ranks.local_world_size)
        held = f"; validation: {len(self.val_samples)} sample(s)" if self.val_samples else "; no validation samples"
        log.info(
            "data: %d sample(s) in %s%s%s%s, modalities %s; batches prepared %s",
            len(self.samples),
            self.index,
            f" ({len(self.skipped)} bad line(s) skipped)" if self.skipped else "",
            held,
            f' ({self.left_out} "split": "test" line(s) left out)' if self.left_out else "",
            ", ".join(self.modalities),
            f"ahead by {self.workers} worker process(es)" if self.workers else "on the training thread",
        )

    def val_size(self) -> int:
        return len(self.val_samples)

    def batch(self, step: int, micro: int, device: Any) -> dict[str, Any]:
        """Micro-batch `micro` of step `step`: prepared here, or ahead by `data.num_workers` processes (same
        tensors)."""
        assert self.sampler is not None
        if self.prefetch is None and self.workers:
            self.prefetch = Prefetcher(self._prepare, self.sampler.grad_accum, self.workers)
        tensors, skipped, error = self.prefetch.get(step, micro) if self.prefetch else self._prepare(step, micro)
        self._record_skipped(skipped)
        if error:
            raise UserError(error)
        return {k: v.to(device) for k, v in tensors.items()}

    def _prepare(self, step: int, micro: int) -> tuple[dict[str, Any], list[str], Optional[str]]:
        """(tensors, lines skipped, the error that stops the run): a pure function of (seed, step, micro, rank), run
        in a worker process with data.num_workers, where nothing it records would reach the training process."""
        assert self.sampler is not None
        items, skipped = [], []
        try:
            for i in self.sampler.indices(step, micro):
                features, bad = self._features(self.samples, int(i))
                items.append(features)
                skipped += bad
        except UserError as exc:
            return {}, skipped, str(exc)
        return collate(items), skipped, None

    def val_batch(self, indices: list[int], device: Any) -> dict[str, Any]:
        items = []
        for i in indices:
            features, bad = self._features(self.val_samples, int(i))
            items.append(features)
            self._record_skipped(bad)
        return {k: v.to(device) for k, v in collate(items).items()}

    def _record_skipped(self, problems: list[str]) -> None:
        """Lines replaced by the next good sample (`on_bad_sample: skip`): counted in the metadata and logged."""
        for problem in problems:
            self.skipped.append(problem)
            log.warning("%s: skipped, the next sample takes its place", problem)

    def _features(self, samples: list[Sample], i: int) -> tuple[dict[str, Any], list[str]]:
        """Sample `i`'s tensors, and the lines skipped on the way. A file that broke after the start-up scan
        (deleted, truncated) stops the run with its line (`on_bad_sample: error`) or is replaced by the next
        good sample and counted (`skip`)."""
        f, n = self._featurizer(), len(samples)
        index = self.index if samples is self.samples else self.val_index() or self.index
        skipped: list[str] = []
        for k in range(n):
            s = samples[(i + k) % n]
            try:
                return f.features(s), skipped
            except Exception as exc:
                problem = f"{index}:{s.line}: unreadable during training ({type(exc).__name__}: {str(exc)[:120]})"
                if self.cfg.data.on_bad_sample == "error":
                    raise UserError(problem + " (set data.on_bad_sample: skip to go on without it)") from None
                skipped.append(problem)
        raise UserError(f"{index}: no sample could be read")

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        return model(**batch)

    def eval_loss(self, model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
        """Summed cross-entropy over the response tokens of `batch`, and their number."""
        return model(**batch, reduction="sum"), int((batch["labels"][:, 1:] != -100).sum())

    def tokens_per_micro_batch(self) -> int:
        """Sequence positions per micro-batch: soft tokens plus max_length (every batch is padded to it)."""
        return self.cfg.train.micro_batch_size * (
            self.lc.max_length + sum(self.lc.soft_tokens[m] for m in self.modalities)
        )

    def flops_per_token(self, model: Any) -> Optional[float]:
        """4N + attention: frozen weights need no weight gradients (forward 2N, backward 2N through activations)."""
        c = self.llm_config()
        n = sum(int(getattr(p, "ds_numel", 0) or p.numel()) for p in model.llm.parameters())
        layers, hidden = int(c.get("num_hidden_layers", 0)), int(c.get("hidden_size", 0))
        t = self.lc.max_length + sum(self.lc.soft_tokens[m] for m in self.modalities)
        return 4 * n + 8 * layers * hidden * t

    def data_position(self, step: int) -> dict[str, Any]:
        assert self.sampler is not None
        return {
            "step": step,
            "samples_seen": self.sampler.samples_before(step),
            "epoch": round(self.sampler.epoch_of(step), 6),
            "num_samples": self.sampler.n,
            "val_samples": len(self.val_samples),
            "skipped_lines": len(self.skipped),
            "seed": self.cfg.train.seed,
        }

    # ------------------------------------------------------------------------ checkpoints
    def on_save(self, model: Any, ckpt_dir: Any, writer: bool, final: bool) -> dict[str, Any]:
        """The PEFT adapter and the projectors beside DeepSpeed's files; on the final save, the frozen weights
        re-hashed."""
        import deepspeed
        from safetensors.torch import load_file, save_file

        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
            if writer:
                adapter = {n: p.detach().cpu().clone() for n, p in trainable if n.startswith("llm.")}
                from peft import get_peft_model_state_dict

                state = get_peft_model_state_dict(
                    model.llm, state_dict={n[len("llm.") :]: v for n, v in adapter.items()}
                )
                out = Path(ckpt_dir) / ADAPTER_DIR
                model.llm.save_pretrained(str(out), state_dict=state, safe_serialization=True)
                check_adapter_tensors(load_file(str(out / "adapter_model.safetensors")), self.adapter_shapes, str(out))
                save_file(
                    {
                        n[len("projectors.") :]: p.detach().cpu().contiguous()
                        for n, p in trainable
                        if n.startswith("projectors.")
                    },
                    str(Path(ckpt_dir) / PROJECTORS_FILE),
                    metadata={"modalities": json.dumps(self.modalities)},
                )
        extra: dict[str, Any] = {
            "frozen_sha256": self.frozen_sha256,
            "lora": {"r": self.lc.r, "alpha": self.lc.alpha, "target_modules": list(self.lc.target_modules)},
            "llm_path": str(self.llm_path),
            "phase1_checkpoint": str(self.phase1_path),
            "soft_tokens": {m: self.lc.soft_tokens[m] for m in self.modalities},
            "projector_hidden": self.lc.projector_hidden,
            "text_tokenizer": self.lc.text_tokenizer,
            "max_length": self.lc.max_length,
            "default_instruction": self.cfg.data.default_instruction,
            "fields": dict(self.cfg.data.fields),
        }
        if final:
            frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
            with deepspeed.zero.GatheredParameters([p for _, p in frozen], modifier_rank=None):
                now = tensors_sha256(frozen) if writer else None
            if writer:
                if now != self.frozen_sha256:
                    raise RuntimeError(f"frozen weights changed during training: sha256 {self.frozen_sha256} -> {now}")
                log.info("frozen weights unchanged (sha256 %s)", now)
        return extra

    def freezing_problems(self, model: Any) -> list[str]:
        out = []
        for n, p in model.named_parameters():
            should_train = n.startswith("projectors.") or (n.startswith("llm.") and "lora_" in n)
            if p.requires_grad != should_train:
                out.append(
                    f"{n} is {'trainable' if p.requires_grad else 'frozen'}, expected "
                    f"{'trainable' if should_train else 'frozen'}"
                )
        return out

    def check_resume(self, metadata: dict[str, Any]) -> None:
        saved = metadata.get("frozen_sha256")
        if saved and self.frozen_sha256 and saved != self.frozen_sha256:
            raise UserError(
                f"--resume: the checkpoint was trained on frozen weights with sha256 {saved[:16]}..., this"
                f" config's LLM and Phase 1 checkpoint hash to {self.frozen_sha256[:16]}... (different base"
                " weights: resuming would train the adapters against another model)"
            )

    def export(self, ckpt: Path, out: Path, metadata: dict[str, Any]) -> list[str]:
        return export_lora(ckpt, out, metadata)

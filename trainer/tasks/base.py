"""What the engine needs from a task. The engine knows nothing else about models or data."""

from __future__ import annotations

from typing import Any, Optional, Protocol

from trainer.ranks import RankInfo


class Task(Protocol):
    name: str
    partition_at_init: bool  # see TaskHooks, which gives every task these defaults
    save_frozen: bool
    perplexity: bool

    def on_save(self, model: Any, ckpt_dir: Any, writer: bool, final: bool) -> dict[str, Any]: ...

    def check_resume(self, metadata: dict[str, Any]) -> None: ...

    def freezing_problems(self, model: Any) -> list[str]: ...

    def prepare_data(self) -> None:
        """Once per node, before `preflight`: bring remote data local (e.g. download and verify shards)."""

    def preflight(self) -> Any:
        """Check the task's inputs (data, paths) and raise `UserError` before any heavy work. Returns the
        `DataSizes` found (training and validation samples), or None where they are not known yet."""

    def model_hints(self) -> dict[str, int]:
        """Sizes the DeepSpeed config can use (e.g. `hidden_size` for bucket sizes)."""

    def import_model_classes(self) -> None:
        """Import the model code up front (the engine calls this before `deepspeed.zero.Init`)."""

    def build_model(self) -> Any:
        """Build the torch module (the engine may call this inside `deepspeed.zero.Init`)."""

    def describe_model(self, model: Any) -> list[str]:
        """Start-up log lines: parameter counts and what is trainable."""

    def setup_data(self, ranks: RankInfo, micro_batch: int, grad_accum: int) -> None:
        """Open the data for this rank."""

    def batch(self, step: int, micro: int, device: Any) -> dict[str, Any]:
        """The micro-batch `micro` of optimizer step `step` (0-based): a pure function of its arguments."""

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        """Scalar training loss of `batch` (the mean over its target tokens)."""

    def val_size(self) -> int:
        """Validation samples (after `setup_data`; 0: the task has no validation data)."""

    def val_batch(self, indices: list[int], device: Any) -> dict[str, Any]:
        """The validation samples `indices` as one batch."""

    def eval_loss(self, model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
        """(summed loss over the target tokens of `batch`, their number): token-weighted means add up over ranks."""

    def tokens_per_micro_batch(self) -> int:
        """Tokens one rank processes per micro-batch (for tokens/s)."""

    def flops_per_token(self, model: Any) -> Optional[float]:
        """Training FLOPs per token for MFU, or None."""

    def export(self, ckpt: Any, out: Any, metadata: dict[str, Any]) -> list[str]:
        """Write checkpoint `ckpt` into the empty folder `out` in the format its users load; the files written."""

    def data_position(self, step: int) -> dict[str, Any]:
        """Where the data stream stands after `step` optimizer steps (stored in checkpoint metadata)."""


class TaskHooks:
    """Defaults of the optional parts of a task: a task that trains every parameter needs none of them."""

    partition_at_init = True
    """Stage 3: build the model inside `deepspeed.zero.Init` (False: build whole, partition at initialize)."""
    save_frozen = True
    """False: checkpoints hold only trainable parameters (DeepSpeed's exclude_frozen_parameters)."""
    perplexity = False
    """Report exp(val loss) beside the validation loss (a language model's perplexity)."""

    def on_save(self, model: Any, ckpt_dir: Any, writer: bool, final: bool) -> dict[str, Any]:
        """Collective, after the engine's files are written: extra files (written where `writer`) and
        extra metadata for the checkpoint."""
        return {}

    def check_resume(self, metadata: dict[str, Any]) -> None:
        """Raise `UserError` if this task cannot continue from a checkpoint with `metadata`."""

    def freezing_problems(self, model: Any) -> list[str]:
        """What is trainable that should not be, or frozen that should train (empty: as intended)."""
        return [] if any(p.requires_grad for p in model.parameters()) else ["no trainable parameters"]

"""Pretraining: a GPT-NeoX causal LM on pre-tokenized shards."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Optional

from trainer.config.plan import DataSizes
from trainer.config.schema import RunConfig
from trainer.data.remote import cache_dir_for, fetch_shards, is_remote, list_remote_shards
from trainer.data.sampler import ResumableSampler
from trainer.data.shards import (
    SHARDS_CHECKED_ENV,
    TokenShards,
    WindowSplit,
    WindowView,
    check_token_ids,
    find_shards,
    open_shard,
)
from trainer.ranks import RankInfo
from trainer.tasks.base import TaskHooks
from trainer.errors import UserError
from trainer.log import get_logger
from trainer.progress import report
from trainer.models.neox import dims_of, human_count, neox_config, parameter_counts

log = get_logger("pretrain")


class PretrainTask(TaskHooks):
    name = "pretrain"
    perplexity = True

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        m = cfg.model
        self.dims = dims_of(m)
        self.seq_len = self.dims["seq_len"]
        self.shards: Optional[TokenShards] = None
        self.train_windows: Optional[WindowView] = None
        self.val_windows: Optional[WindowView] = None
        self.sampler: Optional[ResumableSampler] = None

    def _sources(self) -> list[tuple[str, str]]:
        """(config field, path or URL) of the shard folders this run reads."""
        d = self.cfg.data
        return [("data.path", d.path)] + ([("data.val_path", d.val_path)] if d.val_path else [])

    def local_data_path(self, path: Optional[str] = None) -> Path:
        d = self.cfg.data
        path = d.path if path is None else path
        return cache_dir_for(path, d.cache_dir) if is_remote(path) else Path(path)

    def prepare_data(self) -> None:
        """Once per node: bring remote shards into the local cache."""
        d = self.cfg.data
        for field, path in self._sources():
            if is_remote(path):
                fetch_shards(path, d.max_files if field == "data.path" else None, d.cache_dir, field)

    def preflight(self) -> Optional[DataSizes]:
        """Shards found, readable, token ids in the vocabulary (scanned once); the number of training and
        validation windows, or None while remote shards are not downloaded yet (the ranks check them then)."""
        d = self.cfg.data
        sizes = {}
        for field, path in self._sources():
            if is_remote(path) and not self.local_data_path(path).is_dir():
                # before launch: the shards are there
                list_remote_shards(path, d.max_files if field == "data.path" else None, field)
                return None  # the token-id scan runs after the download, in the ranks
            sizes[field] = self._check_shards(field, path)
        train = sizes["data.path"]
        if d.val_fraction is not None:
            split = WindowSplit(train, d.val_fraction)
            if split.num_train < 1:
                raise UserError(
                    f"data.val_fraction {d.val_fraction:g}: leaves no training window of the {train} in {d.path}"
                )
            return DataSizes(split.num_train, split.num_val, "data.val_fraction")
        return DataSizes(train, sizes.get("data.val_path", 0), "data.val_path")

    def _check_shards(self, field: str, path: str) -> int:
        files = find_shards(
            self.local_data_path(path), self.cfg.data.max_files if field == "data.path" else None, field
        )
        check = self.cfg.data.check_token_ids and os.environ.get(SHARDS_CHECKED_ENV) != "1"
        tokens = windows = 0
        for i, f in enumerate(files):
            report(f"checking the token ids of {f.name} ({i + 1} of {len(files)} shards)")
            arr = open_shard(f)
            tokens += len(arr)
            windows += TokenShards.windows_in(len(arr), self.seq_len)
            if check:
                check_token_ids(f, arr, self.dims["vocab_size"])
        if windows == 0:
            raise TokenShards.too_small(files[0].parent, tokens, self.seq_len, field)
        return windows

    def model_hints(self) -> dict[str, int]:
        return {"hidden_size": self.dims["hidden_size"]}

    def import_model_classes(self) -> None:
        from transformers import GPTNeoXForCausalLM  # noqa: F401

    def build_model(self) -> Any:
        import torch
        from transformers import GPTNeoXForCausalLM

        m = self.cfg.model
        config = neox_config(m)
        torch.manual_seed(self.cfg.train.seed)
        model = GPTNeoXForCausalLM(config)
        if m.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        return model

    def state_bytes_estimate(self) -> int:
        """A checkpoint's bytes: the weights in the training precision plus Adam's fp32 master, exp_avg and
        exp_avg_sq."""
        import torch
        from transformers import GPTNeoXForCausalLM

        with torch.device("meta"):
            n = sum(p.numel() for p in GPTNeoXForCausalLM(neox_config(self.cfg.model)).parameters())
        return n * ((4 if self.cfg.train.precision == "fp32" else 2) + 12)

    def describe_model(self, model: Any) -> list[str]:
        c = parameter_counts(model)
        d = self.dims
        return [
            f"model {self.cfg.model.preset}: {d['num_layers']} layers, hidden {d['hidden_size']}, {d['num_heads']} "
            "heads,"
            f" seq {self.seq_len}, vocab {d['vocab_size']} (padded to {d['padded_vocab_size']})",
            f"parameters: {c['total']:,} total ({human_count(c['total'])}), {c['non_embedding']:,} non-embedding"
            f" ({human_count(c['non_embedding'])})",
        ]

    def setup_data(self, ranks: RankInfo, micro_batch: int, grad_accum: int) -> None:
        d = self.cfg.data
        files = find_shards(self.local_data_path(), d.max_files)
        self.shards = TokenShards(files, self.seq_len)
        held = ""
        if d.val_fraction is not None:
            split = WindowSplit(len(self.shards), d.val_fraction)
            self.train_windows = WindowView(self.shards, split.num_train, split.train_window)
            self.val_windows = WindowView(self.shards, split.num_val, split.val_window)
            held = f", {split.num_val:,} of them held out for validation (data.val_fraction {d.val_fraction:g})"
        else:
            self.train_windows = WindowView(self.shards)
            if d.val_path:
                val_files = find_shards(self.local_data_path(d.val_path), None, "data.val_path")
                self.val_windows = WindowView(TokenShards(val_files, self.seq_len, "data.val_path"))
                held = f"; validation: {len(val_files)} shard(s) in {d.val_path}, {len(self.val_windows):,} windows"
        self.sampler = ResumableSampler(
            len(self.train_windows), self.cfg.train.seed, ranks.rank, ranks.world_size, micro_batch, grad_accum
        )
        log.info(
            "data: %d shard(s) in %s, %s tokens, %s windows of %d tokens%s",
            len(files),
            d.path,
            f"{self.shards.num_tokens:,}",
            f"{len(self.shards):,}",
            self.seq_len,
            held,
        )

    def val_size(self) -> int:
        return len(self.val_windows) if self.val_windows is not None else 0

    def _tokens(self, view: WindowView, indices: Any, device: Any) -> dict[str, Any]:
        import numpy as np
        import torch

        rows = np.stack([view.window(int(i)) for i in indices])
        tokens = torch.from_numpy(rows).to(device, non_blocking=True)
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    def batch(self, step: int, micro: int, device: Any) -> dict[str, Any]:
        assert self.train_windows is not None and self.sampler is not None, "setup_data() first"
        return self._tokens(self.train_windows, self.sampler.indices(step, micro), device)

    def val_batch(self, indices: list[int], device: Any) -> dict[str, Any]:
        assert self.val_windows is not None, "setup_data() first"
        return self._tokens(self.val_windows, indices, device)

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        return self._cross_entropy(model, batch, "mean")

    def eval_loss(self, model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
        return self._cross_entropy(model, batch, "sum"), int(batch["labels"].numel())

    @staticmethod
    def _cross_entropy(model: Any, batch: dict[str, Any], reduction: str) -> Any:
        import torch.nn.functional as F

        logits = model(input_ids=batch["input_ids"]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction=reduction)

    def tokens_per_micro_batch(self) -> int:
        return self.cfg.train.micro_batch_size * self.seq_len

    def flops_per_token(self, model: Any) -> Optional[float]:
        """6N + 12*L*d*T, with N the parameters that do matmuls (all but the input embedding lookup)."""
        c = parameter_counts(model)
        n = c["total"] - c["embedding"] // 2
        d = self.dims
        return 6 * n + 12 * d["num_layers"] * d["hidden_size"] * self.seq_len

    def data_position(self, step: int) -> dict[str, Any]:
        assert self.sampler is not None
        return {
            "step": step,
            "samples_seen": self.sampler.samples_before(step),
            "tokens_seen": self.sampler.samples_before(step) * self.seq_len,
            "epoch": round(self.sampler.epoch_of(step), 6),
            "num_windows": self.sampler.n,
            "val_windows": self.val_size(),
            "seed": self.cfg.train.seed,
        }

    def export(self, ckpt: Path, out: Path, metadata: dict[str, Any]) -> list[str]:
        """Consolidate the ZeRO shards (any stage) into a Hugging Face model folder (safetensors)."""
        model = self.hf_model(ckpt)
        model.config.use_cache = True
        model.save_pretrained(str(out), safe_serialization=True)
        return sorted(p.name for p in out.iterdir())

    def hf_model(self, ckpt: Path) -> Any:
        """The transformers model of checkpoint `ckpt`, its ZeRO shards (any stage) consolidated in fp32."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        from transformers import GPTNeoXForCausalLM

        m = self.cfg.model
        model = GPTNeoXForCausalLM(neox_config(m))
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints its progress; stdout is the command's answer
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(
                f"{ckpt}: the checkpoint does not fit {m.preset} (missing {missing[:2]}, unexpected {unexpected[:2]})"
            )
        return model


class PretrainGenerator:
    """A pretrained GPT-NeoX for `trainer generate`: a prompt continued. From a checkpoint (its ZeRO shards
    consolidated) or an exported model folder; text in and out needs a tokenizer (pretraining data comes
    tokenized), else token ids."""

    def __init__(self, model: Any, tokenizer: Optional[str], device: str = "cpu"):
        self.model, self.device = model.to(device).eval(), device
        self.model.config.use_cache = True
        self.tok = None
        if tokenizer:
            from transformers import AutoTokenizer, PreTrainedTokenizerFast

            path = Path(tokenizer)
            try:
                self.tok = (
                    PreTrainedTokenizerFast(tokenizer_file=str(path))
                    if path.is_file()
                    else AutoTokenizer.from_pretrained(str(path))
                )
            except Exception as exc:
                raise UserError(
                    f"--tokenizer {tokenizer}: cannot load a tokenizer ({str(exc).splitlines()[0][:160]})"
                ) from None

    def encode(self, text: str) -> list[int]:
        assert self.tok is not None, "a text prompt needs a tokenizer"
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> Optional[str]:
        return None if self.tok is None else self.tok.decode(ids, skip_special_tokens=True)

    def continue_ids(self, ids: list[int], **generate: Any) -> list[int]:
        import torch

        vocab = int(self.model.config.vocab_size)
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise UserError(f"prompt token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})")
        x = torch.tensor([ids], device=self.device)
        out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), pad_token_id=0, **generate)
        return out[0, len(ids) :].tolist()

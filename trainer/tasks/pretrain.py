"""Pretraining: a GPT-NeoX causal LM on pre-tokenized shards."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from trainer.config.schema import RunConfig
from trainer.data.remote import cache_dir_for, fetch_shards, is_remote, list_remote_shards
from trainer.data.sampler import ResumableSampler
from trainer.data.shards import SHARDS_CHECKED_ENV, TokenShards, check_token_ids, find_shards, open_shard
from trainer.ranks import RankInfo
from trainer.tasks.base import TaskHooks
from trainer.errors import UserError
from trainer.log import get_logger
from trainer.progress import report
from trainer.models.neox import dims_of, human_count, neox_config, parameter_counts

log = get_logger("pretrain")



class PretrainTask(TaskHooks):
    name = "pretrain"

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        m = cfg.model
        self.dims = dims_of(m)
        self.seq_len = self.dims["seq_len"]
        self.shards: Optional[TokenShards] = None
        self.sampler: Optional[ResumableSampler] = None

    def local_data_path(self) -> Path:
        d = self.cfg.data
        return cache_dir_for(d.path, d.cache_dir) if is_remote(d.path) else Path(d.path)

    def prepare_data(self) -> None:
        """Once per node: bring remote shards into the local cache."""
        d = self.cfg.data
        if is_remote(d.path):
            fetch_shards(d.path, d.max_files, d.cache_dir)

    def preflight(self) -> None:
        if is_remote(self.cfg.data.path) and not self.local_data_path().is_dir():
            list_remote_shards(self.cfg.data.path, self.cfg.data.max_files)  # before launch: the bucket has shards
            return  # the token-id scan runs after the download, in the ranks
        files = find_shards(self.local_data_path(), self.cfg.data.max_files)
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
            raise TokenShards.too_small(files[0].parent, tokens, self.seq_len)

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

    def describe_model(self, model: Any) -> list[str]:
        c = parameter_counts(model)
        d = self.dims
        return [
            f"model {self.cfg.model.preset}: {d['num_layers']} layers, hidden {d['hidden_size']}, {d['num_heads']} heads,"
            f" seq {self.seq_len}, vocab {d['vocab_size']} (padded to {d['padded_vocab_size']})",
            f"parameters: {c['total']:,} total ({human_count(c['total'])}), {c['non_embedding']:,} non-embedding"
            f" ({human_count(c['non_embedding'])})",
        ]

    def setup_data(self, ranks: RankInfo, micro_batch: int, grad_accum: int) -> None:
        files = find_shards(self.local_data_path(), self.cfg.data.max_files)
        self.shards = TokenShards(files, self.seq_len)
        self.sampler = ResumableSampler(len(self.shards), self.cfg.train.seed, ranks.rank, ranks.world_size, micro_batch, grad_accum)
        log.info(
            "data: %d shard(s) in %s, %s tokens, %s windows of %d tokens",
            len(files), self.cfg.data.path, f"{self.shards.num_tokens:,}", f"{len(self.shards):,}", self.seq_len,
        )

    def batch(self, step: int, micro: int, device: Any) -> dict[str, Any]:
        import numpy as np
        import torch

        assert self.shards is not None and self.sampler is not None, "setup_data() first"
        rows = np.stack([self.shards.window(int(i)) for i in self.sampler.indices(step, micro)])
        tokens = torch.from_numpy(rows).to(device, non_blocking=True)
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        import torch.nn.functional as F

        logits = model(input_ids=batch["input_ids"]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())

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
            "seed": self.cfg.train.seed,
        }

    def export(self, ckpt: Path, out: Path, metadata: dict[str, Any]) -> list[str]:
        """Consolidate the ZeRO shards (any stage) into a Hugging Face model folder (safetensors)."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        from transformers import GPTNeoXForCausalLM

        m = self.cfg.model
        model = GPTNeoXForCausalLM(neox_config(m))
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(f"{ckpt}: the checkpoint does not fit {m.preset} (missing {missing[:2]}, unexpected {unexpected[:2]})")
        model.config.use_cache = True
        model.save_pretrained(str(out), safe_serialization=True)
        return sorted(p.name for p in out.iterdir())

"""Model presets: the production shape has the parameter counts of Pythia-1.4B."""

from __future__ import annotations

import torch

from trainer.config.schema import RunConfig
from trainer.config.schema import ModelConfig
from trainer.models.neox import neox_config, parameter_counts, resolve_dims
from trainer.tasks.pretrain import PretrainTask


def test_neox_1b2_shape_and_parameter_counts() -> None:
    cfg = neox_config(ModelConfig(preset="neox-1.2b"))
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.max_position_embeddings) == (
        24,
        2048,
        16,
        2048,
    )
    assert cfg.vocab_size == 50304 and cfg.vocab_size % 128 == 0  # 50257 padded
    from transformers import GPTNeoXForCausalLM

    with torch.device("meta"):  # sizes only, no memory
        model = GPTNeoXForCausalLM(cfg)
    counts = parameter_counts(model)
    assert 1.40e9 < counts["total"] < 1.42e9
    assert 1.20e9 < counts["non_embedding"] < 1.22e9
    task = PretrainTask(RunConfig.model_validate({"model": {"preset": "neox-1.2b"}}))
    lines = task.describe_model(model)
    assert "1.41B" in lines[1] and "1.21B" in lines[1]
    # 6N + 12*L*d*T with N = all matmul parameters (everything but the input embedding lookup)
    n = counts["total"] - 50304 * 2048
    assert task.flops_per_token(model) == 6 * n + 12 * 24 * 2048 * 2048


def test_overrides_of_vocab_and_sequence() -> None:
    d = resolve_dims("neox-tiny", 1000, 128, 64)
    assert d["vocab_size"] == 1000 and d["padded_vocab_size"] == 1024 and d["seq_len"] == 64


def test_neox_410m_is_the_pythia_410m_shape() -> None:
    from transformers import GPTNeoXForCausalLM

    with torch.device("meta"):
        model = GPTNeoXForCausalLM(neox_config(ModelConfig(preset="neox-410m")))
    counts = parameter_counts(model)
    assert 4.04e8 < counts["total"] < 4.06e8 and 3.01e8 < counts["non_embedding"] < 3.03e8


def test_dimension_overrides_build_that_model() -> None:
    """The ReFocused way of changing the architecture: sizes over a preset, in the config."""
    from transformers import GPTNeoXForCausalLM

    m = ModelConfig(preset="neox-tiny", num_layers=3, hidden_size=96, num_heads=3, intermediate_size=200)
    model = GPTNeoXForCausalLM(neox_config(m))
    assert len(model.gpt_neox.layers) == 3 and model.config.hidden_size == 96 and model.config.num_attention_heads == 3
    assert model.gpt_neox.layers[0].mlp.dense_h_to_4h.out_features == 200
    out = model(input_ids=torch.zeros(1, 8, dtype=torch.long))
    assert out.logits.shape == (1, 8, 512)


def test_tiny_batches_are_shifted_windows(tiny_shards) -> None:
    from trainer.ranks import RankInfo

    cfg = RunConfig.model_validate({"data": {"path": str(tiny_shards)}, "train": {"micro_batch_size": 2}})
    task = PretrainTask(cfg)
    task.setup_data(RankInfo(0, 2, 0, 2), micro_batch=2, grad_accum=1)
    b = task.batch(5, 0, "cpu")
    assert b["input_ids"].shape == (2, 128) and b["labels"].shape == (2, 128)
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])
    again = PretrainTask(cfg)
    again.setup_data(RankInfo(0, 2, 0, 2), micro_batch=2, grad_accum=1)
    assert torch.equal(again.batch(5, 0, "cpu")["input_ids"], b["input_ids"])
    other = PretrainTask(cfg)
    other.setup_data(RankInfo(1, 2, 1, 2), micro_batch=2, grad_accum=1)
    assert not torch.equal(other.batch(5, 0, "cpu")["input_ids"], b["input_ids"])

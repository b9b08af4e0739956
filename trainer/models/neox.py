"""GPT-NeoX presets built from `transformers.GPTNeoXConfig` (architecture only, no weights downloaded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from transformers import GPTNeoXConfig


@dataclass(frozen=True)
class NeoXPreset:
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    seq_len: int
    rotary_pct: float = 0.25


PRESETS: dict[str, NeoXPreset] = {
    # Pythia-1.4B shape: ~1.41B parameters in total, ~1.21B without the embeddings.
    "neox-1.2b": NeoXPreset(
        num_layers=24, hidden_size=2048, num_heads=16, intermediate_size=8192, vocab_size=50257, seq_len=2048
    ),
    # Pythia-410M shape: ~405M parameters (302M without the embeddings); a 6 GB full-state checkpoint in fp32
    # (4 bytes of weights + 12 of Adam state per parameter): the size at which saves and uploads take seconds.
    "neox-410m": NeoXPreset(
        num_layers=24, hidden_size=1024, num_heads=16, intermediate_size=4096, vocab_size=50257, seq_len=2048
    ),
    # A few milliseconds per step on one CPU core: tests and demos.
    "neox-tiny": NeoXPreset(
        num_layers=2, hidden_size=64, num_heads=4, intermediate_size=256, vocab_size=512, seq_len=128
    ),
}
DIMENSIONS = ("num_layers", "hidden_size", "num_heads", "intermediate_size")
"""Architecture sizes a config may set over its preset (besides vocab_size and seq_len)."""


def padded_vocab(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


def resolve_dims(
    preset: str, vocab_size: int | None = None, pad_to: int = 128, seq_len: int | None = None, **overrides: int | None
) -> dict[str, int]:
    """The concrete sizes of a configured model: the preset's, with any of `DIMENSIONS` overridden (no torch needed)."""
    p = PRESETS[preset]
    unknown = set(overrides) - set(DIMENSIONS)
    assert not unknown, f"not a model dimension: {sorted(unknown)}"
    vocab = vocab_size or p.vocab_size
    dims = {k: overrides.get(k) or getattr(p, k) for k in DIMENSIONS}
    return {
        **dims,
        "vocab_size": vocab,
        "padded_vocab_size": padded_vocab(vocab, pad_to),
        "seq_len": seq_len or p.seq_len,
        "max_position_embeddings": max(seq_len or p.seq_len, p.seq_len),
    }


def dims_of(model: Any) -> dict[str, int]:
    """`resolve_dims` of a `ModelConfig` (or anything with its fields)."""
    return resolve_dims(
        model.preset,
        model.vocab_size,
        model.pad_vocab_to,
        model.seq_len,
        **{k: getattr(model, k, None) for k in DIMENSIONS},
    )


def dimension_problems(dims: dict[str, int], rotary_pct: float = 0.25) -> list[tuple[str, str]]:
    """(field, what is wrong) for sizes GPT-NeoX cannot be built with."""
    out = []
    hidden, heads = dims["hidden_size"], dims["num_heads"]
    if hidden % heads:
        out.append(
            ("num_heads", f"{heads} does not divide hidden_size {hidden} (each head gets hidden_size / num_heads)")
        )
    else:
        head = hidden // heads
        rotary = int(head * rotary_pct)
        if rotary < 2 or rotary % 2:
            out.append(
                (
                    "num_heads",
                    f"hidden_size {hidden} / num_heads {heads} = head size {head}, whose rotary part"
                    f" ({rotary_pct:.0%}: {rotary}) must be even and at least 2; use a head size of 8, 16, 32,"
                    " 64 or 128",
                )
            )
    return out


def neox_config(model: Any) -> "GPTNeoXConfig":
    """The transformers config of a `ModelConfig` (preset, overrides, attention kernel)."""
    from transformers import GPTNeoXConfig

    d = dims_of(model)
    p = PRESETS[model.preset]
    cfg = GPTNeoXConfig(
        vocab_size=d["padded_vocab_size"],
        hidden_size=d["hidden_size"],
        num_hidden_layers=d["num_layers"],
        num_attention_heads=d["num_heads"],
        intermediate_size=d["intermediate_size"],
        max_position_embeddings=d["max_position_embeddings"],
        rotary_pct=p.rotary_pct,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        hidden_dropout=getattr(model, "dropout", 0.0),
        attention_dropout=getattr(model, "dropout", 0.0),
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg._attn_implementation = getattr(model, "attn_implementation", "sdpa")
    return cfg


def parameter_counts(model: Any) -> dict[str, int]:
    """Total, embedding (input + output) and non-embedding parameter counts of a GPT-NeoX model.

    Works under ZeRO-3 too: partitioned parameters report their full size in `ds_numel`.
    """

    def numel(p: Any) -> int:
        return int(getattr(p, "ds_numel", 0) or p.numel())

    total = sum(numel(p) for p in model.parameters())
    embed = numel(model.get_input_embeddings().weight) + numel(model.get_output_embeddings().weight)
    return {"total": total, "embedding": embed, "non_embedding": total - embed}


def human_count(n: int) -> str:
    """1414647808 -> '1.41B', 165632 -> '165.6K'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}" if unit == "B" else f"{n / size:.1f}{unit}"
    return str(n)

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
    "neox-1.2b": NeoXPreset(num_layers=24, hidden_size=2048, num_heads=16, intermediate_size=8192, vocab_size=50257, seq_len=2048),
    # A few milliseconds per step on one CPU core: tests and demos.
    "neox-tiny": NeoXPreset(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=256, vocab_size=512, seq_len=128),
}


def padded_vocab(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


def resolve_dims(preset: str, vocab_size: int | None, pad_to: int, seq_len: int | None) -> dict[str, int]:
    """The concrete sizes of a configured model (no torch needed)."""
    p = PRESETS[preset]
    vocab = vocab_size or p.vocab_size
    return {
        "num_layers": p.num_layers,
        "hidden_size": p.hidden_size,
        "num_heads": p.num_heads,
        "intermediate_size": p.intermediate_size,
        "vocab_size": vocab,
        "padded_vocab_size": padded_vocab(vocab, pad_to),
        "seq_len": seq_len or p.seq_len,
        "max_position_embeddings": max(seq_len or p.seq_len, p.seq_len),
    }


def neox_config(preset: str, vocab_size: int | None = None, pad_to: int = 128, seq_len: int | None = None,
                attn_implementation: str = "sdpa") -> "GPTNeoXConfig":
    from transformers import GPTNeoXConfig

    d = resolve_dims(preset, vocab_size, pad_to, seq_len)
    p = PRESETS[preset]
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
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg._attn_implementation = attn_implementation
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

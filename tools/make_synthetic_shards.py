#!/usr/bin/env python
"""Write synthetic token shards that a model can learn from (for demos and tests).

Tokens come from a random sparse bigram chain: every token has a few likely successors, so the
loss of a small model falls well below log(vocab) within a few hundred steps.

    python tools/make_synthetic_shards.py --out data/tiny_shards --vocab 512 --tokens 400000 --shards 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def bigram_tokens(n: int, vocab: int, branching: int, rng: np.random.Generator) -> np.ndarray:
    successors = rng.integers(0, vocab, size=(vocab, branching))
    choice = rng.integers(0, branching, size=n)
    out = np.empty(n, dtype=np.int64)
    tok = int(rng.integers(0, vocab))
    for i in range(n):  # a simple chain; 1M tokens take about a second
        out[i] = tok
        tok = int(successors[tok, choice[i]])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--vocab", type=int, default=512, help="vocabulary size (token ids are < vocab)")
    p.add_argument("--tokens", type=int, default=400_000, help="total tokens over all shards")
    p.add_argument("--shards", type=int, default=4, help="number of shard files")
    p.add_argument("--branching", type=int, default=4, help="successors per token (lower = easier to learn)")
    p.add_argument("--format", choices=["npy", "npz"], default="npy")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.vocab < 2 or args.tokens < args.shards or args.shards < 1:
        p.error("need --vocab >= 2, --shards >= 1 and --tokens >= --shards")
    rng = np.random.default_rng(args.seed)
    dtype = np.uint16 if args.vocab <= 65536 else np.uint32
    tokens = bigram_tokens(args.tokens, args.vocab, args.branching, rng).astype(dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(tokens, args.shards)):
        path = args.out / f"shard_{i:05d}.{args.format}"
        if args.format == "npy":
            np.save(path, part)
        else:
            np.savez(path, tokens=part)
    print(
        f"wrote {args.shards} shard(s), {args.tokens:,} tokens (vocab {args.vocab}, {np.dtype(dtype).name}) to "
        f"{args.out}"
    )


if __name__ == "__main__":
    main()

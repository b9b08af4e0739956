"""Pre-tokenized token shards: discovery, validation and fixed-length windows.

A shard is a 1-D array of integer token ids in a `.npy` file (memory-mapped, never read whole)
or a `.npz` file holding one array. Shards are read in name order; each contributes
`(len - 1) // seq_len` windows of `seq_len + 1` tokens (inputs plus the shifted labels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from trainer.errors import UserError

SHARD_SUFFIXES = (".npy", ".npz")
# Set by `trainer train` after its preflight scanned the shards, so the ranks it launches skip the scan.
SHARDS_CHECKED_ENV = "TRAINER_SHARDS_CHECKED"
_SCAN_CHUNK = 1 << 24  # tokens per chunk when scanning for out-of-range ids


def find_shards(folder: Path, max_files: Optional[int] = None, field: str = "data.path") -> list[Path]:
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{field}: shard folder {folder} does not exist (make one with tools/make_synthetic_shards.py)")
    if not folder.is_dir():
        raise UserError(f"{field}: {folder} is not a folder of .npy/.npz shards")
    files = sorted(p for p in folder.iterdir() if p.suffix in SHARD_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"{field}: no .npy or .npz shards in {folder}")
    return files[:max_files] if max_files else files


def open_shard(path: Path) -> np.ndarray:
    """The shard's token ids as a 1-D integer array (memory-mapped for .npy)."""
    try:
        if path.suffix == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                if len(z.files) != 1:
                    raise UserError(
                        f"{path}: expected one array in the .npz shard, found {len(z.files)} ({', '.join(z.files)})"
                    )
                arr = z[z.files[0]]
    except UserError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"{path}: not a readable numpy shard ({exc})") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"{path}: expected a 1-D array of integer token ids, got shape {arr.shape} dtype {arr.dtype}")
    return arr


def check_token_ids(path: Path, arr: np.ndarray, vocab_size: int) -> None:
    """Raise `UserError` naming the first token id outside [0, vocab_size)."""
    if np.issubdtype(arr.dtype, np.unsignedinteger) and np.iinfo(arr.dtype).max < vocab_size:
        return
    for start in range(0, len(arr), _SCAN_CHUNK):
        chunk = np.asarray(arr[start : start + _SCAN_CHUNK])
        bad = (chunk >= vocab_size) | (chunk < 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise UserError(
                f"{path}: token id {int(chunk[i])} at index {start + i} is outside the model vocabulary"
                f" [0, {vocab_size}) (set model.vocab_size or re-tokenize)"
            )


class TokenShards:
    """Random access to fixed-length token windows across a list of shards."""

    def __init__(self, files: list[Path], seq_len: int, field: str = "data.path"):
        self.files = list(files)
        self.seq_len = seq_len
        self.arrays = [open_shard(f) for f in self.files]
        counts = np.array([self.windows_in(len(a), seq_len) for a in self.arrays], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.num_tokens = int(sum(len(a) for a in self.arrays))
        if self.offsets[-1] == 0:
            raise self.too_small(self.files[0].parent, self.num_tokens, seq_len, field)

    @staticmethod
    def windows_in(num_tokens: int, seq_len: int) -> int:
        return max(0, (num_tokens - 1) // seq_len)

    @staticmethod
    def too_small(folder: Path, num_tokens: int, seq_len: int, field: str = "data.path") -> UserError:
        return UserError(
            f"{field}: the shards in {folder} hold {num_tokens} tokens, no shard has a full window of"
            f" seq_len + 1 = {seq_len + 1} tokens"
        )

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def window(self, index: int) -> np.ndarray:
        """Window `index` as int64 tokens of length seq_len + 1."""
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        start = (index - int(self.offsets[shard])) * self.seq_len
        return np.asarray(self.arrays[shard][start : start + self.seq_len + 1], dtype=np.int64)


HOLDOUT_BLOCK = 1000  # data.val_fraction holds out the first round(1000 x fraction) windows of every 1000


class WindowSplit:
    """`data.val_fraction`: the windows of the training shards split into training and validation windows.

    Of every block of `HOLDOUT_BLOCK` consecutive windows the first `k` are validation windows (k =
    round(block x fraction), at least 1; the last, partial block gives at most k). A pure function of the
    number of windows and the fraction: the same on every rank, at every world size and seed, and no window
    is in both sets. Contiguous runs of windows keep most of a document on one side of the split.
    """

    def __init__(self, num_windows: int, fraction: float):
        self.n = int(num_windows)
        self.k = max(1, int(round(HOLDOUT_BLOCK * fraction)))
        full, rest = divmod(self.n, HOLDOUT_BLOCK)
        self.num_val = full * self.k + min(self.k, rest)
        self.num_train = self.n - self.num_val

    def train_window(self, j: int) -> int:
        """The window (an index into all windows) of training sample `j`, 0 <= j < num_train."""
        block, off = divmod(int(j), HOLDOUT_BLOCK - self.k)
        return block * HOLDOUT_BLOCK + self.k + off

    def val_window(self, i: int) -> int:
        """The window of validation sample `i`, 0 <= i < num_val."""
        block, off = divmod(int(i), self.k)
        return block * HOLDOUT_BLOCK + off


class WindowView:
    """A subset of a `TokenShards`' windows, numbered 0..len-1 through `to_window` (identity: all of them)."""

    def __init__(
        self, shards: TokenShards, length: Optional[int] = None, to_window: Optional[Callable[[int], int]] = None
    ):
        self.shards = shards
        self.length = len(shards) if length is None else int(length)
        self.to_window = to_window

    def __len__(self) -> int:
        return self.length

    def window(self, index: int) -> np.ndarray:
        if not 0 <= index < self.length:
            raise IndexError(f"sample {index} of {self.length}")
        return self.shards.window(self.to_window(index) if self.to_window else index)

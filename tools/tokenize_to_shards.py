#!/usr/bin/env python
"""Tokenize text files into token shards for pretraining, with a local Hugging Face tokenizer.

Inputs are `.txt` files (one document per file, or per line with `--txt-docs line`) and `.jsonl`
files (one JSON object per line; the document is its `--text-field`, default "text"), given as
files or as folders (searched recursively, in path order). Each document is tokenized and
followed by the EOS token id; the stream of tokens is cut into shards of `--tokens-per-shard`
tokens, `shard_00000.npy`, `shard_00001.npy`, ... (uint16 when every id fits, else uint32),
read by the trainer in name order. Only the last shard may be shorter.

The tokenizer is local, never downloaded: a `tokenizer.json` file, or a folder that
`transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)` loads. The EOS id is
`--eos-id`, else the tokenizer's eos token (for a bare tokenizer.json: the `eos_token` of a
tokenizer_config.json / special_tokens_map.json beside it, else a special token named
<|endoftext|>, </s>, <|end_of_text|> or <eos>), else an error.

Memory stays bounded: files are streamed in batches of documents and one shard is buffered.
Shards are written into a hidden staging folder inside the output folder and moved into place
at the end, so a failed run leaves nothing behind.

    python tools/tokenize_to_shards.py data/raw_text --tokenizer tokenizers/neox/tokenizer.json --out data/shards
    python tools/tokenize_to_shards.py a.jsonl b.jsonl --tokenizer tokenizers/neox --out data/shards \\
        --tokens-per-shard 10000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

# Never reach for the network: the tokenizer and everything it needs must be local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TEXT_SUFFIXES = (".txt", ".jsonl")
KNOWN_EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
MAX_SHARDS = 100_000  # shard_NNNNN names sort in order only up to 99999
STAGING_PREFIX = ".tokenize-partial-"
BATCH_CHARS = 8_000_000  # also end a batch of documents once it holds this many characters


class InputError(Exception):
    """Bad input: reported as one `error: ...` line on stderr, exit code 2, nothing written."""


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# ----------------------------------------------------------------------------- inputs


def find_inputs(paths: list[Path]) -> list[Path]:
    """The text files to read, in order: explicit files as given, folders searched in path order."""
    files: list[Path] = []
    for path in paths:
        if not path.exists():
            raise InputError(f"input {path} does not exist")
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.suffix in TEXT_SUFFIXES
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise InputError(f"no .txt or .jsonl files in {path}")
            files.extend(found)
        elif path.suffix in TEXT_SUFFIXES:
            files.append(path)
        else:
            raise InputError(f"input {path} is not a .txt or .jsonl file")
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def read_documents(path: Path, txt_docs: str, text_field: str) -> Iterator[str]:
    """The documents in one file, streamed (a .txt file in `file` mode is read whole)."""
    try:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise InputError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                    if not isinstance(record, dict) or text_field not in record:
                        raise InputError(f"{path}:{lineno}: expected a JSON object with a {text_field!r} field")
                    text = record[text_field]
                    if not isinstance(text, str):
                        raise InputError(
                            f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, expected a string"
                        )
                    yield text
        elif txt_docs == "line":
            with path.open(encoding="utf-8") as fh:
                for line in fh:
                    line = line.rstrip("\r\n")
                    if line.strip():
                        yield line
        else:
            yield path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({one_line(exc)})") from None


def batches(files: list[Path], txt_docs: str, text_field: str, batch_docs: int) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for path in files:
        for text in read_documents(path, txt_docs, text_field):
            if not text:
                continue  # an empty document adds nothing but an EOS
            batch.append(text)
            chars += len(text)
            if len(batch) >= batch_docs or chars >= BATCH_CHARS:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


# ----------------------------------------------------------------------------- tokenizer


class LoadedTokenizer:
    def __init__(
        self,
        encode_batch: Callable[[list[str]], list[list[int]]],
        vocab_size: int,
        eos_id: Optional[int],
        eos_token: Optional[str],
        id_to_token: Callable[[int], Optional[str]],
    ):
        self.encode_batch = encode_batch
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.eos_token = eos_token
        self.id_to_token = id_to_token


def eos_from_config(folder: Path) -> Optional[str]:
    """The eos_token named by tokenizer_config.json or special_tokens_map.json in `folder`, if any."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            value = json.loads((folder / name).read_text(encoding="utf-8")).get("eos_token")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    return None


def known_eos(special_tokens: dict[str, int]) -> tuple[Optional[int], Optional[str]]:
    for token in KNOWN_EOS_TOKENS:
        if token in special_tokens:
            return special_tokens[token], token
    return None, None


def load_tokenizer_file(path: Path, add_special_tokens: bool) -> LoadedTokenizer:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception for a bad file
        raise InputError(f"tokenizer {path} is not loadable ({one_line(exc)})") from None
    tok.no_truncation()
    tok.no_padding()
    eos_id, eos_token = None, eos_from_config(path.parent)
    if eos_token is not None:
        eos_id = tok.token_to_id(eos_token)
    if eos_id is None:
        special = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        eos_id, eos_token = known_eos(special)

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    return LoadedTokenizer(encode_batch, tok.get_vocab_size(with_added_tokens=True), eos_id, eos_token, tok.id_to_token)


def load_tokenizer_folder(path: Path, add_special_tokens: bool) -> LoadedTokenizer:
    import warnings

    if not any(path.iterdir()):
        raise InputError(f"tokenizer folder {path} is empty")
    try:
        import transformers
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise InputError(
            f"tokenizer {path} is a folder, which needs the transformers package ({one_line(exc)})"
        ) from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise InputError(f"tokenizer {path} is not loadable with AutoTokenizer ({one_line(exc)})") from None
    eos_id, eos_token = tok.eos_token_id, tok.eos_token
    if eos_id is None:
        special = {t.content: i for i, t in tok.added_tokens_decoder.items() if t.special}
        eos_id, eos_token = known_eos(special)

    def encode_batch(texts: list[str]) -> list[list[int]]:
        out = tok(
            texts,
            add_special_tokens=add_special_tokens,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        return out["input_ids"]

    def id_to_token(i: int) -> Optional[str]:
        return tok.convert_ids_to_tokens(i) if 0 <= i < len(tok) else None

    return LoadedTokenizer(encode_batch, len(tok), eos_id, eos_token, id_to_token)


def load_tokenizer(path: Path, add_special_tokens: bool) -> LoadedTokenizer:
    if path.is_dir():
        return load_tokenizer_folder(path, add_special_tokens)
    return load_tokenizer_file(path, add_special_tokens)


# ----------------------------------------------------------------------------- output


class ShardWriter:
    """Cuts a stream of token arrays into shards of `size` tokens, buffering one shard in memory."""

    def __init__(self, folder: Path, size: int, dtype: np.dtype):
        self.folder = folder
        self.size = size
        self.dtype = dtype
        self.buffer = np.empty(size, dtype=dtype)  # untouched pages cost nothing until filled
        self.filled = 0
        self.written: list[Path] = []
        self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        pos = 0
        while pos < len(tokens):
            take = min(self.size - self.filled, len(tokens) - pos)
            self.buffer[self.filled : self.filled + take] = tokens[pos : pos + take]
            self.filled += take
            pos += take
            if self.filled == self.size:
                self.flush()

    def flush(self) -> None:
        if self.filled == 0:
            return
        if len(self.written) >= MAX_SHARDS:
            raise InputError(f"more than {MAX_SHARDS - 1} shards; raise --tokens-per-shard")
        path = self.folder / f"shard_{len(self.written):05d}.npy"
        np.save(path, self.buffer[: self.filled])
        self.written.append(path)
        self.tokens += self.filled
        self.filled = 0


def first_missing_ancestor(path: Path) -> Optional[Path]:
    """The topmost folder of `path` (itself included) that does not exist yet, or None."""
    path = path.absolute()
    missing = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing = p
    return missing


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"output folder {out} is not empty (pass --overwrite to replace its shards)")


def publish(stage: Path, out: Path) -> None:
    """Replace the .npy/.npz shards (and stale staging folders) in `out` with the staged shards."""
    for old in out.iterdir():
        if old == stage:
            continue
        if old.is_file() and old.suffix in (".npy", ".npz"):
            old.unlink()
        elif old.is_dir() and old.name.startswith(STAGING_PREFIX):
            shutil.rmtree(old, ignore_errors=True)
    for f in sorted(stage.iterdir()):
        os.replace(f, out / f.name)
    stage.rmdir()


# ----------------------------------------------------------------------------- main


def tokenize(args: argparse.Namespace) -> str:
    start = time.perf_counter()
    if args.tokens_per_shard < 1:
        raise InputError(f"--tokens-per-shard must be >= 1, got {args.tokens_per_shard}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    files = find_inputs(args.inputs)
    if not args.tokenizer.exists():
        raise InputError(f"tokenizer {args.tokenizer} does not exist")
    check_output(args.out, args.overwrite)
    tok = load_tokenizer(args.tokenizer, args.add_special_tokens)

    if args.eos_id is not None:
        if not 0 <= args.eos_id < tok.vocab_size:
            raise InputError(
                f"--eos-id {args.eos_id} is outside the vocabulary [0, {tok.vocab_size}) of tokenizer {args.tokenizer}"
            )
        eos_id, eos_token = args.eos_id, tok.id_to_token(args.eos_id)
    elif tok.eos_id is not None:
        eos_id, eos_token = int(tok.eos_id), tok.eos_token
    else:
        raise InputError(f"tokenizer {args.tokenizer} has no EOS token; pass --eos-id")
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    id_limit = int(np.iinfo(dtype).max)

    created = first_missing_ancestor(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    stage = args.out / f"{STAGING_PREFIX}{os.getpid()}"
    stage.mkdir()
    documents = 0
    try:
        writer = ShardWriter(stage, args.tokens_per_shard, dtype)
        for texts in batches(files, args.txt_docs, args.text_field, args.batch_size):
            ids = tok.encode_batch(texts)
            flat: list[int] = []
            for doc in ids:
                flat.extend(doc)
                flat.append(eos_id)
            arr = np.array(flat, dtype=np.int64)
            if arr.min() < 0 or arr.max() > id_limit:  # only if the tokenizer reports a wrong vocab size
                raise InputError(f"tokenizer {args.tokenizer} produced token id {int(arr.max())}, beyond {dtype.name}")
            writer.add(arr)
            documents += len(texts)
        writer.flush()
        if documents == 0:
            raise InputError(f"no documents in {', '.join(str(p) for p in args.inputs)} (every file is empty)")
        publish(stage, args.out)
    except BaseException:
        shutil.rmtree(created if created is not None else stage, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    eos = f"{eos_token}={eos_id}" if eos_token else str(eos_id)
    return (
        f"wrote {len(writer.written)} shard(s), {writer.tokens:,} tokens from {documents:,} document(s)"
        f" (vocab {tok.vocab_size}, {dtype.name}, eos {eos}) to {args.out} in {seconds:.1f}s"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", type=Path, nargs="+", help=".txt/.jsonl files, or folders searched for them")
    p.add_argument(
        "--tokenizer", type=Path, required=True, help="a tokenizer.json file or a local Hugging Face tokenizer folder"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (created; must be empty unless --overwrite)")
    p.add_argument(
        "--tokens-per-shard", type=int, default=50_000_000, help="tokens per shard (the last one may be shorter)"
    )
    p.add_argument(
        "--eos-id", type=int, default=None, help="token id appended after every document (default: the tokenizer's EOS)"
    )
    p.add_argument("--text-field", default="text", help="the field of each .jsonl record that holds the document")
    p.add_argument(
        "--txt-docs",
        choices=["file", "line"],
        default="file",
        help="a .txt file is one document (file) or holds one document per non-empty line (line)",
    )
    p.add_argument(
        "--add-special-tokens",
        action="store_true",
        help="let the tokenizer add its special tokens (e.g. BOS) to each document; off by default",
    )
    p.add_argument("--batch-size", type=int, default=1000, help="documents per tokenizer batch call")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty output folder, replacing the .npy/.npz files in it (other files stay)",
    )
    args = p.parse_args()
    try:
        print(tokenize(args))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

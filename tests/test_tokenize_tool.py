"""tools/tokenize_to_shards.py: text/jsonl to token shards with a local tokenizer built here (never downloaded)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.data.shards import find_shards, open_shard

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "tokenize_to_shards.py"
EOS = "<|endoftext|>"

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello tokens and shards!",
    "a tiny tokenizer trained on a few sentences for tests",
    "pretraining reads token shards in file name order",
]


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=120)


def build_bpe(eos: str | None = EOS):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ([eos] if eos else []) + ["[UNK]"]
    tok.train_from_iterator(
        SENTENCES * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    )
    return tok


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_bpe().save(str(path))
    return path


def encode(tokenizer_file: Path, docs: list[str], eos_id: int | None = None) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    eos_id = tok.token_to_id(EOS) if eos_id is None else eos_id
    out: list[int] = []
    for doc in docs:
        out += tok.encode(doc, add_special_tokens=False).ids + [eos_id]
    return out


def read_shards(folder: Path) -> list[np.ndarray]:
    return [np.asarray(open_shard(f)) for f in find_shards(folder)]


def write_docs(folder: Path, docs: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        paths.append(folder / f"doc_{i:02d}.txt")
        paths[-1].write_text(doc)
    return paths


def test_txt_folder_tokens_split_and_dtype(tmp_path: Path, tokenizer_file: Path):
    docs = SENTENCES + ["fox and dog say hello"]
    write_docs(tmp_path / "txt", docs)
    (tmp_path / "txt" / "notes.csv").write_text("ignored,file\n")
    out = tmp_path / "shards"
    r = run_tool(tmp_path / "txt", "--tokenizer", tokenizer_file, "--out", out, "--tokens-per-shard", 7)
    assert r.returncode == 0, r.stderr
    expected = encode(tokenizer_file, docs)
    shards = read_shards(out)
    assert [f.name for f in find_shards(out)] == [f"shard_{i:05d}.npy" for i in range(len(shards))]
    assert len(shards) == -(-len(expected) // 7)
    assert [len(s) for s in shards[:-1]] == [7] * (len(shards) - 1) and 1 <= len(shards[-1]) <= 7
    assert all(s.dtype == np.uint16 for s in shards)
    assert np.concatenate(shards).tolist() == expected
    assert sorted(p.name for p in out.iterdir()) == [f.name for f in find_shards(out)]  # no staging folder left
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and r.stderr == ""
    summary = lines[0]
    for part in (f"{len(shards)} shard(s)", f"{len(expected)} tokens", f"{len(docs)} document(s)", "uint16", str(out)):
        assert part in summary, summary
    assert "vocab " in summary and summary.endswith("s")


def test_default_shard_size_gives_one_shard_and_eos_override(tmp_path: Path, tokenizer_file: Path):
    docs = SENTENCES[:2]
    files = write_docs(tmp_path / "txt", docs)
    out = tmp_path / "shards"
    # explicit files are read in the order given; --eos-id replaces the tokenizer's EOS
    r = run_tool(files[1], files[0], "--tokenizer", tokenizer_file, "--out", out, "--eos-id", 5)
    assert r.returncode == 0, r.stderr
    (shard,) = read_shards(out)
    assert shard.tolist() == encode(tokenizer_file, [docs[1], docs[0]], eos_id=5)


def test_jsonl_inputs(tmp_path: Path, tokenizer_file: Path):
    a = tmp_path / "in" / "a.jsonl"
    b = tmp_path / "in" / "b.jsonl"
    a.parent.mkdir()
    a.write_text(json.dumps({"text": SENTENCES[0], "id": 1}) + "\n\n" + json.dumps({"text": SENTENCES[1]}) + "\n")
    b.write_text(
        json.dumps({"text": SENTENCES[2]})
        + "\n"
        + json.dumps({"text": ""})
        + "\n"
        + json.dumps({"text": SENTENCES[3]})
        + "\n"
    )
    out = tmp_path / "shards"
    r = run_tool(
        tmp_path / "in", "--tokenizer", tokenizer_file, "--out", out, "--tokens-per-shard", 10, "--batch-size", 2
    )
    assert r.returncode == 0, r.stderr
    assert np.concatenate(read_shards(out)).tolist() == encode(tokenizer_file, SENTENCES)  # the empty doc is skipped
    assert "4 document(s)" in r.stdout


def test_txt_line_mode(tmp_path: Path, tokenizer_file: Path):
    src = tmp_path / "lines.txt"
    src.write_text("\n".join(SENTENCES[:3]) + "\n\n")
    out = tmp_path / "shards"
    r = run_tool(src, "--tokenizer", tokenizer_file, "--out", out, "--txt-docs", "line")
    assert r.returncode == 0, r.stderr
    assert np.concatenate(read_shards(out)).tolist() == encode(tokenizer_file, SENTENCES[:3])


def test_large_vocab_uses_uint32(tmp_path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["[UNK]"] = 70_000
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([EOS])
    tok.save(str(tmp_path / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    (tmp_path / "doc.txt").write_text("w1 w69999 w65536 nope")
    out = tmp_path / "shards"
    r = run_tool(tmp_path / "doc.txt", "--tokenizer", tmp_path / "tokenizer.json", "--out", out)
    assert r.returncode == 0, r.stderr
    (shard,) = read_shards(out)
    assert shard.dtype == np.uint32
    assert shard.tolist() == [1, 69999, 65536, 70_000, eos]
    assert "uint32" in r.stdout


def test_hf_folder_tokenizer(tmp_path: Path, tokenizer_file: Path):
    """A local folder as transformers saves it (tokenizer.json + tokenizer_config.json naming the EOS)."""
    folder = tmp_path / "hf_tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(tokenizer_file.read_text())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "[UNK]"})
    )
    write_docs(tmp_path / "txt", SENTENCES[:2])
    out = tmp_path / "shards"
    r = run_tool(tmp_path / "txt", "--tokenizer", folder, "--out", out)
    assert r.returncode == 0, r.stderr
    from tokenizers import Tokenizer

    unk = Tokenizer.from_file(str(tokenizer_file)).token_to_id("[UNK]")
    assert np.concatenate(read_shards(out)).tolist() == encode(tokenizer_file, SENTENCES[:2], eos_id=unk)


def test_overwrite_replaces_shards_only(tmp_path: Path, tokenizer_file: Path):
    write_docs(tmp_path / "txt", SENTENCES[:1])
    out = tmp_path / "shards"
    out.mkdir()
    for name in ("shard_00000.npy", "shard_00007.npy"):
        np.save(out / name, np.arange(3, dtype=np.uint16))
    (out / "README").write_text("keep me")
    r = run_tool(tmp_path / "txt", "--tokenizer", tokenizer_file, "--out", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["README", "shard_00000.npy"]
    assert np.concatenate(read_shards(out)).tolist() == encode(tokenizer_file, SENTENCES[:1])


def bad_cases(tmp: Path, tokenizer_file: Path) -> dict[str, tuple[list, Path, str]]:
    """name -> (arguments, output folder, path the error must name)."""
    txt = tmp / "txt"
    write_docs(txt, SENTENCES[:2])
    no_text = tmp / "no_text"
    no_text.mkdir()
    (no_text / "data.csv").write_text("a,b\n")
    garbage = tmp / "garbage.json"
    garbage.write_text("{not a tokenizer")
    empty_tok = tmp / "empty_tok_dir"
    empty_tok.mkdir()
    no_eos = tmp / "no_eos" / "tokenizer.json"
    no_eos.parent.mkdir()
    build_bpe(eos=None).save(str(no_eos))
    bad_jsonl = tmp / "bad.jsonl"
    bad_jsonl.write_text(json.dumps({"text": "hello"}) + "\n{oops\n")
    out = tmp / "out" / "shards"
    return {
        "missing input": ([tmp / "nope.txt", "--tokenizer", tokenizer_file, "--out", out], out, "nope.txt"),
        "no text files": ([no_text, "--tokenizer", tokenizer_file, "--out", out], out, str(no_text)),
        "tokenizer missing": ([txt, "--tokenizer", tmp / "missing.json", "--out", out], out, "missing.json"),
        "tokenizer not loadable": ([txt, "--tokenizer", garbage, "--out", out], out, str(garbage)),
        "tokenizer folder not loadable": ([txt, "--tokenizer", empty_tok, "--out", out], out, str(empty_tok)),
        "tokenizer without eos": ([txt, "--tokenizer", no_eos, "--out", out], out, str(no_eos)),
        "bad jsonl line": (
            [txt, bad_jsonl, "--tokenizer", tokenizer_file, "--out", out, "--tokens-per-shard", 2, "--batch-size", 1],
            out,
            f"{bad_jsonl}:2",
        ),  # fails after shards were staged
        "output not empty": ([txt, "--tokenizer", tokenizer_file, "--out", txt], txt, str(txt)),
    }


CASES = [
    "missing input",
    "no text files",
    "tokenizer missing",
    "tokenizer not loadable",
    "tokenizer folder not loadable",
    "tokenizer without eos",
    "bad jsonl line",
    "output not empty",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_error_line(tmp_path: Path, tokenizer_file: Path, case: str):
    args, out, named = bad_cases(tmp_path, tokenizer_file)[case]
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    r = run_tool(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert named in lines[0], lines[0]
    assert r.stdout == ""
    if before is None:
        assert not out.exists() and not out.parent.exists()  # not even the parent folder was left behind
    else:
        assert sorted(p.name for p in out.iterdir()) == before

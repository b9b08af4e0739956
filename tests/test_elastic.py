"""Elastic resume: a run continues on another number of ranks with the same global batch, samples and losses.

The launcher tests chain three real runs per ZeRO stage: A trains 30 steps on 2 ranks; B resumes A's
step 4 on 1 rank (converted to DeepSpeed's universal format) and trains to 30; C resumes B's step 8 on
2 ranks. B must continue A, and C must continue B: the first step after a resume within 1e-5 (same
weights, same samples), the next 20 within 1e-3 (the reduction order differs)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from test_train_launcher import committed, metadata, write_config

GLOBAL = 8  # micro batch 4: grad_accum 2 on one rank, 1 on two


def _losses(ckpt: Path) -> dict[int, float]:
    return {int(s): float(v) for s, v in metadata(ckpt)["loss_history"]}


def _lrs(ckpt: Path) -> dict[int, float]:
    return {int(s): float(v) for s, v in metadata(ckpt)["lr_history"]}


def _continues(resumed: Path, reference: Path, after: int, steps: int = 21) -> None:
    """`resumed` (resumed at step `after`) has `reference`'s losses: the first step within 1e-5, the rest within
    1e-3."""
    a, b = _losses(reference), _losses(resumed)
    span = range(after + 1, after + 1 + steps)
    assert all(s in a and s in b for s in span), (sorted(a), sorted(b))
    assert abs(a[after + 1] - b[after + 1]) < 1e-5, (a[after + 1], b[after + 1])
    worst = max(abs(a[s] - b[s]) for s in span)
    assert worst < 1e-3, {s: (a[s], b[s]) for s in span}
    assert all(b[s] == a[s] for s in range(1, after + 1))  # the history before the resume is carried over
    assert {s: v for s, v in _lrs(resumed).items() if s in span} == {
        s: v for s, v in _lrs(reference).items() if s in span
    }


def _same(x: object, y: object) -> bool:
    import torch

    if torch.is_tensor(x):
        return torch.is_tensor(y) and x.dtype == y.dtype and x.shape == y.shape and bool((x == y).all())
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return isinstance(y, (list, tuple)) and len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y))
    if hasattr(x, "__dict__") and not isinstance(x, type):  # DeepSpeed's LossScaler has no __eq__
        return type(x) is type(y) and _same(vars(x), vars(y))
    return x == y


def _same_as_deepspeed(ckpt: Path, tmp: Path) -> None:
    """The one-pass conversion a resume made holds the files DeepSpeed's ds_to_universal writes, tensor for tensor."""
    import sys

    import torch

    from conftest import REPO

    inputs = tmp / "ds_in"
    inputs.mkdir()
    for f in ckpt.glob("*_states.pt"):
        (inputs / f.name).symlink_to(f)
    subprocess.run(
        [sys.executable, "-m", "trainer.checkpoint.universal", str(inputs), str(tmp / "ds_out"), "--workers", "1"],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    ours, theirs = ckpt / "universal", tmp / "ds_out"
    names = sorted(str(p.relative_to(theirs)) for p in theirs.rglob("*.pt"))
    assert names == sorted(str(p.relative_to(ours)) for p in ours.rglob("*.pt")) and len(names) > 10
    for name in names:
        assert _same(torch.load(ours / name, weights_only=False), torch.load(theirs / name, weights_only=False)), name


def _run(cfg: Path, ranks: int, *extra: str) -> subprocess.CompletedProcess:
    r = run_cli("train", str(cfg), "--num-ranks", str(ranks), *extra)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r


def _ckpt(run_dir: Path, tag: str, world: int) -> Path:
    (c,) = [p for p in committed(run_dir) if p.name == tag and metadata(p)["world_size"] == world]
    return c


@pytest.mark.launcher
@pytest.mark.parametrize("stage", [1, 2])
def test_resume_on_fewer_and_more_ranks_continues_the_run(tiny_config: Path, tmp_path: Path, stage: int) -> None:
    from trainer.checkpoint.universal import RECORD, ensure_universal

    runs = tmp_path / "runs"
    cfg = write_config(
        tiny_config,
        runs,
        train={"max_steps": 30, "log_every": 1, "micro_batch_size": 4, "global_batch_size": GLOBAL},
        optim={"decay_steps": 30, "warmup_steps": 2},
        eval={"enabled": False},
        checkpoint={"save_every": 4, "keep_last": 10},
        deepspeed={"template": f"zero{stage}"},
    )
    doc = yaml.safe_load(cfg.read_text())
    doc["train"].pop("grad_accum", None)  # derived from the global batch on each world size
    cfg.write_text(yaml.safe_dump(doc))
    _run(cfg, 2)
    a4, a30 = _ckpt(runs, "step-00000004", 2), _ckpt(runs, "step-00000030", 2)

    r = _run(cfg, 1, "--resume", str(a4))  # 2 ranks -> 1
    assert "resuming step-00000004 saved on 2 ranks onto 1: converted to universal in" in r.stdout, r.stdout[-3000:]
    b8, b30 = _ckpt(runs, "step-00000008", 1), _ckpt(runs, "step-00000030", 1)
    _continues(b30, a30, after=4)
    mb = metadata(b30)
    assert (mb["world_size"], mb["resumed_from_world_size"], mb["grad_accum"], mb["global_batch_size"]) == (
        1,
        2,
        2,
        GLOBAL,
    )
    assert metadata(a30)["grad_accum"] == 1
    assert (
        mb["config_hash"] == metadata(a30)["config_hash"] and "training settings changed" not in r.stdout
    )  # the same config
    assert mb["data_position"]["samples_seen"] == metadata(a30)["data_position"]["samples_seen"] == 30 * GLOBAL
    # the conversion sits inside its source, whole, and is reused rather than redone
    assert (a4 / "universal" / RECORD).is_file() and not list(a4.parent.glob(".universal-*"))
    assert ensure_universal(a4).seconds is None
    _same_as_deepspeed(a4, tmp_path)

    r = _run(cfg, 2, "--resume", str(b8))  # 1 rank -> 2
    assert "resuming step-00000008 saved on 1 ranks onto 2: converted to universal in" in r.stdout, r.stdout[-3000:]
    c30 = [p for p in committed(runs) if p.name == "step-00000030" and metadata(p).get("branched_from") == str(b8)]
    assert len(c30) == 1
    _continues(c30[0], b30, after=8)
    assert metadata(c30[0])["resumed_from_world_size"] == 1 and metadata(c30[0])["grad_accum"] == 1


def test_the_samples_of_a_step_do_not_depend_on_the_world_size() -> None:
    """For W in {1, 2, 4} at a fixed global batch, the union of the ranks' samples at step k is the same set,
    grouped into the same micro-batches (one rank's micro m holds what rank m held on more ranks)."""
    from trainer.data.sampler import ResumableSampler

    micro, n = 2, 1000
    for step in (0, 1, 7, 62, 63, 200):  # 63 crosses the end of the first epoch (1000 / 16 = 62.5 steps)
        groups: dict[int, list] = {}
        for world in (1, 2, 4):
            accum = 16 // (micro * world)
            samplers = [ResumableSampler(n, 5, rank, world, micro, accum) for rank in range(world)]
            groups[world] = sorted(tuple(sorted(s.indices(step, m).tolist())) for s in samplers for m in range(accum))
        assert groups[1] == groups[2] == groups[4]
        assert len({i for g in groups[1] for i in g}) == 16


def test_global_batch_size_derives_grad_accum_and_a_resume_keeps_its_batch(tiny_config: Path) -> None:
    from trainer.config.batch import resolve_batch
    from trainer.config.load import Overrides, load_config
    from trainer.errors import UserError

    plain = yaml.safe_load(tiny_config.read_text())
    plain["train"].pop("grad_accum", None)
    path = tiny_config.parent / "derived.yaml"
    path.write_text(
        yaml.safe_dump({**plain, "train": {**plain["train"], "global_batch_size": 32, "micro_batch_size": 4}})
    )
    cfg = load_config(path)
    assert [resolve_batch(cfg, w).train.grad_accum for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(UserError) as e:
        resolve_batch(cfg, 3, "derived.yaml")
    assert "train.global_batch_size 32" in str(e.value) and "= 12" in str(e.value) and "1, 2, 4, 8" in str(e.value)

    # an explicit grad_accum that contradicts the global batch on this world size is an error
    both = load_config(path, Overrides(sets=["train.grad_accum=2"]))
    assert resolve_batch(both, 4).train.grad_accum == 2
    with pytest.raises(UserError, match="leave train.grad_accum out"):
        resolve_batch(both, 2)

    # no global_batch_size: the checkpoint's global batch is kept on another world size
    free = load_config(tiny_config, Overrides(sets=["train.micro_batch_size=4", "train.grad_accum=1"]))
    saved = {"tag": "step-00000100", "step": 100, "world_size": 4, "plan": {"global_batch": 16}}
    assert resolve_batch(free, 1, resume=saved).train.grad_accum == 4
    assert resolve_batch(free, 4, resume=saved).train.grad_accum == 1
    assert resolve_batch(free, 2).train.grad_accum == 1  # a fresh run takes grad_accum as configured
    with pytest.raises(UserError, match=r"the global batch 16 of step-00000100 \(4 ranks\) .* = 12"):
        resolve_batch(free, 3, resume=saved)


@pytest.mark.parametrize("case", ["zero3", "batch", "states"])
def test_a_resume_that_cannot_continue_on_this_world_size_is_one_line(
    tiny_config: Path, tmp_path: Path, case: str
) -> None:
    """Refused before anything launches, with the numbers (the checkpoint is left as it was)."""
    from test_bad_input import assert_user_error, snapshot

    from conftest import fake_checkpoint

    runs = Path(yaml.safe_load(tiny_config.read_text())["run_dir"])
    ckpt = fake_checkpoint(
        runs / "run-a",
        4,
        world=2,
        size=1000,
        zero_stage=3 if case == "zero3" else 2,
        task="pretrain",
        plan={"global_batch": 16},
    )
    if case == "zero3":
        extra = ["--set", "deepspeed.template=zero3"]
        ranks, needles = "1", ["saved by 2 ranks with ZeRO stage 3", "zero1 or zero2", "run on 2 rank(s)"]
    elif case == "batch":
        extra, ranks = [], "3"
        needles = [
            "the global batch 16 of step-00000004 (2 ranks)",
            "x world size 3 = 24",
            "world sizes that keep it: 1, 2",
        ]
    else:  # one node's files of a run saved across nodes without a shared filesystem, and no bucket to fetch the rest
        (ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()  # (and not recorded: another node wrote it)
        meta = json.loads((ckpt / "metadata.json").read_text())
        del meta["files"]["zero_pp_rank_1_mp_rank_00_optim_states.pt"]
        (ckpt / "metadata.json").write_text(json.dumps(meta))
        extra, ranks = [], "1"
        needles = ["lacks rank 1's optimizer states", "no upload.url to fetch it from", "resume on 2 rank(s)"]
    before = snapshot(runs)
    r = run_cli("train", str(tiny_config), "--num-ranks", ranks, "--resume", str(ckpt), "--dry-run", *extra)
    assert_user_error(r, *needles)
    assert snapshot(runs) == before


def test_an_impossible_global_batch_is_one_line(tiny_config: Path) -> None:
    from test_bad_input import assert_user_error

    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["train"].pop("grad_accum", None)
    cfg["train"].update(global_batch_size=12, micro_batch_size=8)
    bad = tiny_config.parent / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    assert_user_error(
        run_cli("train", str(bad), "--num-ranks", "1", "--dry-run"),
        "bad.yaml: train.global_batch_size 12",
        "train.micro_batch_size 8 x world size 1 = 8",
    )


def test_a_conversion_is_never_uploaded_listed_or_counted(tmp_path: Path) -> None:
    """`universal/` is derived from the checkpoint: not in its upload, its file list or its size."""
    from conftest import fake_checkpoint
    from trainer.checkpoint.catalog import scan
    from trainer.upload.uploader import NodeInfo, local_files

    ckpt = fake_checkpoint(tmp_path / "run-x", 4, world=2, size=1000)
    before = local_files(ckpt, NodeInfo(0, 1, 2))
    (ckpt / "universal" / "zero" / "w").mkdir(parents=True)
    (ckpt / "universal" / "zero" / "w" / "fp32.pt").write_bytes(b"x" * 5000)
    (ckpt / "universal" / "conversion.json").write_text("{}")
    assert local_files(ckpt, NodeInfo(0, 1, 2)) == before
    (entry,) = scan(tmp_path / "run-x").entries
    assert not any(name.startswith("universal") for name, _ in entry.files)


@pytest.mark.launcher
def test_lora_resumes_on_one_rank_from_two(tiny_mm: Path, tmp_path: Path) -> None:
    """Phase 2 LoRA at ZeRO-2: checkpoints hold only the trainable parameters (LoRA, projectors); the
    universal conversion carries them and their Adam moments, the frozen weights come from Phase 1 and
    the base LLM as on any resume (hash-checked)."""
    from test_lora import lora_config

    cfg = lora_config(
        tiny_mm,
        tmp_path / "lora",
        train={"max_steps": 27, "log_every": 1, "micro_batch_size": 2, "global_batch_size": 4},
        optim={"decay_steps": 27, "warmup_steps": 2},
        eval={"enabled": False},
        checkpoint={"save_every": 6, "keep_last": 10},
        deepspeed={"template": "zero2"},
    )
    runs = tmp_path / "lora" / "runs"
    _run(cfg, 2)
    a6, a27 = _ckpt(runs, "step-00000006", 2), _ckpt(runs, "step-00000027", 2)
    r = _run(cfg, 1, "--resume", str(a6))
    assert "resuming step-00000006 saved on 2 ranks onto 1: converted to universal in" in r.stdout, r.stdout[-3000:]
    assert "frozen weights unchanged (sha256" in r.stdout
    b27 = _ckpt(runs, "step-00000027", 1)
    _continues(b27, a27, after=6)
    assert metadata(b27)["grad_accum"] == 2 and metadata(b27)["resumed_from_world_size"] == 2
    _same_as_deepspeed(a6, tmp_path)  # only the trainable parameters, as DeepSpeed's converter writes them


def test_the_files_a_node_needs_to_resume_on_the_same_world_size(tmp_path: Path) -> None:
    """A node of a run without a shared filesystem holds only its own ranks' files: which ones it must fetch."""
    from trainer.checkpoint.universal import missing_for_ranks, needed_by_ranks

    node1 = range(2, 4)  # ranks 2 and 3 of 4
    names = [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_2_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_2_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "rng_state_rank00003.pt",
        "rng_state_rank00000.pt",
        "metadata.json",
        "config.yaml",
    ]
    assert [n for n in names if needed_by_ranks(n, node1, 2)] == names[:3] + ["rng_state_rank00003.pt"]
    assert [n for n in names if needed_by_ranks(n, node1, 3)] == [
        names[1],
        names[2],
        names[4],
        "rng_state_rank00003.pt",
    ]
    ckpt = tmp_path / "step-00000004"
    assert missing_for_ranks(ckpt, node1, 2)  # not on this node at all
    ckpt.mkdir()
    for n in (
        "zero_pp_rank_2_mp_rank_00_optim_states.pt",
        "zero_pp_rank_3_mp_rank_00_optim_states.pt",
        "rng_state_rank00002.pt",
    ):
        (ckpt / n).write_bytes(b"x")
    assert missing_for_ranks(ckpt, node1, 2)  # the model states rank 0 wrote on node 0
    assert not missing_for_ranks(ckpt, node1, 3)  # ZeRO-3: every rank reads its own
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert not missing_for_ranks(ckpt, node1, 2)
    assert missing_for_ranks(ckpt, range(0, 2), 1)  # ranks 0 and 1 lack their optimizer states here
    for n in list(ckpt.iterdir()):
        if "optim" in n.name:
            n.unlink()
    assert not missing_for_ranks(ckpt, node1, 0)  # ZeRO-0: the optimizer is in the model states

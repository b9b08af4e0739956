"""Token shards and the resumable sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer.config.load import Overrides, load_config
from trainer.data import sampler as sampler_mod
from trainer.data.sampler import ResumableSampler
from trainer.data.shards import TokenShards, check_token_ids, find_shards, open_shard
from trainer.errors import UserError


# ---------------------------------------------------------------------------------------------
# ResumableSampler


def all_indices(s: ResumableSampler, step: int) -> list[np.ndarray]:
    return [s.indices(step, m) for m in range(s.grad_accum)]


def global_order(n: int, seed: int, world: int, micro: int, accum: int, steps: int) -> np.ndarray:
    """Indices read by all ranks over `steps` steps, in global sample-position order."""
    pos_idx: list[tuple[int, int]] = []
    for rank in range(world):
        s = ResumableSampler(n, seed, rank, world, micro, accum)
        for step in range(steps):
            for m in range(accum):
                first = s.samples_before(step) + (m * world + rank) * micro
                pos_idx += list(zip(range(first, first + micro), s.indices(step, m).tolist()))
    pos_idx.sort()
    positions = [p for p, _ in pos_idx]
    assert positions == list(range(len(positions)))  # every global position is read exactly once
    return np.array([i for _, i in pos_idx])


def test_indices_are_a_pure_function() -> None:
    args = dict(num_samples=1000, seed=7, rank=1, world_size=4, micro_batch=3, grad_accum=2)
    a = ResumableSampler(**args)
    first = {(step, m): a.indices(step, m).copy() for step in (0, 1, 5, 100, 3) for m in range(2)}
    # the same object again, in another order
    for step, m in reversed(list(first)):
        np.testing.assert_array_equal(a.indices(step, m), first[(step, m)])
    # a fresh object (a resumed run) with nothing cached
    sampler_mod._permutation.cache_clear()
    b = ResumableSampler(**args)
    for (step, m), expected in first.items():
        np.testing.assert_array_equal(b.indices(step, m), expected)


def test_resumed_run_reads_what_the_uninterrupted_run_read() -> None:
    args = dict(num_samples=50, seed=3, rank=0, world_size=2, micro_batch=4, grad_accum=2)
    uninterrupted = ResumableSampler(**args)
    history = [all_indices(uninterrupted, step) for step in range(20)]
    resumed = ResumableSampler(**args)  # restarts at step 12 knowing only the step
    for step in range(12, 20):
        for m, expected in enumerate(history[step]):
            np.testing.assert_array_equal(resumed.indices(step, m), expected)


def test_indices_shape_dtype_and_range() -> None:
    s = ResumableSampler(37, seed=1, rank=1, world_size=2, micro_batch=5, grad_accum=3)
    for step in range(20):
        for m in range(3):
            idx = s.indices(step, m)
            assert idx.shape == (5,)
            assert np.issubdtype(idx.dtype, np.integer)
            assert idx.min() >= 0 and idx.max() < 37


@pytest.mark.parametrize("world, micro, accum", [(2, 2, 1), (4, 3, 2), (3, 1, 5)])
def test_ranks_at_the_same_step_get_disjoint_indices(world: int, micro: int, accum: int) -> None:
    n = 1000  # larger than a global batch: no epoch wraps inside a step
    samplers = [ResumableSampler(n, 11, r, world, micro, accum) for r in range(world)]
    for step in (0, 1, 7, 50):
        per_rank = [np.concatenate(all_indices(s, step)) for s in samplers]
        union = np.concatenate(per_rank)
        assert len(union) == micro * accum * world
        assert len(set(union.tolist())) == len(union), f"step {step}: ranks overlap"
        for r in range(world):
            for q in range(r + 1, world):
                assert not set(per_rank[r].tolist()) & set(per_rank[q].tolist())


@pytest.mark.parametrize("n, world, micro, accum", [(24, 2, 3, 2), (10, 2, 2, 1), (7, 1, 3, 1), (13, 3, 1, 2)])
def test_each_epoch_is_a_permutation_of_all_windows(n: int, world: int, micro: int, accum: int) -> None:
    global_batch = world * micro * accum
    steps = -(-3 * n // global_batch)  # enough steps for three whole epochs
    order = global_order(n, 5, world, micro, accum, steps)
    for epoch in range(3):
        chunk = order[epoch * n : (epoch + 1) * n]
        assert sorted(chunk.tolist()) == list(range(n)), f"epoch {epoch} does not cover every window exactly once"


def test_epochs_have_different_orders() -> None:
    n = 64
    order = global_order(n, 5, world=2, micro=4, accum=2, steps=3 * n // 16)
    e0, e1, e2 = order[:n], order[n : 2 * n], order[2 * n : 3 * n]
    assert not np.array_equal(e0, e1)
    assert not np.array_equal(e1, e2)
    assert not np.array_equal(e0, np.arange(n))  # shuffled, not the file order


def test_seed_changes_the_order() -> None:
    a = ResumableSampler(100, 1, 0, 1, 8, 1).indices(0, 0)
    b = ResumableSampler(100, 2, 0, 1, 8, 1).indices(0, 0)
    assert not np.array_equal(a, b)


def test_samples_before_and_epoch_of() -> None:
    s = ResumableSampler(100, seed=0, rank=0, world_size=2, micro_batch=4, grad_accum=3)
    assert s.global_batch == 24
    assert s.samples_before(0) == 0
    assert s.samples_before(5) == 120
    assert s.epoch_of(5) == pytest.approx(1.2)


def test_sampler_needs_samples() -> None:
    with pytest.raises(ValueError):
        ResumableSampler(0, seed=0, rank=0, world_size=1, micro_batch=1, grad_accum=1)


def test_every_seed_the_config_accepts_works_and_the_others_are_named(tiny_config: Path) -> None:
    """The seed feeds the sampler and torch.manual_seed (model init): 0 .. 2**64-1 work in both; outside that range
    the config says so, naming train.seed, before anything starts."""
    import torch

    for seed in (0, 2**32, 2**64 - 1):
        cfg = load_config(tiny_config, Overrides(sets=[f"train.seed={seed}"]))
        assert ResumableSampler(100, cfg.train.seed, 0, 1, 4, 1).indices(0, 0).shape == (4,)
        torch.manual_seed(cfg.train.seed)
    for seed in (-1, 2**64):
        with pytest.raises(UserError, match=r"train\.seed"):
            load_config(tiny_config, Overrides(sets=[f"train.seed={seed}"]))


# ---------------------------------------------------------------------------------------------
# Shards


def write_shards(folder: Path, arrays: list[np.ndarray], fmt: str = "npy") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(arrays):
        path = folder / f"shard_{i:05d}.{fmt}"
        if fmt == "npy":
            np.save(path, arr)
        else:
            np.savez(path, tokens=arr)
        paths.append(path)
    return paths


def expected_windows(arrays: list[np.ndarray], seq_len: int) -> list[np.ndarray]:
    out = []
    for a in arrays:
        for i in range((len(a) - 1) // seq_len):
            out.append(np.asarray(a[i * seq_len : i * seq_len + seq_len + 1], dtype=np.int64))
    return out


def test_windows_of_the_fixture_shards_match_the_source_tokens(tiny_shards: Path) -> None:
    files = find_shards(tiny_shards)
    seq_len = 128
    ts = TokenShards(files, seq_len)
    sources = [np.load(f) for f in files]
    assert ts.num_tokens == sum(len(a) for a in sources)
    assert len(ts) == sum((len(a) - 1) // seq_len for a in sources)
    expected = expected_windows(sources, seq_len)
    for i in [0, 1, len(expected) // 2 - 1, len(expected) // 2, len(expected) // 2 + 1, len(expected) - 1]:
        w = ts.window(i)
        assert w.shape == (seq_len + 1,)
        assert w.dtype == np.int64
        np.testing.assert_array_equal(w, expected[i])


@pytest.mark.parametrize("fmt", ["npy", "npz"])
@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_every_window_matches_the_source(tmp_path: Path, fmt: str, dtype) -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 500, size=n).astype(dtype) for n in (100, 5, 33, 17)]  # 5 tokens: no window at seq_len 8
    files = write_shards(tmp_path / "s", arrays, fmt)
    ts = TokenShards(find_shards(tmp_path / "s"), 8)
    expected = expected_windows(arrays, 8)
    assert len(ts) == len(expected) == 12 + 0 + 4 + 2
    for i, e in enumerate(expected):
        w = ts.window(i)
        assert len(w) == 9
        np.testing.assert_array_equal(w, e)
    # consecutive windows of a shard overlap by one token (the last label is the next input)
    assert ts.window(0)[-1] == ts.window(1)[0]
    assert ts.files == files


def test_npz_and_npy_give_the_same_windows(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 500, size=n, dtype=np.int64) for n in (200, 150)]
    write_shards(tmp_path / "npy", arrays, "npy")
    write_shards(tmp_path / "npz", arrays, "npz")
    a = TokenShards(find_shards(tmp_path / "npy"), 16)
    b = TokenShards(find_shards(tmp_path / "npz"), 16)
    assert [f.suffix for f in b.files] == [".npz", ".npz"]
    assert len(a) == len(b) > 0
    for i in range(len(a)):
        np.testing.assert_array_equal(a.window(i), b.window(i))


def test_find_shards_orders_by_name_and_filters(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    write_shards(folder, [np.arange(20)] * 3)
    (folder / "README.md").write_text("notes")
    (folder / "shard_00009.npy.tmp").write_text("partial")
    (folder / "sub.npy").mkdir()  # a folder, not a shard
    files = find_shards(folder)
    assert [f.name for f in files] == ["shard_00000.npy", "shard_00001.npy", "shard_00002.npy"]
    assert [f.name for f in find_shards(folder, max_files=2)] == ["shard_00000.npy", "shard_00001.npy"]


def test_find_shards_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        find_shards(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .npy or .npz"):
        find_shards(tmp_path / "empty")
    (tmp_path / "file.npy").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        find_shards(tmp_path / "file.npy")


def test_open_shard_rejects_bad_arrays(tmp_path: Path) -> None:
    np.save(tmp_path / "float.npy", np.zeros(10, dtype=np.float32))
    np.save(tmp_path / "2d.npy", np.zeros((3, 3), dtype=np.int64))
    np.savez(tmp_path / "two.npz", a=np.arange(3), b=np.arange(3))
    (tmp_path / "junk.npy").write_text("not numpy")
    for name, needle in [
        ("float.npy", "integer"),
        ("2d.npy", "1-D"),
        ("two.npz", "one array"),
        ("junk.npy", "junk.npy"),
    ]:
        with pytest.raises(UserError, match=needle) as exc:
            open_shard(tmp_path / name)
        assert name in str(exc.value)


def test_shards_too_small_for_a_window(tmp_path: Path) -> None:
    files = write_shards(tmp_path / "s", [np.arange(8), np.arange(5)])
    with pytest.raises(UserError, match="seq_len"):
        TokenShards(files, 8)


def test_check_token_ids_catches_negative_ids_in_a_signed_array(tmp_path: Path) -> None:
    arr = np.arange(100, dtype=np.int32) % 50
    arr[42] = -5
    with pytest.raises(UserError) as exc:
        check_token_ids(tmp_path / "shard_00003.npy", arr, 512)
    msg = str(exc.value)
    assert "shard_00003.npy" in msg and "-5" in msg and "42" in msg and "512" in msg


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int16, np.int64])
def test_check_token_ids_catches_ids_at_or_above_vocab(tmp_path: Path, dtype) -> None:
    arr = (np.arange(1000) % 512).astype(dtype)
    check_token_ids(tmp_path / "ok.npy", arr, 512)  # all in range: no error
    arr[700] = 512
    with pytest.raises(UserError, match=r"token id 512 at index 700"):
        check_token_ids(tmp_path / "bad.npy", arr, 512)


def test_check_token_ids_on_a_memory_mapped_shard(tmp_path: Path) -> None:
    arr = np.zeros(5000, dtype=np.int64)
    arr[-1] = 600
    np.save(tmp_path / "shard.npy", arr)
    with pytest.raises(UserError, match=r"token id 600 at index 4999") as exc:
        check_token_ids(tmp_path / "shard.npy", open_shard(tmp_path / "shard.npy"), 512)
    assert "shard.npy" in str(exc.value)


def test_check_token_ids_unsigned_dtype_smaller_than_vocab_passes(tmp_path: Path) -> None:
    check_token_ids(tmp_path / "u8.npy", np.full(100, 255, dtype=np.uint8), 512)


# ---------------------------------------------------------------------------------------------
# validation windows, the evaluation subset, epoch cadences


@pytest.mark.parametrize("windows, fraction", [(3124, 0.05), (1000, 0.001), (999, 0.5), (2500, 0.3), (40, 0.05)])
def test_val_fraction_windows_are_never_training_windows(windows: int, fraction: float) -> None:
    from trainer.data.shards import WindowSplit

    split = WindowSplit(windows, fraction)
    train = [split.train_window(j) for j in range(split.num_train)]
    val = [split.val_window(i) for i in range(split.num_val)]
    assert not set(train) & set(val)
    assert sorted(train + val) == list(range(windows))  # every window on exactly one side
    assert split.num_val == (windows // 1000) * round(1000 * fraction) + min(round(1000 * fraction), windows % 1000)


def test_training_reads_no_validation_window(tiny_shards: Path) -> None:
    """The sampler's indices over a whole epoch, mapped to windows, never touch a validation window."""
    from trainer.data.shards import WindowSplit, WindowView

    shards = TokenShards(find_shards(tiny_shards), 128)
    split = WindowSplit(len(shards), 0.05)
    view = WindowView(shards, split.num_train, split.train_window)
    val = {split.val_window(i) for i in range(split.num_val)}
    s = ResumableSampler(len(view), seed=3, rank=0, world_size=1, micro_batch=16, grad_accum=1)
    seen = {split.train_window(int(i)) for step in range(-(-len(view) // 16)) for i in s.indices(step, 0)}
    assert len(seen) == len(view) and not seen & val
    assert (view.window(0) == shards.window(split.train_window(0))).all()


def test_eval_subset_is_fixed_and_split_disjointly_over_ranks() -> None:
    from trainer.engine.evaluate import eval_subset, rank_batches
    from trainer.ranks import RankInfo

    subset = eval_subset(100, 3, 4, 2)
    assert len(subset) == 24 and (subset == eval_subset(100, 3, 4, 2)).all()
    assert len(eval_subset(100, 0, 4, 2)) == 100 and len(eval_subset(10, 5, 4, 2)) == 10
    whole = eval_subset(21, 0, 4, 2)
    parts = [rank_batches(whole, 4, RankInfo(r, 2, r, 2)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 3  # the same number of forward passes on every rank
    flat = [i for p in parts for b in p for i in b]
    assert sorted(flat) == sorted(whole.tolist())  # disjoint, and all of it


def test_epoch_cadence_is_the_step_that_completes_each_pass() -> None:
    from trainer.config.plan import Cadence

    c = Cadence("epoch", 64, 1000)  # 15.6 steps per epoch
    assert [s for s in range(1, 80) if c.due(s)] == [16, 32, 47, 63, 79]
    assert [c.next_after(s) for s in (0, 15, 16, 47)] == [16, 16, 32, 63]
    assert [s for s in range(1, 13) if Cadence(4, 64, 1000).due(s)] == [4, 8, 12]


def test_plan_derives_steps_and_warmup_from_epochs(tiny_config: Path) -> None:
    from trainer.config.plan import DataSizes, resolve_plan

    cfg = load_config(tiny_config, Overrides(sets=["optim.warmup_steps=null", "optim.warmup_ratio=0.1"], epochs=2))
    plan = resolve_plan(cfg, DataSizes(1000, 50), 2)  # micro batch 8 x 2 ranks: 62.5 steps per epoch
    assert (plan.max_steps, plan.warmup_steps, plan.global_batch) == (125, 12, 16)
    assert plan.epoch_of(125) == pytest.approx(2.0) and plan.evaluates and plan.best_metric == "val_loss"

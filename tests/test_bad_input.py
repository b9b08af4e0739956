"""User mistakes through the real CLI: exit code 2, one `error: ` line per problem naming the file/line or
field, no traceback, and nothing written."""

from __future__ import annotations

import base64
import json

import shlex
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import yaml

from conftest import run_cli

BOTH = ["train", "show"]


# ---------------------------------------------------------------------------------------------
# Helpers


def invoke(via: str, config: Path, *extra: str, ranks: Optional[str] = "1") -> subprocess.CompletedProcess:
    """`trainer train CONFIG --dry-run ...` or `trainer config show CONFIG ...`."""
    ranks_args = ["--num-ranks", ranks] if ranks else []
    if via == "train":
        return run_cli("train", str(config), *ranks_args, "--dry-run", *extra)
    return run_cli("config", "show", str(config), *ranks_args, *extra)


def snapshot(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def run_dir_of(config: Path) -> Path:
    return Path(yaml.safe_load(config.read_text())["run_dir"])


def assert_user_error(r: subprocess.CompletedProcess, *needles: str, problems: int = 1) -> list[str]:
    out = r.stdout + r.stderr
    assert r.returncode == 2, f"exit {r.returncode}\n{out}"
    assert "Traceback" not in out, out
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == problems, f"expected {problems} error line(s):\n{r.stderr}"
    for line in lines:
        assert line.startswith("error: "), line
    for needle in needles:
        assert needle in r.stderr, f"{needle!r} not in {r.stderr!r}"
    assert "launcher.ds_launch" not in r.stdout and "launcher.ds_runner" not in r.stdout, (
        "nothing may be launched or printed as a command"
    )
    return lines


@pytest.fixture
def check_nothing_written(tiny_config: Path, tmp_path: Path):
    """Asserts after the test that the config's run_dir was not created and no file appeared in tmp_path."""
    before = snapshot(tmp_path)
    yield
    assert not run_dir_of(tiny_config).exists(), "run_dir was created"
    new = {
        p
        for p in snapshot(tmp_path) - before
        if not any(part.startswith("made-") for part in p.relative_to(tmp_path).parts)
    }  # made by the test itself
    assert not new, f"files written: {sorted(new)}"


def edit(config: Path, text: str, name: str = "made-edited.yaml") -> Path:
    path = config.parent / name
    path.write_text(text)
    return path


def line_of(text: str, needle: str) -> int:
    """1-based number of the (single) line that contains `needle`."""
    hits = [i for i, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert len(hits) == 1, (needle, hits)
    return hits[0]


def with_value(config: Path, section: str, key: str, raw: str) -> tuple[Path, int]:
    """A copy of `config` with `section.key: raw` (the line replaced or added); returns it and the key's line."""
    lines = config.read_text().splitlines()
    start = lines.index(f"{section}:")
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")), len(lines))
    for i in range(start + 1, end):
        if lines[i].strip().startswith(f"{key}:"):
            lines[i] = f"  {key}: {raw}"
            break
    else:
        lines.insert(end, f"  {key}: {raw}")
    text = "\n".join(lines) + "\n"
    path = edit(config, text)
    return path, line_of(text, f"  {key}: {raw}")


pytestmark = pytest.mark.usefixtures("check_nothing_written")


# ---------------------------------------------------------------------------------------------
# The config file


@pytest.mark.parametrize("via", BOTH)
def test_unknown_key_names_file_line_and_key(tiny_config: Path, via: str) -> None:
    path, line = with_value(tiny_config, "optim", "warmup_stepz", "5")
    assert_user_error(invoke(via, path), f"{path.name}:{line}:", "optim.warmup_stepz", "unknown key")


@pytest.mark.parametrize("via", BOTH)
def test_unknown_top_level_key(tiny_config: Path, via: str) -> None:
    text = tiny_config.read_text() + "epochs: 3\n"
    path = edit(tiny_config, text)
    assert_user_error(invoke(via, path), f"{path.name}:{line_of(text, 'epochs')}:", "epochs", "unknown key")


@pytest.mark.parametrize("via", BOTH)
def test_unknown_key_via_set(tiny_config: Path, via: str) -> None:
    assert_user_error(
        invoke(via, tiny_config, "--set", "optim.lrr=0.1"), "--set optim.lrr=0.1", "optim.lrr", "unknown key"
    )


@pytest.mark.parametrize("via", BOTH)
def test_wrong_type_in_file(tiny_config: Path, via: str) -> None:
    path, line = with_value(tiny_config, "train", "micro_batch_size", "eight")
    assert_user_error(invoke(via, path), f"{path.name}:{line}:", "train.micro_batch_size", "'eight'")


@pytest.mark.parametrize("via", BOTH)
@pytest.mark.parametrize(
    "sets,field,says",
    [
        (["model.num_heads=5"], "model.num_heads", "5 does not divide hidden_size 64"),
        (["model.hidden_size=48"], "model.hidden_size", "head size 12, whose rotary part"),
        (["model.num_layers=0"], "model.num_layers", "greater than or equal to 1"),
    ],
)
def test_model_sizes_that_cannot_be_built(tiny_config: Path, via: str, sets: list[str], field: str, says: str) -> None:
    """Sizes over the preset are checked before anything starts: one line naming the field and what is wrong."""
    args = [a for s in sets for a in ("--set", s)]
    assert_user_error(invoke(via, tiny_config, *args), f"--set {sets[0]}", field, says)


@pytest.mark.parametrize("via", BOTH)
def test_wrong_type_via_set(tiny_config: Path, via: str) -> None:
    assert_user_error(
        invoke(via, tiny_config, "--set", "train.max_steps=many"),
        "--set train.max_steps=many",
        "train.max_steps",
        "'many'",
    )


@pytest.mark.parametrize("via", BOTH)
def test_wrong_choice_in_file(tiny_config: Path, via: str) -> None:
    path, line = with_value(tiny_config, "train", "precision", "fp8")
    assert_user_error(invoke(via, path), f"{path.name}:{line}:", "train.precision", "'fp8'")


@pytest.mark.parametrize("via", BOTH)
def test_micro_batch_size_zero_in_file(tiny_config: Path, via: str) -> None:
    path, line = with_value(tiny_config, "train", "micro_batch_size", "0")
    assert_user_error(invoke(via, path), f"{path.name}:{line}:", "train.micro_batch_size", "greater than or equal to 1")


@pytest.mark.parametrize("via", BOTH)
def test_micro_batch_size_zero_via_flag(tiny_config: Path, via: str) -> None:
    assert_user_error(
        invoke(via, tiny_config, "--batch-size", "0"),
        "--batch-size 0",
        "train.micro_batch_size",
        "greater than or equal to 1",
    )


@pytest.mark.parametrize("via", BOTH)
def test_negative_learning_rate_via_set(tiny_config: Path, via: str) -> None:
    assert_user_error(
        invoke(via, tiny_config, "--set", "optim.lr=-0.1"), "--set optim.lr=-0.1", "optim.lr", "greater than 0"
    )


@pytest.mark.parametrize("via", BOTH)
def test_global_batch_size_inconsistent_with_world(tiny_config: Path, via: str) -> None:
    train = yaml.safe_load(tiny_config.read_text())["train"]
    per_rank = train["micro_batch_size"] * train.get("grad_accum", 1)
    # right for one rank, wrong for the two ranks asked for
    path, _ = with_value(tiny_config, "train", "global_batch_size", str(per_rank))
    assert_user_error(invoke(via, path, ranks="2"), path.name, "train.global_batch_size", str(2 * per_rank))


@pytest.mark.parametrize("via", BOTH)
def test_deepspeed_train_batch_size_override_inconsistent(tiny_config: Path, via: str) -> None:
    assert_user_error(
        invoke(via, tiny_config, "--set", "deepspeed.overrides.train_batch_size=99"), "train_batch_size", "99"
    )


@pytest.mark.parametrize("via", BOTH)
def test_bf16_and_fp16_both_enabled(tiny_config: Path, via: str) -> None:
    r = invoke(
        via,
        tiny_config,
        "--set",
        "deepspeed.overrides.bf16.enabled=true",
        "--set",
        "deepspeed.overrides.fp16.enabled=true",
    )
    assert_user_error(r, "bf16", "fp16", "both")


@pytest.mark.parametrize("via", BOTH)
def test_warmup_longer_than_max_steps_in_file(tiny_config: Path, via: str) -> None:
    path, _ = with_value(tiny_config, "optim", "warmup_steps", "100000")
    assert_user_error(invoke(via, path), path.name, "optim.warmup_steps", "100000")


@pytest.mark.parametrize("via", BOTH)
def test_warmup_longer_than_max_steps_via_flags(tiny_config: Path, via: str) -> None:
    assert_user_error(
        invoke(via, tiny_config, "--set", "optim.warmup_steps=5", "--max-steps", "3"), "optim.warmup_steps"
    )


@pytest.mark.parametrize("via", BOTH)
def test_missing_config_file(tmp_path: Path, via: str) -> None:
    missing = tmp_path / "nope.yaml"
    assert_user_error(invoke(via, missing), str(missing), "not found")
    assert not missing.exists()


@pytest.mark.parametrize("via", BOTH)
def test_empty_config_file(tmp_path: Path, via: str) -> None:
    path = tmp_path / "made-empty.yaml"
    path.write_text("# to do\n")
    assert_user_error(invoke(via, path), f"{path}: the config file is empty")


@pytest.mark.parametrize("via", BOTH)
def test_invalid_yaml_reports_line(tiny_config: Path, via: str) -> None:
    text = tiny_config.read_text() + "extra: key: value\n"
    path = edit(tiny_config, text)
    assert_user_error(invoke(via, path), f"{path.name}:{line_of(text, 'extra: key: value')}:", "invalid YAML")


@pytest.mark.parametrize("via", BOTH)
def test_yaml_that_is_not_a_mapping(tiny_config: Path, via: str) -> None:
    path = edit(tiny_config, "- just\n- a list\n")
    assert_user_error(invoke(via, path), f"{path.name}:1:", "mapping")


@pytest.mark.parametrize("via", BOTH)
def test_set_without_equals(tiny_config: Path, via: str) -> None:
    assert_user_error(invoke(via, tiny_config, "--set", "optim.lr"), "--set optim.lr", "KEY=VALUE")


@pytest.mark.parametrize("via", BOTH)
def test_set_into_a_non_section(tiny_config: Path, via: str) -> None:
    assert_user_error(
        invoke(via, tiny_config, "--set", "train.max_steps.x=1"), "--set train.max_steps.x=1", "max_steps"
    )


@pytest.mark.parametrize("via", BOTH)
def test_unknown_template_name(tiny_config: Path, via: str) -> None:
    lines = assert_user_error(
        invoke(via, tiny_config, "--set", "deepspeed.template=zero9"), "deepspeed.template", "zero9"
    )
    assert "zero2" in lines[0] and "zero3_offload" in lines[0]  # lists what exists


@pytest.mark.parametrize("via", BOTH)
def test_missing_template_json_path(tiny_config: Path, tmp_path: Path, via: str) -> None:
    missing = tmp_path / "nope.json"
    assert_user_error(
        invoke(via, tiny_config, "--set", f"deepspeed.template={missing}"), "deepspeed.template", str(missing)
    )


@pytest.mark.parametrize("via", BOTH)
def test_each_problem_is_its_own_error_line(tiny_config: Path, via: str) -> None:
    text = tiny_config.read_text().replace("\noptim:\n", "\noptim:\n  lrr: 1\n  betaz: 2\n", 1)
    path = edit(tiny_config, text)
    assert_user_error(
        invoke(via, path),
        f"{path.name}:{line_of(text, 'lrr')}: optim.lrr",
        f"{path.name}:{line_of(text, 'betaz')}: optim.betaz",
        problems=2,
    )


@pytest.mark.parametrize("via", BOTH)
def test_every_problem_of_a_file_is_reported(tiny_config: Path, via: str) -> None:
    """All problems of a file come in one pass (one line each), not one per attempt."""
    text = tiny_config.read_text().replace("\noptim:\n", "\noptim:\n  lrr: 1\n  betaz: 2\n", 1)
    path = edit(tiny_config, text)
    r = invoke(via, path)
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, r.stderr
    assert any(f"{path.name}:{line_of(text, 'lrr')}: optim.lrr" in line for line in lines)
    assert any(f"{path.name}:{line_of(text, 'betaz')}: optim.betaz" in line for line in lines)


# ---------------------------------------------------------------------------------------------
# Data (checked by `trainer train` only)


def test_missing_shard_folder(tiny_config: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-shards"
    assert_user_error(
        invoke("train", tiny_config, "--set", f"data.path={missing}"), "data.path", str(missing), "does not exist"
    )
    assert not missing.exists()


def test_empty_shard_folder(tiny_config: Path, tmp_path: Path) -> None:
    empty = tmp_path / "made-empty"
    empty.mkdir()
    (empty / "made-README.txt").write_text("not a shard")
    assert_user_error(
        invoke("train", tiny_config, "--set", f"data.path={empty}"), "data.path", str(empty), "no .npy or .npz"
    )


@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_shard_with_token_id_outside_vocab(tiny_config: Path, tmp_path: Path, fmt: str) -> None:
    folder = tmp_path / "made-bad-shards"
    folder.mkdir()
    rng = np.random.default_rng(0)
    good = rng.integers(0, 512, size=5000, dtype=np.int64)
    bad = rng.integers(0, 512, size=5000, dtype=np.int64)
    bad[1234] = 600
    for name, arr in (("made-shard_00000", good), ("made-shard_00001", bad)):
        if fmt == "npy":
            np.save(folder / f"{name}.npy", arr)
        else:
            np.savez(folder / f"{name}.npz", tokens=arr)
    r = invoke("train", tiny_config, "--set", f"data.path={folder}", "--set", "model.vocab_size=512")
    assert_user_error(r, f"made-shard_00001.{fmt}", "600", "1234", "512")
    assert "made-shard_00000" not in r.stderr


def test_shard_that_is_not_a_numpy_file(tiny_config: Path, tmp_path: Path) -> None:
    folder = tmp_path / "made-junk-shards"
    folder.mkdir()
    (folder / "made-shard_00000.npy").write_text("hello, not numpy")
    assert_user_error(invoke("train", tiny_config, "--set", f"data.path={folder}"), "made-shard_00000.npy")


def test_shard_too_small_for_one_window(tiny_config: Path, tmp_path: Path) -> None:
    folder = tmp_path / "made-small-shards"
    folder.mkdir()
    np.save(folder / "made-shard_00000.npy", np.arange(10, dtype=np.int64))
    assert_user_error(invoke("train", tiny_config, "--set", f"data.path={folder}"), "data.path", "seq_len")


# ---------------------------------------------------------------------------------------------
# Hostfiles


@pytest.mark.parametrize("via", BOTH)
def test_malformed_hostfile_line(tiny_config: Path, tmp_path: Path, via: str) -> None:
    hostfile = tmp_path / "made-hostfile"
    hostfile.write_text("# workers\nlocalhost slots=1\n\nworker-2 slots two\n")
    assert_user_error(invoke(via, tiny_config, "--hostfile", str(hostfile), ranks=None), f"{hostfile}:4:", "slots two")


@pytest.mark.parametrize("via", BOTH)
def test_hostfile_zero_slots(tiny_config: Path, tmp_path: Path, via: str) -> None:
    hostfile = tmp_path / "made-hostfile"
    hostfile.write_text("worker-1 slots=2\nworker-2 slots=0\n")
    assert_user_error(invoke(via, tiny_config, "--hostfile", str(hostfile), ranks=None), f"{hostfile}:2:", "worker-2")


@pytest.mark.parametrize("via", BOTH)
def test_duplicate_hosts(tiny_config: Path, tmp_path: Path, via: str) -> None:
    hostfile = tmp_path / "made-hostfile"
    hostfile.write_text("worker-1 slots=2\nworker-2 slots=2  # second\nworker-1 slots=4\n")
    assert_user_error(
        invoke(via, tiny_config, "--hostfile", str(hostfile), ranks=None),
        f"{hostfile}:3:",
        "duplicate",
        "worker-1",
        "line 1",
    )


@pytest.mark.parametrize("via", BOTH)
def test_missing_hostfile(tiny_config: Path, tmp_path: Path, via: str) -> None:
    hostfile = tmp_path / "no-hostfile"
    assert_user_error(invoke(via, tiny_config, "--hostfile", str(hostfile), ranks=None), str(hostfile), "not found")


def test_hostfile_and_num_ranks_together(tiny_config: Path, tmp_path: Path) -> None:
    hostfile = tmp_path / "made-hostfile"
    hostfile.write_text("localhost slots=1\n")
    assert_user_error(invoke("train", tiny_config, "--hostfile", str(hostfile), ranks="1"), "--hostfile", "--num-ranks")


# ---------------------------------------------------------------------------------------------
# Resume


def test_resume_tag_that_does_not_exist(tiny_config: Path) -> None:
    assert_user_error(
        invoke("train", tiny_config, "--resume", "step-00000999"), "--resume step-00000999", "no committed checkpoint"
    )


def test_resume_latest_without_checkpoints(tiny_config: Path) -> None:
    assert_user_error(invoke("train", tiny_config, "--resume", "latest"), "--resume latest", "no committed checkpoint")


def test_resume_partial_checkpoint_folder(tiny_config: Path, tmp_path: Path) -> None:
    partial = tmp_path / "made-partial" / "checkpoints" / "step-00000010"
    partial.mkdir(parents=True)
    assert_user_error(
        invoke("train", tiny_config, "--resume", str(partial)), str(partial), "not a committed checkpoint"
    )


# ---------------------------------------------------------------------------------------------
# Valid input


def test_dry_run_with_valid_input_prints_the_launcher_command(tiny_config: Path) -> None:
    r = invoke("train", tiny_config, "--set", "optim.lr=0.001", "--max-steps", "7")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert "error" not in r.stderr
    assert "world size 1" in r.stdout
    # one machine: DeepSpeed's per-node launcher, with the --world_info its runner would have given it
    command_line = next(line for line in r.stdout.splitlines() if "trainer.launcher.ds_launch" in line)
    cmd = shlex.split(command_line)
    for needle in ("--master_addr=127.0.0.1", "launch/train.py"):
        assert needle in command_line, needle
    world = next(a.split("=", 1)[1] for a in cmd if a.startswith("--world_info="))
    assert json.loads(base64.urlsafe_b64decode(world)) == {"localhost": [0]}
    assert cmd[cmd.index("--config") + 1] == str(tiny_config)
    assert cmd[cmd.index("--set") + 1] == "optim.lr=0.001"
    assert cmd[cmd.index("--max-steps") + 1] == "7"
    assert int(next(a.split("=", 1)[1] for a in cmd if a.startswith("--master_port="))) > 0


def test_dry_run_across_nodes_prints_the_deepspeed_runner_command(tiny_config: Path, tmp_path: Path) -> None:
    """Several hosts: DeepSpeed's runner (pdsh and ssh), with secret values masked in its log; port 29500 on every
    node. With --node-rank: that node's launcher only, on the same port."""
    hostfile = tmp_path / "made-hostfile"
    hostfile.write_text("gpu-node-1 slots=2\ngpu-node-2 slots=2\n")
    r = invoke("train", tiny_config, "--hostfile", str(hostfile), ranks=None)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "world size 4 on 2 host(s)" in r.stdout
    cmd = shlex.split(next(line for line in r.stdout.splitlines() if "trainer.launcher.ds_runner" in line))
    assert cmd[cmd.index("--hostfile") + 1] == str(hostfile) and cmd[cmd.index("--master_port") + 1] == "29500"
    r = invoke(
        "train", tiny_config, "--hostfile", str(hostfile), "--node-rank", "1", "--master-addr", "gpu-node-1", ranks=None
    )
    assert r.returncode == 0, r.stdout + r.stderr
    cmd = shlex.split(next(line for line in r.stdout.splitlines() if "trainer.launcher.ds_launch" in line))
    for needle in ("--node_rank=1", "--master_addr=gpu-node-1", "--master_port=29500"):
        assert needle in cmd, needle


def test_dry_run_world_size_from_num_ranks(tiny_config: Path) -> None:
    r = invoke("train", tiny_config, ranks="2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "world size 2 on 1 host(s)" in r.stdout


# ---------------------------------------------------------------------------------------------
# Validation data and the run's length


@pytest.mark.parametrize("via", BOTH)
def test_epochs_and_max_steps_both_in_the_file(tiny_config: Path, via: str, check_nothing_written: None) -> None:
    path, line = with_value(tiny_config, "train", "epochs", "2")
    assert_user_error(invoke(via, path), f"{path.name}:", "train", "max_steps and epochs: give one")


def test_epochs_flag_replaces_max_steps_of_the_file(tiny_config: Path) -> None:
    r = invoke("show", tiny_config, "--num-epochs", "2", "--json")
    assert r.returncode == 0, r.stderr
    import json

    train = json.loads(r.stdout)["train"]
    assert train["epochs"] == 2 and train["max_steps"] is None


def test_both_length_flags_are_one_error(tiny_config: Path, check_nothing_written: None) -> None:
    assert_user_error(
        invoke("train", tiny_config, "--max-steps", "5", "--num-epochs", "1"), "--max-steps and --num-epochs"
    )


def test_missing_val_path_is_named_before_launch(
    tiny_config: Path, tmp_path: Path, check_nothing_written: None
) -> None:
    missing = tmp_path / "no-such-val"
    path, _ = with_value(tiny_config, "data", "val_fraction", "null")
    path, _ = with_value(path, "data", "val_path", str(missing))
    assert_user_error(invoke("train", path), "data.val_path", str(missing), "does not exist")


def test_val_set_smaller_than_one_eval_batch(tiny_config: Path, tmp_path: Path, check_nothing_written: None) -> None:
    val = tmp_path / "made-val"
    val.mkdir()
    np.save(val / "v.npy", np.arange(3 * 128 + 1, dtype=np.int32) % 500)  # 3 windows; micro batch 8 x 2 ranks = 16
    path, _ = with_value(tiny_config, "data", "val_fraction", "null")
    path, _ = with_value(path, "data", "val_path", str(val))
    assert_user_error(
        invoke("train", path, ranks="2"),
        "data.val_path",
        "3 validation sample(s), fewer than one evaluation batch",
        "micro_batch_size 8 x 2 rank(s) = 16",
    )


def test_val_fraction_and_val_path_together(tiny_config: Path, tiny_shards: Path, check_nothing_written: None) -> None:
    path, _ = with_value(tiny_config, "data", "val_path", str(tiny_shards))
    assert_user_error(invoke("train", path), "data", "val_path and val_fraction: give one")


def test_best_metric_val_loss_without_validation_data(tiny_config: Path, check_nothing_written: None) -> None:
    path, _ = with_value(tiny_config, "data", "val_fraction", "null")
    path, _ = with_value(path, "checkpoint", "best_metric", "val_loss")
    assert_user_error(invoke("train", path), "checkpoint.best_metric val_loss: this run has no validation data")


@pytest.mark.parametrize(
    "section,key,raw",
    [
        ("eval", "every", "0"),
        ("eval", "every", "epochs"),
        ("checkpoint", "save_every", "-5"),
        ("checkpoint", "save_every", "true"),
    ],
)
def test_a_bad_cadence_is_one_line_naming_the_field(
    tiny_config: Path, section: str, key: str, raw: str, check_nothing_written: None
) -> None:
    path, line = with_value(tiny_config, section, key, raw)
    assert_user_error(
        invoke("train", path), f"{path.name}:{line}: {section}.{key}: expected a number of steps >= 1, or `epoch`"
    )

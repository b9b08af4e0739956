"""What `trainer train` forwards to the ranks of other nodes, and what DeepSpeed's runner may not print."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from trainer.errors import UserError
from trainer.launcher.remote_env import forwarded, mask, secret_values, write_env_file


def test_the_settings_ranks_need_are_forwarded_and_nothing_else() -> None:
    env = {
        "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9023",
        "GOOGLE_APPLICATION_CREDENTIALS": "/keys/sa.json",
        "MLFLOW_TRACKING_URI": "https://mlflow:5000",
        "TRAINER_LOG_LEVEL": "DEBUG",
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "HOME": "/root",
        "PATH": "/usr/bin",
        "SSH_AUTH_SOCK": "/tmp/agent",
        "EMPTY": "",
        "NCCL_DEBUG": "INFO",
        "OMP_NUM_THREADS_X": "no",
        "TRAINER_SHARDS_CHECKED": "1",
    }
    out = forwarded(env)  # (this machine's data check says nothing about another node's copy of the data)
    assert set(out) == {
        "STORAGE_EMULATOR_HOST",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "MLFLOW_TRACKING_URI",
        "TRAINER_LOG_LEVEL",
        "DS_ACCELERATOR",
        "OMP_NUM_THREADS",
        "NCCL_DEBUG",
    }


def test_env_file_is_private_and_the_users_own_lines_come_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("DS_ENV_FILE", raising=False)
    (home / ".deepspeed_env").write_text("NCCL_IB_DISABLE=1\n\n")
    (work / ".deepspeed_env").write_text("OMP_NUM_THREADS=4\n")
    path = write_env_file({"OMP_NUM_THREADS": "1", "STORAGE_EMULATOR_HOST": "http://h:1"}, cwd=work)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        # the runner reads the lines in order, later ones win: the user's file has the last word
        assert (
            path.read_text()
            == "STORAGE_EMULATOR_HOST=http://h:1\nOMP_NUM_THREADS=1\nNCCL_IB_DISABLE=1\nOMP_NUM_THREADS=4\n"
        )
    finally:
        path.unlink()
    (work / ".deepspeed_env").write_text("JUST_A_NAME\n")
    with pytest.raises(UserError, match=r"\.deepspeed_env:1: expected NAME=VALUE"):
        write_env_file({}, cwd=work)


@pytest.mark.parametrize("value", ['pa$$"word', "50%nodes", "a\\b", "two\nlines"])
def test_a_value_the_remote_shell_or_pdsh_would_mangle_is_refused_by_name_without_showing_it(value: str) -> None:
    with pytest.raises(UserError) as exc:  # (pdsh itself rewrites %n, %h, %u and %%)
        write_env_file({"MLFLOW_TRACKING_PASSWORD": value})
    assert "MLFLOW_TRACKING_PASSWORD" in str(exc.value) and value not in str(exc.value)


def test_secret_values_are_masked_in_the_runners_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from trainer.launcher.ds_runner import _Mask

    env_file = tmp_path / "env"
    env_file.write_text("AWS_SECRET_ACCESS_KEY=abc123xyz\nPLAIN=visible\n")
    env = {
        "MLFLOW_TRACKING_PASSWORD": "hunter2hunter",
        "MLFLOW_TRACKING_URI": "https://user:tok3n@mlflow.example",
        "STORAGE_EMULATOR_HOST": "http://127.0.0.1:1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_TOKEN": " hf_x9 ",
    }
    values = secret_values(env, [env_file])
    assert set(values) == {"hunter2hunter", "https://user:tok3n@mlflow.example", "abc123xyz", " hf_x9 ", "hf_x9"}
    logger = logging.getLogger("test-ds-runner")
    logger.addFilter(_Mask(values))
    with caplog.at_level(logging.INFO, logger="test-ds-runner"):
        logger.info(
            "cmd = pdsh export %s; export %s; export %s; export PLAIN=visible",
            "MLFLOW_TRACKING_PASSWORD=hunter2hunter",
            'MLFLOW_TRACKING_URI="https://user:tok3n@mlflow.example"',
            "AWS_SECRET_ACCESS_KEY=abc123xyz",
        )
    text = caplog.text
    assert "hunter2" not in text and "tok3n" not in text and "abc123" not in text
    assert "MLFLOW_TRACKING_PASSWORD=***" in text and "PLAIN=visible" in text
    assert mask("a b", ["", "b"]) == "a ***"

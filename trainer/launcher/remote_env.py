"""What the ranks on other nodes need from this shell's environment, and keeping secrets out of the logs.

DeepSpeed's runner starts every node's launcher through pdsh and ssh, so a rank sees sshd's environment plus
what the runner exports: variables whose names start with MLFLOW, PYTHON, MV2 or UCX (and NCCL on CUDA), and
the lines of `.deepspeed_env` (in the home folder, then the working folder; `DS_ENV_FILE` renames that file).
`trainer train` writes the variables below that are set here into a private env file for the runner (after
the user's own `.deepspeed_env` lines, which keep precedence), so a remote rank sees the emulator, the
credentials file, the tracking server and the CPU settings. The runner logs its pdsh command with every
exported value: `ds_runner` masks the secret ones.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Mapping

from trainer.errors import UserError

FORWARDED = (
    "STORAGE_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
    "CLOUDSDK_CORE_PROJECT",
    "DS_ACCELERATOR",
    "OMP_NUM_THREADS",
    "TORCH_EXTENSIONS_DIR",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "CUDA_DEVICE_MAX_CONNECTIONS",
    "PYTORCH_CUDA_ALLOC_CONF",
)
FORWARDED_PREFIXES = ("TRAINER_", "MLFLOW_", "NCCL_", "GLOO_")
NOT_FORWARDED = ("TRAINER_SHARDS_CHECKED",)  # this machine's own data check says nothing of another node's copy
# names whose values are secrets: masked wherever the runner would print them
_SECRET_NAME = re.compile(
    r"(^|_)(PASSWORD|PASSWD|PASS|TOKEN|SECRET|KEY|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?|AUTH"
    r"|CONNECTION_STRING)(_|$)",
    re.IGNORECASE,
)
_URL_SECRET = re.compile(r"//[^/@\s]+@|[?&](token|key|sig|signature|password|secret)=", re.IGNORECASE)
# The runner puts a value with other characters in double quotes, where the remote shell would expand these; pdsh
# itself rewrites %n, %h, %u and %% in the command it runs.
_UNSAFE = re.compile(r'["$`\\\n%]')
ENV_FILE_NAME = ".deepspeed_env"


def forwarded(env: Mapping[str, str]) -> dict[str, str]:
    """The variables of `env` that the ranks on every node need, in a stable order."""
    out = {k: env[k] for k in FORWARDED if env.get(k)}
    out.update({k: v for k, v in sorted(env.items()) if k.startswith(FORWARDED_PREFIXES) and k not in out})
    return {k: v for k, v in out.items() if k not in NOT_FORWARDED}


def is_secret(name: str, value: str) -> bool:
    return bool(_SECRET_NAME.search(name) or _URL_SECRET.search(value))


def user_env_files(cwd: Path | None = None) -> list[Path]:
    """The `.deepspeed_env` files the runner reads, in its order (home, then the working folder)."""
    name = os.environ.get("DS_ENV_FILE", ENV_FILE_NAME)
    out = []
    for folder in (Path.home(), cwd or Path.cwd()):
        path = folder / name
        if path.is_file() and path.resolve() not in {p.resolve() for p in out}:
            out.append(path)
    return out


def write_env_file(env: Mapping[str, str], cwd: Path | None = None) -> Path:
    """A private (0600) env file for the runner: the forwarded variables, then the user's `.deepspeed_env` lines.

    A value the runner cannot pass through the remote shell intact is a user error naming the variable."""
    lines = []
    for name, value in forwarded(env).items():
        if _UNSAFE.search(value):
            raise UserError(
                f'environment variable {name}: its value holds a character (" $ ` \\ % or a newline) that the'
                " deepspeed runner and pdsh cannot pass to the other nodes intact; set it on each node instead"
            )
        lines.append(f"{name}={value}")
    for path in user_env_files(cwd):
        for number, raw in enumerate(path.read_text().splitlines(), start=1):
            if not raw.strip():
                continue  # the runner itself fails on a blank line; ours is written without them
            if "=" not in raw:
                raise UserError(f"{path}:{number}: expected NAME=VALUE (the deepspeed runner reads every line so)")
            lines.append(raw.strip())
    fd, name = tempfile.mkstemp(prefix="trainer-deepspeed-env-")
    with os.fdopen(fd, "w") as f:  # mkstemp: mode 0600, only this user reads the values
        f.write("".join(line + "\n" for line in lines))
    return Path(name)


def secret_values(env: Mapping[str, str], env_files: list[Path]) -> list[str]:
    """The values, among this environment and the env files' lines, that must not be printed."""
    pairs = list(env.items())
    for path in env_files:
        if path.is_file():
            pairs += [tuple(line.strip().split("=", 1)) for line in path.read_text().splitlines() if "=" in line]  # type: ignore[misc]
    values = {v for k, v in pairs if v and is_secret(k, v)}
    return sorted(values | {v.strip() for v in values if v.strip()})  # (the runner strips what it exports)


def mask(text: str, values: list[str]) -> str:
    """`text` with every secret value (as given, or as the runner quoted it) replaced by ***."""
    for value in sorted(values, key=len, reverse=True):
        if value:
            text = text.replace(value, "***")
    return text

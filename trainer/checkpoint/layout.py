"""The names and small records of a checkpoint, shared by the store, the engine, the catalog and the uploader.

A checkpoint is the folder `<run_dir>/<run_id>/checkpoints/step-NNNNNNNN/`:

    metadata.json              written LAST, atomically: the checkpoint exists (committed)
    upload_state.json          where its upload stands (one `UploadState`), read by any process
    rng_state_rankNNNNN.pt     each rank's RNG states
    config.yaml, ds_config.json, and DeepSpeed's own files

In a bucket it is the prefix `<run_id>/<tag>/` with tar parts and `manifest.json`, written last.
Only this module names these files; `checkpoint/` imports nothing from `upload/`.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
from pathlib import Path
from typing import Any, Optional

METADATA = "metadata.json"
METADATA_FORMAT = 1
TAG_PREFIX = "step-"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
UPLOAD_STATE_FILE = "upload_state.json"
MB = 1024 * 1024


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def step_of(tag: str) -> Optional[int]:
    """The step of a checkpoint tag (`tag_for`'s inverse); None for a name that is not one."""
    rest = tag.removeprefix(TAG_PREFIX)
    return int(rest) if rest != tag and rest.isdigit() else None


class CheckpointFacts:
    """What every view of a committed checkpoint reads from its metadata.json: a local folder (`store.Checkpoint`)
    and a catalog entry, local or in a bucket (`catalog.Entry`). Subclasses hold `metadata`."""

    metadata: dict

    @property
    def run_id(self) -> str:
        return str(self.metadata["run_id"])

    @property
    def step(self) -> int:
        return int(self.metadata["step"])

    @property
    def tag(self) -> str:
        return str(self.metadata.get("tag") or tag_for(self.step))

    @property
    def loss(self) -> Optional[float]:
        v = self.metadata.get("loss")
        return float(v) if v is not None else None


def rng_file_name(rank: int) -> str:
    return f"rng_state_rank{rank:05d}.pt"


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def remote_prefix(meta: dict) -> str:
    """Where a checkpoint lives under an upload URL: `<run_id>/<tag>`."""
    return f"{meta['run_id']}/{meta.get('tag') or tag_for(int(meta['step']))}"


class UploadState(str, enum.Enum):
    """Where a committed checkpoint's upload stands (`upload_state.json`)."""

    LOCAL = "local"  # never queued (no upload.url), or a state file that cannot be read
    PENDING = "pending"  # queued
    UPLOADING = "uploading"
    UPLOADED = "uploaded"  # every part and the manifest verified in the bucket
    FAILED = "failed"  # with `error`: the reason (an interrupted upload starts with "interrupted")

    def __str__(self) -> str:
        return self.value

    @property
    def word(self) -> str:
        """How the CLI and the monitor say it."""
        return {"local": "local only", "pending": "queued", "failed": "FAILED"}.get(self.value, self.value)


def read_upload_state(ckpt_dir: Path) -> dict:
    """The upload state record of a checkpoint folder; `{"state": "local"}` when there is none."""
    try:
        data = json.loads((Path(ckpt_dir) / UPLOAD_STATE_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return {"state": UploadState.LOCAL.value}
    return data if isinstance(data, dict) and "state" in data else {"state": UploadState.LOCAL.value}


def write_upload_state(ckpt_dir: Path, state: UploadState, **fields: Any) -> dict:
    """Record `state` (atomically) in the checkpoint folder, if the folder still exists."""
    from trainer.checkpoint.store import atomic_write

    data = {"state": UploadState(state).value, "updated_at": utc_now(), **fields}
    if Path(ckpt_dir).is_dir():
        atomic_write(Path(ckpt_dir) / UPLOAD_STATE_FILE, json.dumps(data, indent=2) + "\n")
    return data


def is_uploaded(ckpt_dir: Path) -> bool:
    return read_upload_state(ckpt_dir).get("state") == UploadState.UPLOADED.value


def upload_wording(state: dict) -> str:
    """How a checkpoint's upload state reads in a log line: `uploaded`, `upload FAILED`, `not uploaded`, ..."""
    s = str(state.get("state"))
    if s == UploadState.FAILED.value:
        return (
            "upload interrupted"
            if str(state.get("error", "")).startswith("interrupted")
            else f"upload {UploadState.FAILED.word}"
        )
    if s == UploadState.LOCAL.value:
        return "not uploaded"
    try:
        return UploadState(s).word
    except ValueError:  # a state this version does not know: as written
        return s

"""Process-group helpers: rank info from the launcher's environment, init, and small collectives."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable, TypeVar

from trainer.errors import UserError
from trainer.ranks import RankInfo

T = TypeVar("T")


def init_distributed(timeout_s: float = 600) -> None:
    """Join the process group (gloo on CPU, nccl on CUDA), also for a single process."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), timeout=timedelta(seconds=timeout_s), verbose=False)
    if accel.device_name() == "cpu":
        _unlink_shm_buffers()


def _unlink_shm_buffers() -> None:
    """Remove the names of DeepSpeed's CPU all-reduce buffers from /dev/shm once every rank has mapped them.

    Its shm op creates one 66 MB segment per rank and never unlinks it: every CPU run, and every
    killed one, left RAM behind until the machine ran out (a CI run died of it). The mappings stay
    valid after the unlink, and nothing is left behind however the ranks end.
    """
    barrier()  # each rank's init maps all of its peers' segments before it returns
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_{os.environ['RANK']}"
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except OSError:
        pass  # no such segment (the op is off, or ranks on several nodes)


def barrier() -> None:
    import deepspeed.comm as dist

    dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    import deepspeed.comm as dist

    if dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over all ranks (one small collective)."""
    return _all_reduce(values, "SUM")


def all_reduce_max(values: list[float]) -> list[float]:
    """The largest value of each float over all ranks (one small collective)."""
    return _all_reduce(values, "MAX")


def _all_reduce(values: list[float], op: str) -> list[float]:
    import torch
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    t = torch.tensor(values, dtype=torch.float64, device=get_accelerator().current_device_name())
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (ranks agree, e.g. on a stop step)."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def on_main_then_share(fn: Callable[[], T], info: RankInfo) -> T:
    """Run `fn` on rank 0 and give its result (or its `UserError`) to every rank.

    Used for checks and decisions that must be taken once and agreed on: a bad shard found by
    rank 0 stops every rank with the same one-line error instead of leaving the others waiting.
    """
    result: tuple[str, Any] = ("ok", None)
    if info.is_main:
        try:
            result = ("ok", fn())
        except UserError as exc:
            result = ("user_error", (type(exc), exc.message))
    result = broadcast_object(result)
    if result[0] == "user_error":
        kind, message = result[1]
        raise kind(message, shared=True)
    return result[1]


def agree(fn: Callable[[], None], run_here: bool) -> None:
    """Run `fn` where `run_here`, then make every rank raise the first `UserError` any rank hit.

    For per-node work (downloads) whose failure on one node must stop all nodes, not leave the
    others waiting in the next collective.
    """
    import deepspeed.comm as dist

    error = None
    if run_here:
        try:
            fn()
        except UserError as exc:
            error = exc.message
    if dist.get_world_size() > 1:
        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise UserError(error, shared=True)

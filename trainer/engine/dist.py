"""Process-group helpers: rank info from the launcher's environment, init, and small collectives."""

from __future__ import annotations

import itertools
import os
import time
from datetime import timedelta
from typing import Any, Callable, Sequence, TypeVar

from trainer.errors import UserError
from trainer.log import get_logger
from trainer.ranks import RankInfo

log = get_logger("dist")

T = TypeVar("T")

# A gloo group over all ranks for the few floats the ranks agree on (a stop request, a write's state, a loss sum):
# host values, reduced on the host. On a GPU the same all-reduce through NCCL would read its result back every step,
# waiting for the step's kernels to finish and keeping the host from queuing the next step's ahead.
_HOST_GROUP: Any = None


def init_distributed(timeout_s: float = 600) -> None:
    """Join the process group (gloo on CPU, nccl on CUDA), also for a single process."""
    from deepspeed.accelerator import get_accelerator

    from trainer.dsimport import import_deepspeed

    deepspeed = import_deepspeed()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(
        dist_backend=accel.communication_backend_name(), timeout=timedelta(seconds=timeout_s), verbose=False
    )
    if accel.device_name() == "cpu":
        _unlink_shm_buffers()
    global _HOST_GROUP
    if int(os.environ["WORLD_SIZE"]) > 1:
        import torch.distributed

        _HOST_GROUP = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def _unlink_shm_buffers() -> None:
    """Remove the names of DeepSpeed's CPU all-reduce buffers from /dev/shm once every rank has mapped them.

    Its shm op creates one 66 MB segment per rank and never unlinks it: every CPU run, and every
    killed one, left RAM behind until the machine ran out (a CI run died of it). The mappings stay
    valid after the unlink, and nothing is left behind however the ranks end.
    """
    barrier()  # each rank's init maps all of its peers' segments before it returns
    env = os.environ
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env['MASTER_ADDR']}_{env['MASTER_PORT']}_{env['RANK']}"
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


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, by rank (a small picklable object)."""
    import deepspeed.comm as dist

    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over all ranks (one small collective)."""
    return _all_reduce(values, "SUM")


def all_reduce_max(values: list[float]) -> list[float]:
    """The largest value of each float over all ranks (one small collective)."""
    return _all_reduce(values, "MAX")


def _all_reduce(values: list[float], op: str) -> list[float]:
    if world_size() == 1:
        return [float(v) for v in values]
    import torch
    import torch.distributed

    reduce_op = getattr(torch.distributed.ReduceOp, op)
    if _HOST_GROUP is not None:
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t, op=reduce_op, group=_HOST_GROUP)
    else:  # a process group joined without init_distributed (a tool): on its backend's device
        from deepspeed.accelerator import get_accelerator

        t = torch.tensor(values, dtype=torch.float64, device=get_accelerator().current_device_name())
        torch.distributed.all_reduce(t, op=reduce_op)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (ranks agree, e.g. on a stop step)."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def world_size() -> int:
    import deepspeed.comm as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def local_mains(info: RankInfo) -> list[int]:
    """The first rank of every node (homogeneous nodes, ranks numbered node by node)."""
    per_node = max(1, info.local_world_size)
    return list(range(0, info.world_size, per_node))


_waits = itertools.count()  # every rank makes the same sequence of waits: the n-th wait has the same keys everywhere
WAIT_LOG_EVERY_S = 30.0


def wait_for(fn: Callable[[], T], runners: Sequence[int], what: str) -> tuple[str, Any]:
    """Run `fn` on the ranks in `runners` while every rank waits for all of them, with no collective timeout.

    One rank's I/O (restoring a 20 GB checkpoint, downloading or scanning the data) can take longer
    than the process group's timeout; the other ranks would die of it in their next collective. Here
    the waiting happens on the rendezvous store instead: the runners publish `trainer.progress`
    lines, the waiting ranks log them every 30 s ("waiting 120 s for rank 0 restoring ...: 4.1 of
    6.5 GB"), and a runner that crashes is named at once instead of leaving the others hanging.

    Returns this rank's outcome: ("ok", result), ("user_error", (type, message)), or ("idle", None).
    """
    from trainer import progress

    rank, world = int(os.environ.get("RANK", "0")), world_size()
    outcome: tuple[str, Any] = ("idle", None)
    if world == 1:
        try:
            return "ok", fn()
        except UserError as exc:
            return "user_error", (type(exc), exc.message)
    store, key = _store(), f"trainer/wait/{next(_waits)}"
    if rank in runners:
        with progress.listening(lambda line: store.set(f"{key}/progress/{rank}", line)):
            try:
                outcome = ("ok", fn())
            except UserError as exc:
                outcome = ("user_error", (type(exc), exc.message))
            except BaseException as exc:
                store.set(f"{key}/done/{rank}", f"crash: {type(exc).__name__}: {str(exc)[:300]}")
                raise
        store.set(f"{key}/done/{rank}", "ok")
    started = time.monotonic()
    next_log, delay = started + WAIT_LOG_EVERY_S, 0.002
    pending = [r for r in runners if r != rank or outcome[0] == "idle"]
    while pending:
        still = []
        for r in pending:
            if not store.check([f"{key}/done/{r}"]):
                still.append(r)
            elif (done := store.get(f"{key}/done/{r}").decode()).startswith("crash: "):
                raise RuntimeError(f"rank {r} failed while {what}: {done.removeprefix('crash: ')}")
        pending = still
        if not pending:
            break
        if time.monotonic() >= next_log:
            said = [
                f"rank {r}: {store.get(f'{key}/progress/{r}').decode()}"
                for r in pending
                if store.check([f"{key}/progress/{r}"])
            ]
            log.info(
                "waiting %.0f s for %s (%s)",
                time.monotonic() - started,
                what,
                "; ".join(said) or f"rank(s) {', '.join(map(str, pending))}, no progress reported yet",
            )
            next_log += WAIT_LOG_EVERY_S
        time.sleep(delay)
        delay = min(0.5, delay * 2)
    return outcome


def _store() -> Any:
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()  # the rendezvous store every rank already holds


def on_main_then_share(fn: Callable[[], T], info: RankInfo, what: str = "rank 0") -> T:
    """Run `fn` on rank 0 and give its result (or its `UserError`) to every rank.

    Used for checks and decisions that must be taken once and agreed on: a bad shard found by
    rank 0 stops every rank with the same one-line error instead of leaving the others waiting.
    The others wait without a collective timeout however long `fn` takes (`wait_for`).
    """
    result = wait_for(fn, [0], what)
    result = broadcast_object(result if info.is_main else None)
    if result[0] == "user_error":
        kind, message = result[1]
        raise kind(message, shared=True)
    return result[1]


def agree(fn: Callable[[], None], runners: Sequence[int], what: str = "per-node work") -> None:
    """Run `fn` on the `runners` ranks, then make every rank raise the first `UserError` any rank hit.

    For per-node work (downloads) whose failure on one node must stop all nodes, not leave the
    others waiting in the next collective.
    """
    outcome = wait_for(fn, runners, what)
    error = outcome[1][1] if outcome[0] == "user_error" else None
    if world_size() > 1:
        error = next((e for e in all_gather_object(error) if e), None)
    if error:
        raise UserError(error, shared=True)

"""Per-rank entry point, started by the `deepspeed` launcher through launch/train.py.

Parses the same config flags as `trainer train` (plus the `--local_rank` the launcher injects),
runs the task's training, and maps the outcome to the documented exit codes.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

from trainer.errors import EXIT_BUG, EXIT_LINE, EXIT_PREEMPTED, EXIT_CODE_FILE_ENV, EXIT_CODE_TO_STDERR, UserError
from trainer.log import to_log_files


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launch/train.py", description="Train one rank of a run (started by the deepspeed launcher)."
    )
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override any field")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--num-epochs", type=float, help="train.epochs")
    p.add_argument("--batch-size", type=int, help="train.micro_batch_size")
    p.add_argument("--learning-rate", type=float, help="optim.lr")
    p.add_argument("--resume", help="auto | latest | TAG | RUN_ID/TAG | PATH")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main_and_exit(argv: Optional[Sequence[str]] = None) -> NoReturn:
    """`main`, then leave at once: the interpreter's teardown of a process holding the model, its
    optimizer state and the snapshot buffers takes seconds that the grace period does not have.
    Everything that matters is flushed first (logs, stdout); uploads and tracking ended in `main`."""
    _leave(main(argv))


def _leave(code: int) -> NoReturn:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


_leaving = threading.Lock()


def _stopped_while_starting(trainer: Any, reason: str) -> None:
    """A stop before the first step (the StopFlag's `leave_now`, from the signal handler or the signal-arrival
    thread, whichever runs first): nothing trained since the checkpoint being resumed, so nothing to save. Says where
    the run's checkpoints are, then leaves at once with the stop's exit code; whatever was half done (a restore, a
    conversion, a download) is a hidden staging folder that the next start removes."""
    if not _leaving.acquire(blocking=False):
        return  # the other one is leaving
    logging.getLogger("trainer.signals").warning(
        "stop requested (%s) while the job was starting: nothing trained yet,"
        " nothing to save; leaving now (run the same command to start again)",
        reason,
    )
    try:
        trainer.say_where_checkpoints_are()
        from trainer.engine.signals import reap_sibling_ranks_later

        reap_sibling_ranks_later()  # (one stuck in a collective with this rank would otherwise hold the node 30 s)
    except Exception:  # never let a report keep a stopped job from leaving
        pass
    _leave(_epilogue(EXIT_PREEMPTED))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return _epilogue(_main(argv))


def _epilogue(code: int) -> int:
    """The exit code in this node's log and, from rank 0, where the launcher reads it."""
    to_log_files(
        logging.INFO if code in (0, 75) else logging.WARNING,
        f"rank {os.environ.get('RANK', '0')} exits with code {code}",
    )
    code_file = os.environ.get(EXIT_CODE_FILE_ENV)
    if code_file and int(os.environ.get("RANK", "0")) == 0:
        try:
            if code_file == EXIT_CODE_TO_STDERR:  # a multi-node job over ssh: the line comes back through pdsh
                print(EXIT_LINE.format(code=code), file=sys.stderr, flush=True)
            else:
                Path(code_file).write_text(f"{code}\n")
        except OSError:
            pass
    return code


def _main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from trainer.config.load import Overrides, load_config
    from trainer.log import setup_logging

    setup_logging()
    trainer = None
    try:
        overrides = Overrides(
            sets=args.sets,
            max_steps=args.max_steps,
            epochs=args.num_epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            resume=args.resume,
        )
        cfg = load_config(args.config, overrides)
        from trainer.engine.loop import Trainer
        from trainer.tasks import build_task

        trainer = Trainer(cfg, build_task(cfg), source=args.config)
        trainer.stop.leave_now = functools.partial(_stopped_while_starting, trainer)
        trainer.setup()
        trainer.stop.leave_now = None  # from the first step on, a stop saves and drains within the grace period
        return trainer.train()
    except UserError as exc:  # NothingToDo too: one line, exit 0
        if trainer is not None and exc.exit_code != 0:
            trainer.fail()
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0 or not exc.shared:
            prefix = "" if rank == 0 else f"[rank{rank}] "
            print("\n".join(prefix + line for line in exc.lines()), file=sys.stderr, flush=True)
            to_log_files(logging.ERROR if exc.exit_code else logging.INFO, "\n".join(exc.lines()))
        return exc.exit_code
    except BaseException:
        if trainer is not None:
            trainer.fail()
        traceback.print_exc()
        to_log_files(logging.ERROR, f"rank {os.environ.get('RANK', '0')} crashed:\n{traceback.format_exc().rstrip()}")
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())

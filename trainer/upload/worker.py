"""Upload one checkpoint in a process of its own (started by the background uploader).

Tarring, checksumming and HTTP in the training process would compete with the training loop for
the GIL and the CPU; in a separate, lower-priority process they do not. Exit 0: uploaded; 1: failed
(the reason is in the checkpoint's upload_state.json).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.upload.worker")
    p.add_argument("ckpt", type=Path)
    p.add_argument("--url", required=True)
    p.add_argument("--compression", default="none")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--retries", type=int, default=5)
    p.add_argument("--node", default="0,1,1", help="node_rank,num_nodes,ranks_per_node")
    p.add_argument("--keep-remote", type=int, default=None)
    p.add_argument("--nice", type=int, default=19, help="CPU niceness of the upload process (training goes first)")
    p.add_argument("--parent", type=int, default=None, help="the training process: this one leaves when it is gone")
    args = p.parse_args(argv)
    # The training process decides when an upload is abandoned (it kills this one). A SIGTERM or SIGINT meant for
    # the job also reaches this process (a VM shutting down signals every process; DeepSpeed's launcher signals its
    # ranks' whole process trees): the upload goes on while the ranks drain.
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # started blocked: see the uploader
    _leave_with_parent(args.parent)
    if args.nice:
        try:
            os.nice(args.nice)
            import psutil

            psutil.Process().ionice(psutil.IOPRIO_CLASS_BE, value=7)  # lowest best-effort disk priority
        except (OSError, AttributeError, ValueError):
            pass
    from trainer.log import setup_logging
    from trainer.storage import open_storage
    from trainer.upload.uploader import CheckpointUploader, NodeInfo, UploadFailed

    setup_logging()
    node = NodeInfo(*(int(x) for x in args.node.split(",")))
    uploader = CheckpointUploader(
        open_storage(args.url), args.compression, args.workers, args.retries, node, keep_remote=args.keep_remote
    )
    try:
        uploader.upload(args.ckpt)
    except UploadFailed:
        return 1
    return 0


def _leave_with_parent(parent: Optional[int]) -> None:
    """If the training process is gone (killed, or a third signal ended it at once), stop uploading within a second:
    the parts sent so far have no manifest, so nothing half-uploaded is visible; `trainer upload-all` redoes it."""
    import threading
    import time

    if parent is None:
        parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())

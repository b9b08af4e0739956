"""Which rank this process is: read from the environment the `deepspeed` launcher sets."""

from __future__ import annotations

import base64
import json
import os
import socket
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def rank_info() -> RankInfo:
    """Rank and world size as set by the `deepspeed` launcher (or by hand for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return RankInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", str(world)))),
    )


@dataclass(frozen=True)
class NodeIdentity:
    node_rank: int
    host: str  # as the hostfile names it (what ssh reaches), else this machine's hostname
    hosts: tuple[str, ...]  # every node's, in node-rank order (empty when unknown)


def node_identity(r: Optional[RankInfo] = None) -> NodeIdentity:
    """Which node this rank runs on. DeepSpeed's per-node launcher sets CROSS_RANK and carries the hostfile's hosts
    in its `--world_info` argument; without a launcher above, this machine's hostname."""
    r = r or rank_info()
    node_rank = int(os.environ.get("CROSS_RANK", r.rank // max(1, r.local_world_size)))
    hosts = _launcher_hosts()
    host = hosts[node_rank] if node_rank < len(hosts) else socket.gethostname()
    return NodeIdentity(node_rank, host, hosts)


def _launcher_hosts() -> tuple[str, ...]:
    try:
        import psutil

        for parent in psutil.Process().parents():
            for arg in parent.cmdline():
                if arg.startswith("--world_info="):
                    return tuple(json.loads(base64.urlsafe_b64decode(arg.split("=", 1)[1])))
    except Exception:  # no launcher, or one this code does not know: the hostname names the node
        pass
    return ()

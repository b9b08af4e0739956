"""Which rank this process is: read from the environment the `deepspeed` launcher sets."""
from __future__ import annotations

import os
from dataclasses import dataclass


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

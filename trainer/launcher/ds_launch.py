"""DeepSpeed's per-node launcher (`deepspeed.launcher.launch`), started by `trainer train` on one machine or with
`--node-rank`: it sets each rank's environment, starts the ranks and passes signals to them.

DeepSpeed's runner (the `deepspeed` command) adds nothing on one node but the `--world_info` argument, and
importing it costs seconds: `trainer train` builds that argument itself and starts this launcher directly. The
launcher process imports DeepSpeed without MLflow (`trainer.dsimport`): over a second more per start.
"""

from __future__ import annotations

import base64
import json


def encode_world_info(hosts: dict[str, int]) -> str:
    """DeepSpeed's `--world_info`: base64 (URL-safe) of JSON {host: [slot indices]}, hosts in hostfile order."""
    return base64.urlsafe_b64encode(json.dumps({h: list(range(n)) for h, n in hosts.items()}).encode()).decode()


def main() -> None:
    from trainer.dsimport import import_deepspeed

    import_deepspeed()
    from deepspeed.launcher.launch import main as launch

    launch()


if __name__ == "__main__":
    main()

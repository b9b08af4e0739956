"""DeepSpeed's own runner (the `deepspeed` command), with secret values masked in what it logs.

The runner logs its whole pdsh command, `export NAME=VALUE` for every variable it sends to the other nodes
(all MLFLOW* ones by default, so a tracking password too). `trainer train` starts the runner through this
module on multi-node jobs; everything else is the runner's, unchanged.
"""

from __future__ import annotations

import logging
import os

from trainer.launcher.remote_env import mask, secret_values, user_env_files


class _Mask(logging.Filter):
    def __init__(self, values: list[str]):
        super().__init__()
        self.values = values

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask(message, self.values)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def main() -> None:
    from trainer.dsimport import import_deepspeed

    import_deepspeed()  # as in ds_launch: the runner never uses MLflow
    from deepspeed.launcher import runner
    from deepspeed.utils import logger

    logger.addFilter(_Mask(secret_values(os.environ, user_env_files())))
    runner.main()


if __name__ == "__main__":
    main()

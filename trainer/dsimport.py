"""`import deepspeed` without MLflow: DeepSpeed's autotuner imports MLflow whenever it is installed (1.3-1.6 s on
the CPU VM, pandas and all), and neither the launcher nor the ranks use the autotuner. The block lasts for the
import only: a rank with `tracking.enabled` imports MLflow itself later, when it starts its run."""

from __future__ import annotations

import sys
from types import ModuleType


def import_deepspeed() -> ModuleType:
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError meanwhile
    try:
        import deepspeed
    finally:
        del sys.modules["mlflow"]
    return deepspeed

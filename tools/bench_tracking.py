#!/usr/bin/env python
"""What MLflow logging costs the training loop: synchronous `log_metric` vs the batching tracker.

    python tools/bench_tracking.py [--metrics 1000] [--uri sqlite:///...]

Both sides run in one process against the same store (a fresh local sqlite store by default).
"Loop time" is what a training loop would wait: the synchronous calls themselves, or the tracker's
enqueue calls; "total" adds the tracker's final flush.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metrics", type=int, default=1000)
    p.add_argument("--uri", default=None, help="tracking URI (default: a temporary sqlite store)")
    args = p.parse_args()
    from mlflow.tracking import MlflowClient

    from trainer.config.schema import TrackingConfig
    from trainer.tracking.mlflow_tracker import MlflowTracker, default_tracking_uri

    with tempfile.TemporaryDirectory() as tmp:
        uri = args.uri or default_tracking_uri(Path(tmp))
        client = MlflowClient(tracking_uri=uri)
        exp = client.create_experiment("bench-sync")
        run = client.create_run(exp).info.run_id
        t0 = time.perf_counter()
        for step in range(args.metrics):
            client.log_metric(run, "train/loss", 1.0 / (step + 1), step=step)
        sync_s = time.perf_counter() - t0

        tracker = MlflowTracker(TrackingConfig(uri=uri), Path(tmp), "bench-async", "bench")
        t0 = time.perf_counter()
        for step in range(args.metrics):
            tracker.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
        loop_s = time.perf_counter() - t0
        tracker.finish("FINISHED")
        total_s = time.perf_counter() - t0
        logged = len(client.get_metric_history(tracker.run_id, "train/loss"))
    print(
        "| metrics | synchronous log_metric (s) | tracker, loop time (s) | tracker, total with flush (s) | loop-time "
        "ratio |"
    )
    print("|---|---|---|---|---|")
    print(f"| {args.metrics} | {sync_s:.2f} | {loop_s:.4f} | {total_s:.2f} | {sync_s / loop_s:,.0f}x less |")
    assert logged == args.metrics, f"tracker logged {logged} of {args.metrics}"
    return 0


if __name__ == "__main__":
    sys.exit(main())

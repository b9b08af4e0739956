"""Can a stop signal be honoured inside the preemption grace period with these settings? Said by the loop once
per kind of problem, and by `trainer validate` before a run."""

from __future__ import annotations

from typing import Optional

from trainer.config.schema import RunConfig


def grace_problems(cfg: RunConfig, step_time: float, save_s: Optional[float]) -> list[tuple[str, str]]:
    """(kind, why) a stop signal cannot be honoured within `preemption.grace_s` with these settings (empty: it can).

    A stop is acted on at the next micro-batch boundary (`preemption.check_micro_batches`, grad_accum > 1)
    or step boundary; then a save needs its time, and leaving needs `exit_reserve_s`."""
    p, ga = cfg.preemption, cfg.train.grad_accum
    micro = ga > 1 and p.check_micro_batches
    wait = step_time / ga if micro else step_time
    unit = "micro-batch" if micro else "step"
    budget = p.grace_s - p.exit_reserve_s
    if wait > budget:
        return [
            (
                "step",
                f"a {unit} takes {wait:.1f} s, more than the {p.grace_s:g} s grace (minus {p.exit_reserve_s:g} s to "
                "leave):"
                f" a SIGTERM cannot be honoured at a {unit} boundary with these settings; the run resumes from its last"
                " checkpoint (lower train.micro_batch_size" + ("" if micro else ", or raise train.grad_accum") + ")",
            )
        ]
    if save_s is not None and wait + 1.2 * save_s > budget:
        return [
            (
                "save",
                f"a {unit} ({wait:.1f} s) and an emergency save (~{save_s:.1f} s) take more than the {p.grace_s:g} s "
                "grace"
                f" (minus {p.exit_reserve_s:g} s to leave): a SIGTERM will usually stop without saving, losing the "
                "work since"
                " the last checkpoint (save more often, or lower the step time)",
            )
        ]
    return []

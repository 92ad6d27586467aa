"""What a finished run reports: :class:`TrainResult`, the log's summary entry and the printed table."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class TrainResult:
    """What a finished run reports (also printed by the CLI)."""

    steps: int  # the step the run stands at (after a resume: counting the steps before it)
    first_step: int  # the step this process started from (0, or where it resumed)
    log_file: Path | None  # train_log.jsonl (rank 0; None on the other ranks)
    checkpoint: Path | None
    losses: list[float]  # this process's loss per step run here (after a resume: from there on)
    eval_before: dict[str, float] | None  # nDCG@10 per output before training (None: not evaluated)
    eval_after: dict[str, float] | None
    peak_rss_bytes: int  # RSS high-water mark of this process over the whole run (evaluation included)
    train_peak_rss_bytes: (
        int  # RSS high-water mark during training steps (evaluation excluded where measurable)
    )
    peak_gpu_bytes: int | None
    seconds: float
    queries_per_second: float
    tokens_per_second: float
    plot: Path | None = None  # train_log.png (rank 0 with matplotlib installed)
    already_finished: bool = False  # --resume of a run that had reached its last step: nothing ran
    skipped_steps: int = 0  # steps not applied because their loss or gradient norm was not finite


def summary_dict(result: TrainResult) -> dict[str, Any]:
    """The log's final ``summary`` entry: the result as JSON values, without the per-step losses."""
    out = asdict(result)
    out["checkpoint"] = str(result.checkpoint) if result.checkpoint else None
    out["log_file"] = str(result.log_file) if result.log_file else None
    out["plot"] = str(result.plot) if result.plot else None
    out.pop("losses")
    return out


def format_summary(result: TrainResult) -> str:
    """The final report: nDCG@10 before/after per output, time, throughput and peak memory."""
    if result.already_finished:
        return "\n".join(
            [
                f"the run already finished at step {result.steps}: nothing to train (a larger --max-steps continues it)"
            ]
            + ([f"checkpoint: {result.checkpoint}"] if result.checkpoint else [])
            + ([f"log: {result.log_file}"] if result.log_file else [])
        )
    ran = result.steps - result.first_step
    total = f" ({result.steps} in total, resumed at step {result.first_step})" if result.first_step else ""
    lines = [f"trained {ran} step{'s' * (ran != 1)}{total} in {result.seconds:.0f} s", ""]
    if result.eval_before or result.eval_after:
        modes = list((result.eval_after or result.eval_before or {}).keys())
        lines += ["| nDCG@10 | " + " | ".join(modes) + " |", "|---|" + "---:|" * len(modes)]
        for name, scores in (("before", result.eval_before), ("after", result.eval_after)):
            if scores:
                lines.append(
                    f"| {name} | " + " | ".join(f"{scores.get(m, float('nan')):.4f}" for m in modes) + " |"
                )
        lines.append("")
    lines.append(
        f"throughput: {result.queries_per_second:.1f} queries/s, {result.tokens_per_second:.0f} tokens/s"
    )
    lines.append(
        f"peak memory: {result.train_peak_rss_bytes / 2**20:.0f} MiB RSS while training, "
        f"{result.peak_rss_bytes / 2**20:.0f} MiB overall (model loading and evaluation included)"
    )
    if result.skipped_steps:
        lines.append(f"skipped steps: {result.skipped_steps} (loss or gradient norm not finite; not applied)")
    if result.peak_gpu_bytes is not None:
        lines.append(f"peak GPU memory: {result.peak_gpu_bytes / 2**20:.0f} MiB")
    if result.checkpoint:
        lines.append(f"checkpoint: {result.checkpoint}")
    if result.log_file:
        lines.append(f"log: {result.log_file}")
    if result.plot:
        lines.append(f"plot: {result.plot}")
    return "\n".join(lines)

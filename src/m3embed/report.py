"""Watching a run: TensorBoard scalars (``train.report_to``) and a plot of ``train_log.jsonl``.

``train_log.jsonl`` is the record; everything here is drawn from its entries, so TensorBoard and the
plot show exactly the logged numbers. Rank 0 only (the ranks that write no log report nothing).

- :class:`TensorBoardReporter` turns each log entry into scalars under ``<output_dir>/tensorboard``:
  ``train/<metric>`` per step (each loss part, ``lr``, ``grad_norm``, ``seconds``, ``queries_per_s``,
  ``tokens_per_s``, ``peak_rss_mb``, ...), ``eval/<metric>/<output>`` per evaluation
  (``eval/ndcg@10/dense``, ...). TensorBoard stores them as float32.
- :func:`plot_run` draws the loss parts and nDCG@10 per output against the step into
  ``train_log.png`` next to the log: at the end of every run, and with ``m3embed plot RUN_DIR`` for
  any run, finished or not.

Both need optional packages (``pip install 'm3embed[tensorboard,plot]'``); without them a run warns
once, saying how to get them, and goes on.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from m3embed.runlog import LOG_FILE, read_log

logger = logging.getLogger(__name__)

ReportTo = Literal["none", "tensorboard"]
TENSORBOARD_DIR = "tensorboard"
PLOT_FILE = "train_log.png"
LOG_SHA256_KEY = "m3embed train_log sha256"  # PNG text chunk: the log the plot was drawn from
# Keys of a step entry that are not parts of the loss: the loop's bookkeeping, schedule and meters.
_NOT_LOSS = {"step", "epoch", "lr", "head_lr", "grad_norm", "loss_scale", "skipped_steps"} | {
    "seconds",
    "data_wait_s",
    "queries_per_s",
    "tokens_per_s",
    "peak_rss_mb",
    "peak_gpu_mb",
}


class MissingExtra(ImportError):
    """An optional package is not installed; the message says which extra brings it."""


class Reporter(Protocol):
    """Somewhere log entries go besides ``train_log.jsonl``."""

    def write(self, entry: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class TensorBoardReporter:
    """Log entries as TensorBoard scalars in ``log_dir``; steps and evaluations, nothing else.

    ``purge_step`` (a resumed run: the step after the one it resumed at) hides what an interrupted
    process wrote from that step on, as :func:`m3embed.runlog.read_log` leaves it out of the log.
    """

    def __init__(self, log_dir: str | os.PathLike, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def write(self, entry: Mapping[str, Any]) -> None:
        step = entry.get("step")
        if "loss" in entry:
            for key, value in _numbers(entry).items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, step)
        elif "eval" in entry:
            for mode, metrics in entry["eval"].items():
                for metric, value in _numbers(metrics).items():
                    self.writer.add_scalar(f"eval/{metric}/{mode}", value, step)
        else:
            return  # summaries and resume markers are no curves
        self.writer.flush()  # a run is watched while it runs

    def close(self) -> None:
        self.writer.close()


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


@dataclass
class RunReports:
    """What rank 0 reports besides ``train_log.jsonl``: the ``report_to`` reporters and, at the end,
    the plot. Built by :meth:`start`, which checks the optional packages once."""

    reporters: list[Reporter] = field(default_factory=list)
    plot: bool = False

    @classmethod
    def start(cls, report_to: ReportTo, output_dir: str | os.PathLike, resumed_at: int | None) -> RunReports:
        """Open the reporters of ``report_to`` in ``output_dir``; one warning names every missing
        package and the extra that brings it, and the run goes on without them."""
        wanted = {"plot": ("matplotlib", "end-of-run plot")}  # extra: (module, what it gives)
        if report_to == "tensorboard":
            wanted["tensorboard"] = ("tensorboard", "TensorBoard scalars")
        missing = {extra: wanted[extra] for extra in wanted if not _importable(wanted[extra][0])}
        if missing:
            modules = [module for module, _ in missing.values()]
            later = ", and `m3embed plot` draws it once matplotlib is there" if "plot" in missing else ""
            logger.warning(
                "no %s: %s not installed (pip install 'm3embed[%s]'); training goes on, train_log.jsonl "
                "has every number%s",
                " and no ".join(what for _, what in missing.values()),
                " and ".join(modules) + (" is" if len(modules) == 1 else " are"),
                ",".join(missing),
                later,
            )
        reports = cls(plot="plot" not in missing)
        if report_to == "tensorboard" and "tensorboard" not in missing:
            purge = resumed_at + 1 if resumed_at is not None else None
            reports.reporters.append(TensorBoardReporter(Path(output_dir) / TENSORBOARD_DIR, purge))
        return reports

    def write(self, entry: Mapping[str, Any]) -> None:
        for reporter in self.reporters:
            reporter.write(entry)

    def draw(self, log_file: Path) -> Path | None:
        """The plot of ``log_file`` (None without matplotlib). A failure to draw is a warning: the
        run and its checkpoints are done, and ``m3embed plot`` can try again."""
        if not self.plot:
            return None
        try:
            return plot_run(log_file, finished=True)  # drawn before the summary entry is written
        except Exception as err:
            logger.warning("could not plot %s: %s: %s", log_file, type(err).__name__, err)
            return None

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()


# ---------------------------------------------------------------------- the plot
Curve = tuple[list[int], list[float]]  # (steps, values)


@dataclass
class Curves:
    """What the plot draws, taken from the log's entries."""

    losses: dict[str, Curve]  # "loss" and each of its parts
    evals: dict[str, Curve]  # nDCG@10 per output
    last_step: int
    finished: bool  # the log ends with the run's summary


def curves(entries: Sequence[Mapping[str, Any]]) -> Curves:
    """The loss parts per step and nDCG@10 per output per evaluation of a log read with
    :func:`m3embed.runlog.read_log` (one uninterrupted run)."""
    losses: dict[str, Curve] = {}
    evals: dict[str, Curve] = {}
    for entry in entries:
        if "loss" in entry:
            values = {k: v for k, v in _numbers(entry).items() if k not in _NOT_LOSS}
        elif "eval_ndcg@10" in entry:
            values = _numbers(entry["eval_ndcg@10"])
        else:
            continue
        target = losses if "loss" in entry else evals
        for name, value in values.items():
            steps, ys = target.setdefault(name, ([], []))
            steps.append(entry["step"])
            ys.append(value)
    last = max((e["step"] for e in entries if "step" in e), default=0)
    finished = bool(entries) and "summary" in entries[-1]
    return Curves(losses, evals, last, finished)


def _log_path(run: str | os.PathLike) -> Path:
    path = Path(run)
    path = path / LOG_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: give a training run's output folder (it holds {LOG_FILE})"
        )
    return path


def plot_run(
    run: str | os.PathLike, output: str | os.PathLike | None = None, *, finished: bool | None = None
) -> Path:
    """Draw a run's loss parts and evaluation curves into a PNG (default: ``train_log.png`` next to
    the log). ``run`` is the run's output folder or its ``train_log.jsonl``; the run may still be going
    (the title says "unfinished" unless ``finished`` or the log's summary says otherwise).
    Raises :class:`MissingExtra` without matplotlib, ValueError when the log has nothing to draw yet."""
    log_file = _log_path(run)
    drawn = curves(read_log(log_file))
    if not drawn.losses and not drawn.evals:
        raise ValueError(f"{log_file} has no step and no evaluation yet: nothing to plot")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import LogFormatter, MaxNLocator
    except ImportError:
        raise MissingExtra("plotting needs matplotlib: pip install 'm3embed[plot]'") from None
    panels = 1 + bool(drawn.evals)
    # A Figure with its own Agg canvas: no pyplot, so no display and no global backend switch.
    fig = Figure(figsize=(6.4 * panels, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False, sharex=True)[0]  # the same steps side by side
    _draw(axes[0], drawn.losses, "training loss and its parts", "loss", marker=None)
    if all(v > 0 for _, values in drawn.losses.values() for v in values):
        axes[0].set_yscale("log")  # the parts differ by orders of magnitude (sparse vs the rest)
        axes[0].yaxis.set_major_formatter(LogFormatter())  # 0.6, 2, 30 rather than 6x10^-1
        axes[0].yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))  # labels few decades only
    if drawn.evals:
        _draw(axes[1], drawn.evals, "evaluation per output", "nDCG@10", marker="o")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
    state = "" if (drawn.finished if finished is None else finished) else " (unfinished)"
    fig.suptitle(f"{log_file.parent.name}: step {drawn.last_step}{state}")
    path = Path(output) if output is not None else log_file.with_name(PLOT_FILE)
    # The PNG names the log it was drawn from (a text chunk), so a picture can be checked against it.
    fig.savefig(path, dpi=100, metadata={"Software": "m3embed", LOG_SHA256_KEY: file_sha256(log_file)})
    return path


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _draw(ax, lines: Mapping[str, Curve], title: str, ylabel: str, marker: str | None) -> None:
    for name, (steps, values) in lines.items():
        dot = marker or ("." if len(steps) == 1 else None)  # a line of one point would not show
        ax.plot(steps, values, label=name, marker=dot, linewidth=2.5 if name == "loss" else 1.2)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize="small")

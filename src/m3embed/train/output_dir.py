"""The output folder belongs to its run: which files are a run's, and refusing to start a new run
over another unless ``resume`` or ``overwrite`` says what to do with it."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from m3embed import checkpoint as ckpt
from m3embed import report
from m3embed.runlog import LOG_FILE
from m3embed.train.config import TrainConfig

logger = logging.getLogger(__name__)


def run_files(output_dir: str | os.PathLike) -> list[Path]:
    """The files and folders of a training run in ``output_dir``: its log, plot and TensorBoard folder,
    ``latest``, checkpoints (finished or half-written). Anything else in the folder is not the run's
    and is left alone."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    names = (LOG_FILE, report.PLOT_FILE, report.TENSORBOARD_DIR, ckpt.LATEST, f".tmp-{ckpt.LATEST}")
    prefixes = (ckpt.PREFIX, ckpt.TMP_PREFIX, f".old-{ckpt.PREFIX}")
    return sorted(p for p in out.iterdir() if p.name in names or p.name.startswith(prefixes))


def check_output_dir(tc: TrainConfig) -> list[Path]:
    """Refuse to start a new run where another run is, unless ``resume`` or ``overwrite`` says what to
    do with it. Writes nothing. Returns the earlier run's files that ``overwrite`` will delete."""
    found = run_files(tc.output_dir)
    if not found or tc.resume:
        return []
    if tc.overwrite:
        return found
    names = ", ".join(p.name for p in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    raise FileExistsError(
        f"output folder {tc.output_dir} already holds a training run ({names}); continue it with --resume, "
        "start over with --overwrite (deletes that run's log and checkpoints), or give another --output-dir"
    )


def delete_run(out: Path, files: list[Path]) -> None:
    """``--overwrite``: remove the earlier run's files (those :func:`check_output_dir` returned)."""
    logger.warning("--overwrite: deleting the earlier run in %s (%d files/folders)", out, len(files))
    for path in files:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

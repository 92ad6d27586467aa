"""Training checkpoints: written atomically, rotated, found again for ``--resume``.

A checkpoint is a folder ``<output_dir>/checkpoint-<step>`` that is at once

* a model in BGE-M3's layout (``M3Model.from_pretrained`` and FlagEmbedding's ``M3Embedder`` load it):
  encoder weights (safetensors), tokenizer files, ``colbert_linear.pt``, ``sparse_linear.pt``,
  ``m3embed_config.json``, and sentence-transformers' files (``SentenceTransformer(folder)`` loads the
  dense encoder; see :mod:`m3embed.st_files`);
* the state to continue training exactly: ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pt``
  (torch CPU/CUDA generator states of every rank, as tensors), ``trainer_state.json`` (step, sampler
  epoch and position, world size) and ``train_config.json`` (the resolved data, memory, loss and
  train configs; usable again as ``m3embed train --config``).

Why a kill never leaves a broken checkpoint: everything is written into ``.tmp-checkpoint-<step>``
first and the folder is renamed into place with one ``os.replace`` (atomic on POSIX within a file
system); the ``latest`` pointer file is replaced the same way, after the rename. A crash at any point
leaves either the previous checkpoint with ``latest`` naming it, or the new one complete. Leftover
``.tmp-*`` folders are ignored when resuming and removed by the next save.

Everything is loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
MERGED_DIR = "merged"  # a LoRA checkpoint's merged model
TRAIN_CONFIG = "train_config.json"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG_STATE = "rng_state.pt"
_STEP = re.compile(rf"^{PREFIX}(\d+)$")


def rng_state() -> dict[str, Any]:
    """This process's torch generator states (CPU and every CUDA device), as tensors."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: Mapping[str, Any],
    rng_states: list[dict[str, Any]],
    configs: Mapping[str, Any],
    keep_last: int | None = None,
    merged: bool = False,
) -> Path:
    """Write ``checkpoint-<step>`` atomically, point ``latest`` at it, keep the last ``keep_last``.
    ``merged``: also ``merged/``, the model with its LoRA adapters merged in (``M3Model.save_pretrained``).

    ``rng_states`` holds one :func:`rng_state` per rank (index = rank). Returns the checkpoint folder.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{TMP_PREFIX}*"):  # debris of an earlier crash
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out / f"{TMP_PREFIX}{step}"
    final = out / f"{PREFIX}{step}"

    # 1. Everything into the temporary folder; trainer_state.json last.
    model.save_pretrained(tmp)
    if merged:
        model.save_pretrained(tmp / MERGED_DIR, merged=True)
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
    torch.save(scheduler.state_dict(), tmp / SCHEDULER)
    torch.save({"ranks": rng_states}, tmp / RNG_STATE)
    (tmp / TRAIN_CONFIG).write_text(json.dumps(configs, indent=2) + "\n")
    (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, **trainer_state}, indent=2) + "\n")
    _fsync_tree(tmp)

    # 2. One rename makes it visible (an older folder of the same step, e.g. a re-run, goes first).
    if final.exists():
        old = out / f".old-{PREFIX}{step}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)

    # 3. The pointer, replaced atomically too.
    write_atomic(out / LATEST, final.name + "\n")

    # 4. Rotation: the newest keep_last checkpoints stay.
    if keep_last is not None and keep_last > 0:
        for old_ckpt in list_checkpoints(out)[:-keep_last]:
            if old_ckpt != final:
                shutil.rmtree(old_ckpt, ignore_errors=True)
    logger.info("saved checkpoint %s", final)
    return final


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest (lowest step) first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / TRAINER_STATE).exists()]


def find_checkpoint(resume: str, output_dir: str | os.PathLike) -> Path:
    """The folder ``--resume`` means: ``latest`` (in ``output_dir``) or a checkpoint folder path."""
    if resume == LATEST:
        out = Path(output_dir)
        pointer = out / LATEST
        if pointer.exists():
            path = out / pointer.read_text().strip()
            if (path / TRAINER_STATE).exists():
                return path
            logger.warning("%s names %s, which is missing; using the newest checkpoint", pointer, path)
        found = list_checkpoints(out)
        if not found:
            raise FileNotFoundError(
                f"--resume latest: no checkpoint in {out}/ (expected {PREFIX}<step> folders); "
                "give the checkpoint folder path, or the output_dir of the run to continue"
            )
        return found[-1]
    path = Path(resume)
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(
            f"--resume {resume}: not a checkpoint folder (no {TRAINER_STATE}); expected "
            f"<output_dir>/{PREFIX}<step> written by m3embed train, or 'latest'"
        )
    return path


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """``{"trainer_state", "configs", "optimizer", "scheduler", "rng"}`` of a checkpoint folder."""
    path = Path(path)
    return {
        "trainer_state": json.loads((path / TRAINER_STATE).read_text()),
        "configs": json.loads((path / TRAIN_CONFIG).read_text()),
        "optimizer": torch.load(path / OPTIMIZER, weights_only=True, map_location="cpu"),
        "scheduler": torch.load(path / SCHEDULER, weights_only=True, map_location="cpu"),
        "rng": torch.load(path / RNG_STATE, weights_only=True, map_location="cpu")["ranks"],
    }


def write_atomic(path: Path, text: str | bytes) -> None:
    """Replace ``path`` with ``text`` in one rename: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(folder: Path) -> None:
    """Flush file contents to disk before the rename publishes them (a power loss is a kill too)."""
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

"""A run's checkpoints: what :func:`save` writes (weights, optimiser, schedule, sampler position, every
rank's RNG state, the resolved config) and what :func:`resume` restores, so the loss sequence after
``--resume`` equals that of an uninterrupted run. The files and their atomic writing are
:mod:`m3embed.checkpoint`'s."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from m3embed import checkpoint as ckpt
from m3embed.model import no_library_progress_bars
from m3embed.train.config import RunConfig
from m3embed.train.optim import OPTIMIZER_GROUPS
from m3embed.train.precision import check_finite_weights
from m3embed.train.run import Run

logger = logging.getLogger(__name__)


def save(run: Run, sampler_state: dict[str, Any], final: bool = False) -> Path | None:
    """Rank 0 writes the checkpoint (with every rank's RNG state and the sampler state of the batches
    trained on, ``BatchStream.state_dict``); the others wait for it. A LoRA run's checkpoint holds the
    adapter; the ``final`` one (and every one with ``save_merged``) also the merged model in ``merged/``."""
    info, tc = run.info, run.config.train
    rng = ckpt.rng_state()
    if info.enabled:
        states: list[Any] = [None] * info.world_size
        torch.distributed.all_gather_object(states, rng)
    else:
        states = [rng]
    check_finite_weights(run.model, run.guard, run.step, tc.output_dir, "checkpoint not written")
    path = None
    if info.is_main:
        with no_library_progress_bars():  # transformers' "Writing model shards" bar cuts into ours
            path = ckpt.save_checkpoint(
                tc.output_dir,
                run.step,
                model=run.model,
                optimizer=run.optimizer,
                scheduler=run.scheduler,
                trainer_state={
                    "world_size": info.world_size,
                    "sampler": sampler_state,
                    "precision": run.guard.state_dict(),
                },
                rng_states=states,
                configs=run.config.to_dict(),
                keep_last=tc.save_total_limit,
                merged=bool(tc.lora_rank) and (final or tc.save_merged),
            )
    if info.enabled:
        torch.distributed.barrier()
    return path


def resume(run: Run) -> None:
    """Optimizer, scheduler, sampler position and this rank's RNG state from ``run.resume_from``."""
    state = ckpt.load_training_state(run.resume_from)
    saved_world, world = state["trainer_state"]["world_size"], run.info.world_size
    if saved_world != world:
        raise ValueError(
            f"--resume {run.resume_from}: saved with {saved_world} process(es), this run has {world}; "
            "resume with the same number of processes (torchrun --nproc_per_node)"
        )
    if run.info.is_main:
        _warn_config_changes(state["configs"], run.config, run.resume_from)
    saved_groups = len(state["optimizer"]["param_groups"])
    if saved_groups != len(run.optimizer.param_groups):
        raise ValueError(
            f"--resume {run.resume_from}: its optimizer state has {saved_groups} parameter groups, this "
            f"version of m3embed uses {len(run.optimizer.param_groups)} ({', '.join(OPTIMIZER_GROUPS)}); "
            "the checkpoint's weights load with --model, but the run cannot be resumed"
        )
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.sampler.load_state_dict(state["trainer_state"]["sampler"])
    if "precision" in state["trainer_state"]:  # checkpoints before fp16 support have none
        run.guard.load_state_dict(state["trainer_state"]["precision"])
    ckpt.set_rng_state(state["rng"][run.info.rank])
    run.step = state["trainer_state"]["step"]
    logger.info("resumed from %s at step %d of %d", run.resume_from, run.step, run.total_steps)


def _warn_config_changes(saved: Mapping[str, Any], config: RunConfig, where: Path) -> None:
    now = config.to_dict()
    how_it_runs = (
        "resume",
        "overwrite",
        "progress_bar",
        "device",
        "threads",
        "report_to",
        "prefetch_batches",
    )
    ignore = {("train", k) for k in how_it_runs}
    changed = [
        f"{section}.{key}: {saved[section].get(key)!r} -> {value!r}"
        for section, values in now.items()
        for key, value in values.items()
        if section in saved and (section, key) not in ignore and saved[section].get(key) != value
    ]
    if changed:
        logger.warning("resuming %s with changed settings: %s", where, "; ".join(changed))

"""``m3embed train``: the explicit training loop around :func:`m3embed.step.train_step`.

One run is described by four small configs (:class:`RunConfig`): ``data`` (:class:`DataConfig`),
``memory`` (:class:`MemoryConfig`), ``loss`` (:class:`LossConfig`) and ``train`` (:class:`TrainConfig`).
They are logged at start and saved, resolved, inside every checkpoint.

The loop (see :func:`train`), per step:

1. the sampler hands this rank its share of one global batch (same dataset file on every rank);
2. ``build_batch`` draws the groups, the model's tokenizer turns them into tokens (steps 1-2 run
   ``prefetch_batches`` ahead in a background thread, :class:`BatchStream`, while earlier steps train);
3. ``train_step`` runs forward + backward under the memory strategy (cross-device negatives via
   ``CrossDeviceGather`` when there are several ranks);
4. gradients are summed over ranks, clipped, and AdamW + the warm-up/linear-decay schedule step;
5. rank 0 logs every loss part, the learning rate, throughput and peak memory (JSONL + progress bar),
   evaluates every ``eval_steps`` and saves a checkpoint every ``save_steps`` (and at the end).

Resuming restores weights, optimizer, scheduler, sampler epoch/position (of the batches trained on,
not of those made ahead) and every rank's torch RNG state, so the loss sequence after ``--resume``
equals that of an uninterrupted run.

The modules, in the order a run meets them:

- :mod:`~m3embed.train.config`: the config classes, reading and merging files, the demo config;
- :mod:`~m3embed.train.output_dir`: which files in the output folder are a run's, and who may replace them;
- :mod:`~m3embed.train.loop`: set-up (or resume), the loop, evaluation;
- :mod:`~m3embed.train.run`: what the loop works on and one optimiser step of it;
- :mod:`~m3embed.train.optim`: parameter groups, schedule, clipping;
- :mod:`~m3embed.train.checkpointing`: what a checkpoint saves and how a run resumes from it;
- :mod:`~m3embed.train.log`: the run log as it is written, and the meter (time, throughput, memory);
- :mod:`~m3embed.train.summary`: the result and the printed summary.

The log's format (``LOG_FILE``, :func:`read_log`) is :mod:`m3embed.runlog`'s, shared with reporting.
"""

from m3embed.runlog import LOG_FILE, read_log
from m3embed.train.config import (
    DEMO_DATA,
    NEW_HEAD_LR_SCALE,
    SECTIONS,
    RunConfig,
    TrainConfig,
    demo_config,
    load_config_file,
    merge_sections,
    packaged_model_path,
)
from m3embed.train.log import Meter
from m3embed.train.loop import StepCallback, train
from m3embed.train.optim import OPTIMIZER_GROUPS
from m3embed.train.output_dir import check_output_dir, run_files
from m3embed.train.summary import TrainResult, format_summary

__all__ = [
    "DEMO_DATA",
    "LOG_FILE",
    "NEW_HEAD_LR_SCALE",
    "OPTIMIZER_GROUPS",
    "SECTIONS",
    "Meter",
    "RunConfig",
    "StepCallback",
    "TrainConfig",
    "TrainResult",
    "check_output_dir",
    "demo_config",
    "format_summary",
    "load_config_file",
    "merge_sections",
    "packaged_model_path",
    "read_log",
    "run_files",
    "train",
]

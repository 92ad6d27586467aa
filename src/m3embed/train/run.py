"""What the loop works on (:class:`Run`): data, model, optimiser, schedule and the step it stands at,
and one optimiser step of it (steps 1-4 of the loop in :mod:`m3embed.train`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from m3embed import distributed
from m3embed.data import BatchStream, SameDatasetBatchSampler, TrainDataset, build_batch
from m3embed.model import M3Model, tokenize
from m3embed.step import train_step
from m3embed.train.config import RunConfig
from m3embed.train.log import RunLog
from m3embed.train.optim import OPTIMIZER_GROUPS, clip_gradients
from m3embed.train.precision import StepGuard, autocast_dtype, check_finite_weights


@dataclass
class Run:
    """What the loop works on: built by :func:`m3embed.train.loop.setup`, advanced one optimiser step by :meth:`update`."""

    config: RunConfig
    info: distributed.DistInfo
    device: torch.device
    dataset: TrainDataset
    sampler: SameDatasetBatchSampler
    model: M3Model
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    resume_from: Path | None
    guard: StepGuard
    step: int = 0
    log: RunLog | None = None  # rank 0 only

    @property
    def finished(self) -> bool:
        """Resumed from the checkpoint of its last step: nothing is left to train."""
        return self.resume_from is not None and self.step >= self.total_steps

    def batch_stream(self) -> BatchStream:
        """Steps 1-2 of every step to come: the sampler's next indices, their groups and their tokens
        ``(batch, queries, passages)``, made ``prefetch_batches`` ahead by a background thread.

        That thread tokenises with its own copy of the tokenizer: a fast tokenizer used by two threads
        at once can fail ("Already borrowed"), and evaluation tokenises on this thread meanwhile.
        """
        dc, tc = self.config.data, self.config.train
        tokenizer = copy.deepcopy(self.model.tokenizer) if tc.prefetch_batches else self.model.tokenizer

        instruction_format = dc.query_instruction_format or self.model.family.query_instruction_format

        def make(indices: list[int], epoch: int):
            batch = build_batch(
                self.dataset,
                indices,
                dc.train_group_size,
                dc.seed,
                epoch,
                dc.query_instruction,
                instruction_format,
            )
            queries = tokenize(tokenizer, batch.queries, tc.query_max_length)
            passages = tokenize(tokenizer, batch.passages, tc.passage_max_length)
            return batch, queries, passages

        return BatchStream(self.sampler, make, tc.prefetch_batches)

    def update(self, batch, queries, passages) -> dict[str, Any]:
        """Steps 3-4: forward + backward, gradient sum over ranks, unscale (fp16), clip, then AdamW and
        schedule step unless the step is not finite (:class:`~m3embed.train.precision.StepGuard`).
        Returns the step's log entry: loss parts, each group's learning rate used, the gradient norm
        before clipping, ``skipped_steps`` so far, and ``loss_scale`` (the scale this step used) under fp16."""
        tc = self.config.train
        loss_scale = self.guard.loss_scale
        try:
            parts = train_step(
                self.model,
                queries,
                passages,
                batch.group_size,
                memory=self.config.memory,
                loss=self.config.loss,
                step=self.step,
                teacher_scores=batch.teacher_scores,
                query_max_length=tc.query_max_length,
                passage_max_length=tc.passage_max_length,
                autocast_dtype=autocast_dtype(tc),
                scaler=self.guard.scaler,
                gather=distributed.CrossDeviceGather() if self.info.enabled else None,
            )
            distributed.all_reduce_gradients(self.model)
        except Exception as err:
            raise RuntimeError(
                f"rank {self.info.rank} failed at step {self.step + 1}: {type(err).__name__}: {err}"
            ) from err
        self.guard.unscale(self.optimizer)
        grad_norm = clip_gradients([p for p in self.model.parameters() if p.requires_grad], tc.max_grad_norm)
        lrs = dict(zip(OPTIMIZER_GROUPS, self.scheduler.get_last_lr()))
        applied = self.guard.decide(parts, grad_norm, self.step + 1, self.info)
        if applied:
            self.optimizer.step()
            self.scheduler.step()
            check_finite_weights(
                self.model, self.guard, self.step + 1, tc.output_dir, "the update overflowed"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        entry = {**parts, "lr": lrs["encoder"], "head_lr": lrs["heads"], "grad_norm": grad_norm}
        entry["skipped_steps"] = self.guard.skipped_steps
        if loss_scale is not None:
            entry["loss_scale"] = loss_scale
        self.guard.after_step(applied, tc.output_dir)
        return entry

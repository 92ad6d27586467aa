"""What the loop works on (:class:`Run`): data, model, optimiser, schedule and the step it stands at,
and one optimiser step of it (steps 1-4 of the loop in :mod:`m3embed.train`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from m3embed import distributed
from m3embed.data import BatchStream, SameDatasetBatchSampler, TrainDataset, build_batch
from m3embed.model import M3Model, tokenize
from m3embed.step import train_step
from m3embed.train.config import RunConfig
from m3embed.train.log import RunLog
from m3embed.train.optim import OPTIMIZER_GROUPS, clip_gradients


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
    step: int = 0
    log: RunLog | None = None  # rank 0 only

    def batch_stream(self) -> BatchStream:
        """Steps 1-2 of every step to come: the sampler's next indices, their groups and their tokens
        ``(batch, queries, passages)``, made ``prefetch_batches`` ahead by a background thread.

        That thread tokenises with its own copy of the tokenizer: a fast tokenizer used by two threads
        at once can fail ("Already borrowed"), and evaluation tokenises on this thread meanwhile.
        """
        dc, tc = self.config.data, self.config.train
        tokenizer = copy.deepcopy(self.model.tokenizer) if tc.prefetch_batches else self.model.tokenizer

        def make(indices: list[int], epoch: int):
            batch = build_batch(
                self.dataset, indices, dc.train_group_size, dc.seed, epoch, dc.query_instruction
            )
            queries = tokenize(tokenizer, batch.queries, tc.query_max_length)
            passages = tokenize(tokenizer, batch.passages, tc.passage_max_length)
            return batch, queries, passages

        return BatchStream(self.sampler, make, tc.prefetch_batches)

    def update(self, batch, queries, passages) -> tuple[dict[str, float], float, dict[str, float]]:
        """Steps 3-4: forward + backward, gradient sum over ranks, clip, AdamW and schedule step.
        Returns the loss parts, the gradient norm before clipping and each group's learning rate used."""
        tc = self.config.train
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
                autocast_dtype=torch.bfloat16 if tc.bf16 else None,
                gather=distributed.CrossDeviceGather() if self.info.enabled else None,
            )
            distributed.all_reduce_gradients(self.model)
        except Exception as err:
            raise RuntimeError(
                f"rank {self.info.rank} failed at step {self.step + 1}: {type(err).__name__}: {err}"
            ) from err
        grad_norm = clip_gradients([p for p in self.model.parameters() if p.requires_grad], tc.max_grad_norm)
        lrs = dict(zip(OPTIMIZER_GROUPS, self.scheduler.get_last_lr()))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return parts, grad_norm, lrs

"""Everything torch.distributed in one place: process group set-up, cross-device negatives, gradient sync.

How gradients stay exact (DESIGN.md section 6). Every rank gathers every rank's representations
*detached*, puts its own (autograd-connected) slice back in its place, and computes the loss of the
**global** batch. The gradient that reaches rank r's parameters is then ``g_r = dL/d reps_r · d reps_r/dθ``
and the true gradient is ``Σ_r g_r``: one all-reduce with SUM per step (not DDP's mean, so nothing
needs compensating) after the last sub-batch. Because that single all-reduce happens after all
sub-batches, ranks with different numbers of sub-batches cannot hang each other, and no per-sub-batch
synchronisation exists that would need ``no_sync``.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from m3embed.losses import LossConfig, LossOutput, batch_scores, contrastive_loss, m3_loss
from m3embed.reps import M3Reps, pad_length
from m3embed.scores import dense_scores

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(timeout_s: float = 600.0, backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment (a no-op for one process).

    NCCL on GPUs, gloo on CPU. ``timeout_s`` bounds every collective, so a crashed rank ends the job
    with an error instead of a silent hang.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    return info


def _gather_rows(t: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """All ranks' ``t`` concatenated along dim 0, detached except this rank's slice.

    ``length`` pads dim 1 first (ragged token dimensions). All ranks must hold the same number of rows.
    """
    if length is not None:
        t = pad_length(t, length, dim=1)
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach())
    parts[dist.get_rank()] = t  # keep the graph for our own rows
    return torch.cat(parts)


def _max_over_ranks(value: int, device: torch.device) -> int:
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_reps(reps: M3Reps) -> M3Reps:
    """The global batch's representations (ragged token dimensions padded to the longest rank)."""
    device = reps.dense.device
    rows = _max_over_ranks(len(reps), device)
    if rows != len(reps):
        raise RuntimeError(
            f"rank {dist.get_rank()} has {len(reps)} texts but another rank has {rows}: cross-device "
            "negatives need the same batch size on every rank (use drop_last batches)"
        )
    length = _max_over_ranks(reps.input_ids.shape[1], device)
    return M3Reps(
        dense=_gather_rows(reps.dense),
        token_weights=None if reps.token_weights is None else _gather_rows(reps.token_weights, length),
        colbert=None if reps.colbert is None else _gather_rows(reps.colbert, length - 1),
        input_ids=_gather_rows(reps.input_ids, length),
        attention_mask=_gather_rows(reps.attention_mask, length),
    )


class CrossDeviceGather:
    """Cross-device negatives for :func:`m3embed.step.train_step` (``gather=CrossDeviceGather()``).

    ``negatives="all"`` (m3embed's default): dense, sparse and ColBERT representations are gathered and
    every rank computes the loss of the global batch, so 2 processes × B/2 equal 1 process × B exactly.

    ``negatives="dense"`` (FlagEmbedding's behaviour, for comparisons): only dense representations are
    gathered; the dense contrastive term is over the global batch, sparse, ColBERT, the ensemble and
    self-distillation stay in-batch. The objective is ``dense_global + mean over ranks of the in-batch
    rest``; since gradients are summed over ranks, rank r backpropagates
    ``(1/W)·m3_loss(local scores, dense term := W·dense_global)`` (m3_loss is linear in the dense term).
    FlagEmbedding itself averages gradients with DDP, which scales its dense term by 1/W; we do not.
    """

    def __init__(self, negatives: Literal["all", "dense"] = "all") -> None:
        if negatives not in ("all", "dense"):
            raise ValueError(f"cross-device negatives must be 'all' or 'dense', got {negatives!r}")
        self.negatives = negatives

    def loss(
        self,
        q: M3Reps,
        p: M3Reps,
        teacher: torch.Tensor | None,
        group_size: int,
        config: LossConfig,
        step: int,
    ) -> LossOutput:
        if self.negatives == "all":
            q_all, p_all = gather_reps(q), gather_reps(p)
            teacher_all = None if teacher is None else _gather_rows(teacher)
            return m3_loss(batch_scores(q_all, p_all, config), group_size, config, step, teacher_all)

        world = dist.get_world_size()
        q_dense, p_dense = _gather_rows(q.dense), _gather_rows(p.dense)
        teacher_all = None if teacher is None else _gather_rows(teacher)
        global_scores = dense_scores(q_dense, p_dense) / config.temperature
        dense_global = contrastive_loss(global_scores, group_size, config, _probs(teacher_all))
        local = m3_loss(batch_scores(q, p, config), group_size, config, step, teacher, dense_global * world)
        parts = dict(local.parts, dense=dense_global.detach())
        return LossOutput(local.loss / world, parts)


def _probs(teacher: torch.Tensor | None) -> torch.Tensor | None:
    return None if teacher is None else torch.softmax(teacher, dim=-1)


def all_reduce_gradients(model: torch.nn.Module, bucket_bytes: int = 2**25) -> None:
    """Sum every parameter's gradient over ranks, in flat buckets (once per step, after the last
    sub-batch). Parameters without a gradient on this rank contribute zeros, so no rank waits forever."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
        if size >= bucket_bytes:
            _reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Start every rank from rank 0's weights."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)

"""Everything torch.distributed in one place: process group set-up, cross-device negatives, gradient sync,
and the few collectives that let ranks share work on disk (``on_main``, ``gather_objects``, ``raise_if_any``).

How gradients stay exact (docs/design.md, "Distributed"). Every rank gathers every rank's query
representations (small) with an autograd function, scores its own passages against all of them, and
gathers the score columns, so every rank holds the **global** score matrices and computes the same
loss. The gradient of the loss reaches rank r's parameters along two paths: through its passages (the
score columns it owns, whose gradient it has) and through its queries, whose gradient is split over
every rank's columns; the query gather's backward sums it over ranks. Rank r's parameter gradient is
then its share ``g_r`` of the true gradient ``Σ_r g_r``: one all-reduce with SUM per step (not DDP's
mean, so nothing needs compensating) after the last sub-batch. Because that single all-reduce
happens after all sub-batches, ranks with different numbers of sub-batches cannot hang each other,
and no per-sub-batch synchronisation exists that would need ``no_sync``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

from m3embed.losses import BatchScores, LossOutput, M3Objective, contrastive_loss, m3_loss
from m3embed.reps import M3Reps

logger = logging.getLogger(__name__)
T = TypeVar("T")


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


ONE_PROCESS = DistInfo()  # the default of functions that can share their work among ranks


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


@contextlib.contextmanager
def process_group(timeout_s: float = 600.0) -> Iterator[DistInfo]:
    """:func:`init_from_env` for the length of a ``with`` block, left at its end if the block joined it.

    A group joined before (a training run whose rank 0 evaluates) is kept; one process gets
    ``DistInfo()`` and no group.
    """
    joined = not (dist.is_available() and dist.is_initialized())
    info = init_from_env(timeout_s)
    try:
        yield info
    finally:
        if joined and info.enabled:
            dist.destroy_process_group()


def leave_now(code: int) -> None:
    """End this process with ``code`` at once, after flushing logs and standard streams.

    For a rank that torchrun started, once its command is done and its process group destroyed.
    After a model has run and gloo has carried collectives, the interpreter's own teardown
    (destructors of torch's C++ objects, with no Python frame left) aborts with "terminate called
    without an active exception" in about 1 run of 6 on a loaded 2-core machine, turning a finished
    ``encode`` or ``train`` into exit code -6. Everything this package writes is on disk by then, so
    skipping that teardown loses nothing.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def on_main(fn: Callable[[], T], info: DistInfo) -> T:
    """``fn()`` run by rank 0 alone; every rank returns its result, or raises the exception it raised.

    The others wait for rank 0 (a broadcast), so this is also a barrier; one process just calls ``fn``.
    Rank 0's exception reaches every rank, so none goes on to wait for it at a later collective.
    """
    if not info.enabled:
        return fn()
    outcome: list[Any] = [None]
    if info.is_main:
        try:
            outcome[0] = (fn(), None)
        except Exception as err:  # re-raised below on every rank, rank 0 included
            outcome[0] = (None, err if _picklable(err) else RuntimeError(f"rank 0 failed: {err!r}"))
    dist.broadcast_object_list(outcome, src=0)
    result, error = outcome[0]
    if error is not None:
        raise error
    return result


def _picklable(obj: object) -> bool:
    try:
        pickle.loads(pickle.dumps(obj))
    except Exception:
        return False
    return True


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on any rank (one all-reduce), so all take one decision."""
    if not info.enabled:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: T, info: DistInfo) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` for one process."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def raise_if_any(problem: str | None, info: DistInfo) -> None:
    """Raise ``ValueError`` on every rank if any rank found a problem (``None``: this rank found none).

    A check that only some ranks fail would leave the others waiting at the next collective.
    """
    found = [p for p in gather_objects(problem, info) if p]
    if found:
        raise ValueError("; ".join(found))


class _GatherCat(torch.autograd.Function):
    """Every rank's tensors concatenated along ``dim`` (one all-gather for all of them).

    Backward returns this rank's slice of the gradient: as it is when every rank computes the same
    loss from the gathered values (``sum_grads=False``), summed over ranks first when each rank's
    part of the work reaches the gathered values through different terms (``sum_grads=True``).
    All ranks' tensors must have the same shapes.
    """

    @staticmethod
    def forward(ctx, dim: int, sum_grads: bool, *tensors: torch.Tensor):
        sizes = [t.numel() for t in tensors]
        flat = torch.cat([t.reshape(-1) for t in tensors])
        parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, flat)
        per_rank = [part.split(sizes) for part in parts]
        ctx.dim, ctx.sum_grads, ctx.shapes = dim, sum_grads, [t.shape for t in tensors]
        return tuple(
            torch.cat([chunks[i].view(t.shape) for chunks in per_rank], dim) for i, t in enumerate(tensors)
        )

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        if ctx.sum_grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            grads = tuple(f.view(g.shape) for f, g in zip(flat.split([g.numel() for g in grads]), grads))
        rank, dim = dist.get_rank(), ctx.dim
        own = [g.narrow(dim, rank * shape[dim], shape[dim]) for g, shape in zip(grads, ctx.shapes)]
        return (None, None, *own)


def _gather_cat(tensors: list[torch.Tensor], dim: int, sum_grads: bool) -> list[torch.Tensor]:
    return list(_GatherCat.apply(dim, sum_grads, *tensors))


def _gather_rows(t: torch.Tensor) -> torch.Tensor:
    """All ranks' ``t`` along dim 0, without autograd (token ids, masks, teacher scores)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _same_rows_everywhere(n: int, what: str, device: torch.device) -> None:
    extremes = torch.tensor([n, -n], device=device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    if extremes.tolist() != [n, -n]:
        raise RuntimeError(
            f"rank {dist.get_rank()} has {n} {what} but another rank has a different number: cross-device "
            "negatives need the same batch size on every rank (use drop_last batches)"
        )


def gather_reps(reps: M3Reps) -> M3Reps:
    """The global batch's representations, ragged token dimensions padded to the longest rank's.

    Autograd flows back to this rank's rows, with the gradient summed over ranks (each rank scores its
    own passages against every rank's queries, so each holds part of every query's gradient).
    """
    device = reps.dense.device
    _same_rows_everywhere(len(reps), "texts", device)
    length = torch.tensor([reps.input_ids.shape[1]], device=device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    length = int(length.item())
    padded = reps.padded(length)
    floats = padded.float_tensors()
    gathered = _gather_cat(list(floats.values()), dim=0, sum_grads=True)
    return replace(
        padded,
        **dict(zip(floats, gathered)),
        input_ids=_gather_rows(padded.input_ids),
        attention_mask=_gather_rows(padded.attention_mask),
    )


class CrossDeviceGather:
    """Cross-device negatives for :func:`m3embed.step.train_step` (``gather=CrossDeviceGather()``).

    Every rank scores its own passages against every rank's queries (:func:`gather_reps`: the queries
    are small) and the score columns are gathered, so every rank holds the global ``(B·W, B·G·W)``
    score matrices.

    ``negatives="all"`` (m3embed's default): every rank computes the loss of the global batch from
    them, so 2 processes × B/2 equal 1 process × B exactly.

    ``negatives="dense"`` (FlagEmbedding's behaviour, for comparisons): the dense contrastive term is
    over the global batch; sparse, ColBERT, the ensemble and self-distillation stay in-batch (this
    rank's queries against this rank's passages). The objective is ``dense_global + mean over ranks of
    the in-batch rest``; since gradients are summed over ranks, rank r backpropagates
    ``(1/W)·m3_loss(local scores, dense term := W·dense_global)`` (m3_loss is linear in the dense term).
    FlagEmbedding itself averages gradients with DDP, which scales its dense term by 1/W; we do not.
    """

    def __init__(self, negatives: Literal["all", "dense"] = "all") -> None:
        if negatives not in ("all", "dense"):
            raise ValueError(f"cross-device negatives must be 'all' or 'dense', got {negatives!r}")
        self.negatives = negatives

    def objective(self, local: M3Objective) -> CrossDeviceObjective:
        """``local`` (this rank's objective) turned into the objective of the global batch."""
        return CrossDeviceObjective(local, self.negatives)


@dataclass(frozen=True)
class CrossDeviceObjective:
    """An :class:`m3embed.memory.Objective` over every rank's batch (see :class:`CrossDeviceGather`)."""

    local: M3Objective
    negatives: Literal["all", "dense"]

    def share(self, queries: M3Reps) -> M3Reps:
        return gather_reps(self.local.share(queries))

    def scores(self, queries: M3Reps, passages: M3Reps) -> BatchScores:
        return self.local.scores(queries, passages)

    def loss(self, scores: BatchScores) -> LossOutput:
        """Shapes: scores (Bq·W, Bp), this rank's passages against every rank's queries."""
        local, world, rank = self.local, dist.get_world_size(), dist.get_rank()
        _same_rows_everywhere(scores.dense.shape[1], "passages", scores.dense.device)
        teacher = local.teacher_scores
        teacher_all = None if teacher is None else _gather_rows(teacher)
        if self.negatives == "all":
            parts = scores.tensors()
            columns = _gather_cat(list(parts.values()), dim=1, sum_grads=False)
            global_scores = replace(scores, **dict(zip(parts, columns)))
            return m3_loss(global_scores, local.group_size, local.config, local.step, teacher_all)

        (dense_all,) = _gather_cat([scores.dense], dim=1, sum_grads=False)
        probs = None if teacher_all is None else torch.softmax(teacher_all, dim=-1)
        dense_global = contrastive_loss(dense_all, local.group_size, local.config, probs)
        n = scores.dense.shape[0] // world
        own = scores.map(lambda t: t[rank * n : (rank + 1) * n])  # this rank's queries (in-batch)
        out = m3_loss(own, local.group_size, local.config, local.step, teacher, dense_global * world)
        return LossOutput(out.loss / world, dict(out.parts, dense=dense_global.detach()))


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

"""Memory strategies for one contrastive training step: ``none``, ``checkpoint`` and ``cache``.

All three take an encode function and a loss function and give the same loss and the same gradients
(DESIGN.md section 4); they differ only in what they hold until backward:

- ``none``: encode every sub-batch with autograd, one loss, one backward (holds every activation);
- ``checkpoint``: the same with gradient checkpointing in the encoder (holds each layer's input);
- ``cache``: gradient caching (Gao et al. 2021): encode without grad, backprop the loss to the
  representations only, then re-encode one sub-batch at a time with the same RNG state and backprop
  ``Σ rep·cached_grad`` (holds the representations and one sub-batch's activations).

The memory trick knows nothing about the objective: ``loss_fn(q_reps, p_reps) -> LossOutput``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

from m3embed.losses import LossOutput
from m3embed.reps import M3Reps, merge, split_like

logger = logging.getLogger(__name__)

EncodeFn = Callable[[torch.Tensor, torch.Tensor], M3Reps]
LossFn = Callable[[M3Reps, M3Reps], LossOutput]
Strategy = Literal["none", "checkpoint", "cache"]
STRATEGIES = ("none", "checkpoint", "cache")


@dataclass(frozen=True)
class MemoryConfig:
    """How a batch is split and what is kept for backward."""

    strategy: Strategy = "cache"
    # Most texts per sub-batch; None = the whole batch at once; "auto" = the largest that fits
    # ``memory_budget`` according to a short measured probe.
    sub_batch_size: int | Literal["auto"] | None = 8
    # Most padded tokens (texts × longest length) per sub-batch; None = no token budget.
    sub_batch_tokens: int | None = None
    # Bytes of activations one sub-batch may hold for "auto"; None = memory_fraction of free memory.
    memory_budget: int | None = None
    memory_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"MemoryConfig.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        size = self.sub_batch_size
        if not (size is None or size == "auto" or (isinstance(size, int) and size >= 1)):
            raise ValueError(
                f"MemoryConfig.sub_batch_size must be a positive int, 'auto' or None, got {size!r}"
            )
        if self.sub_batch_tokens is not None and self.sub_batch_tokens < 1:
            raise ValueError(
                f"MemoryConfig.sub_batch_tokens must be positive or None, got {self.sub_batch_tokens}"
            )
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"MemoryConfig.memory_fraction must be in (0, 1], got {self.memory_fraction}")


@dataclass
class TokenBatch:
    """A tokenised, right-padded batch of texts. Shapes: input_ids, attention_mask (N, L)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(1)

    def select(self, rows: torch.Tensor) -> TokenBatch:
        """Rows ``rows``, padded only to their own longest text."""
        mask = self.attention_mask[rows]
        length = int(mask.sum(1).max())
        return TokenBatch(self.input_ids[rows, :length], mask[:, :length])


# ---------------------------------------------------------------------- sub-batching
def plan_sub_batches(
    lengths: torch.Tensor, max_size: int | None, max_tokens: int | None
) -> list[torch.Tensor]:
    """Cut a batch into sub-batches of similar length.

    Texts are sorted longest first; a sub-batch grows while it has fewer than ``max_size`` texts and
    (texts × its longest length) stays within ``max_tokens``. Returns the batch rows of each sub-batch.

    Shapes: lengths (N,) -> list of (n_k,) index tensors covering 0..N-1 once.
    """
    order = torch.argsort(lengths.cpu(), descending=True, stable=True)
    plan, current, longest = [], [], 0
    for row in order.tolist():
        length = int(lengths[row])
        longest_if_added = max(longest, length)
        too_many = max_size is not None and len(current) >= max_size
        too_long = max_tokens is not None and current and (len(current) + 1) * longest_if_added > max_tokens
        if current and (too_many or too_long):
            plan.append(torch.tensor(current))
            current, longest_if_added = [], length
        current.append(row)
        longest = longest_if_added
    if current:
        plan.append(torch.tensor(current))
    return plan


class RandContext:
    """Capture the RNG state now; ``with ctx:`` replays from it (so dropout masks repeat) and leaves the
    outside RNG untouched."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self._fork: contextlib.ExitStack | None = None

    def __enter__(self) -> None:
        self._fork = contextlib.ExitStack()
        devices = [self.device] if self.device.type == "cuda" else []
        self._fork.enter_context(torch.random.fork_rng(devices=devices))
        torch.set_rng_state(self.cpu_state)
        if self.cuda_state is not None:
            torch.cuda.set_rng_state(self.cuda_state, self.device)

    def __exit__(self, *exc) -> None:
        assert self._fork is not None
        self._fork.close()
        self._fork = None


# ---------------------------------------------------------------------- the step
def run_step(
    encode: EncodeFn,
    loss_fn: LossFn,
    queries: TokenBatch,
    passages: TokenBatch,
    config: MemoryConfig,
    *,
    gradient_checkpointing: Callable[[bool], None] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> LossOutput:
    """Forward and backward of one batch; gradients are left in the parameters' ``.grad``.

    ``gradient_checkpointing(on)`` switches the encoder's own layer checkpointing for the
    ``checkpoint`` strategy (without it, each sub-batch's encode is checkpointed as a whole).
    ``no_sync()`` (DDP's) suppresses gradient all-reduce for all re-encoded sub-batches but the last.
    Returns the loss (detached) and its parts.
    """
    size = config.sub_batch_size
    if size == "auto":
        size = choose_sub_batch_size(encode, queries, passages, config)
    q_plan = plan_sub_batches(queries.lengths(), size, config.sub_batch_tokens)
    p_plan = plan_sub_batches(passages.lengths(), size, config.sub_batch_tokens)

    if config.strategy == "cache":
        return _cached_step(encode, loss_fn, queries, passages, q_plan, p_plan, no_sync)
    if config.strategy == "checkpoint":
        if gradient_checkpointing is None:
            return _plain_step(_checkpointed(encode), loss_fn, queries, passages, q_plan, p_plan)
        gradient_checkpointing(True)
        try:
            return _plain_step(encode, loss_fn, queries, passages, q_plan, p_plan)
        finally:
            gradient_checkpointing(False)
    return _plain_step(encode, loss_fn, queries, passages, q_plan, p_plan)


def _plain_step(encode, loss_fn, queries, passages, q_plan, p_plan) -> LossOutput:
    """``none`` / ``checkpoint``: every sub-batch's graph stays alive until the one backward."""
    q = merge([encode(*_args(queries.select(rows))) for rows in q_plan], q_plan)
    p = merge([encode(*_args(passages.select(rows))) for rows in p_plan], p_plan)
    out = loss_fn(q, p)
    out.loss.backward()
    return LossOutput(out.loss.detach(), out.parts)


def _cached_step(encode, loss_fn, queries, passages, q_plan, p_plan, no_sync) -> LossOutput:
    """``cache``: gradient caching, in three steps."""
    jobs = [(queries, rows) for rows in q_plan] + [(passages, rows) for rows in p_plan]

    # Step (1): encode every sub-batch without grad, remembering the RNG state each one started from.
    states, reps = [], []
    with torch.no_grad():
        for batch, rows in jobs:
            sub = batch.select(rows)
            states.append(RandContext(sub.input_ids.device))
            reps.append(encode(*_args(sub)))
    n_q = len(q_plan)
    q = merge(reps[:n_q], q_plan).detach(requires_grad=True)
    p = merge(reps[n_q:], p_plan).detach(requires_grad=True)
    del reps

    # Step (2): the loss on the detached representations; backward stops at them (the cache).
    out = loss_fn(q, p)
    out.loss.backward()
    grads = split_like(_grads_of(q), q_plan, [_longest(queries, r) for r in q_plan]) + split_like(
        _grads_of(p), p_plan, [_longest(passages, r) for r in p_plan]
    )
    del q, p

    # Step (3): re-encode each sub-batch with its RNG state and backprop Σ rep·cached_grad.
    for k, ((batch, rows), state, grad) in enumerate(zip(jobs, states, grads)):
        last = k == len(jobs) - 1
        sync = contextlib.nullcontext() if (no_sync is None or last) else no_sync()
        with sync, state:
            rep = encode(*_args(batch.select(rows)))
            surrogate = sum((t * grad[name]).sum() for name, t in rep.float_tensors().items())
            surrogate.backward()
    return LossOutput(out.loss.detach(), out.parts)


def _longest(batch: TokenBatch, rows: torch.Tensor) -> int:
    return int(batch.attention_mask[rows].sum(1).max())


def _grads_of(reps: M3Reps) -> M3Reps:
    def grad(t):
        if t is None:
            return None
        return t.grad if t.grad is not None else torch.zeros_like(t)

    return M3Reps(
        grad(reps.dense), grad(reps.token_weights), grad(reps.colbert), reps.input_ids, reps.attention_mask
    )


def _args(batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    return batch.input_ids, batch.attention_mask


def _checkpointed(encode: EncodeFn) -> EncodeFn:
    """Checkpoint a whole encode call (for encoders without layer-level checkpointing)."""

    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> M3Reps:
        def fn(ids, mask):
            r = encode(ids, mask)
            return r.dense, r.token_weights, r.colbert

        dense, weights, colbert = checkpoint(fn, input_ids, attention_mask, use_reentrant=False)
        return M3Reps(dense, weights, colbert, input_ids, attention_mask)

    return run


# ---------------------------------------------------------------------- sub_batch_size="auto"
def choose_sub_batch_size(
    encode: EncodeFn, queries: TokenBatch, passages: TokenBatch, config: MemoryConfig
) -> int:
    """The largest sub-batch whose activations fit the memory budget, from a measured probe.

    Encodes 1 and then 2 of the longest passages with autograd (RNG untouched), counts the bytes
    autograd saves for backward, fits ``bytes(s) = a + b·s`` and solves for the budget.
    """
    longest = passages if passages.input_ids.shape[1] >= queries.input_ids.shape[1] else queries
    top = torch.argsort(longest.lengths(), descending=True)[:2]
    device = longest.input_ids.device
    budget = config.memory_budget or int(config.memory_fraction * available_memory(device))
    with RandContext(device):
        one = _saved_bytes(encode, longest.select(top[:1]))
        two = _saved_bytes(encode, longest.select(top[:2].repeat(2)[:2]))
    per_text = max(two - one, 1)
    fixed = max(one - per_text, 0)
    size = max(1, min(len(passages), (budget - fixed) // per_text))
    logger.info(
        "sub_batch_size=auto: %d texts (budget %.1f MiB, %.2f MiB per text at length %d)",
        size,
        budget / 2**20,
        per_text / 2**20,
        longest.input_ids.shape[1],
    )
    return int(size)


def _saved_bytes(encode: EncodeFn, batch: TokenBatch) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reps = encode(*_args(batch))
        del reps
    return sum(seen.values())


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device`` (CUDA: the driver's free memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))

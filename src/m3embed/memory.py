"""Memory strategies for one contrastive training step: ``none``, ``checkpoint`` and ``cache``.

All three take an encode function and an objective and give the same loss and the same gradients
(docs/design.md, "Memory"); they differ only in what they hold until backward:

- ``none``: encode every sub-batch with autograd, one loss, one backward (holds every activation);
- ``checkpoint``: the same with gradient checkpointing in the encoder (holds each layer's input);
- ``cache``: gradient caching (Gao et al. 2021) with the passages cached at the score level. Queries
  are encoded without grad and kept as representations (short, few); each passage sub-batch is
  encoded without grad, scored against all queries and dropped, so only its score columns stay; the
  loss is backpropagated to the score matrices; each passage sub-batch is re-encoded with the same
  RNG state and backpropagates ``Σ S_block·dL/dS_block`` (which also accumulates the queries'
  representation gradients; the last sub-batch keeps its graph from the first pass instead of being
  re-encoded); last the queries are re-encoded and backpropagate ``Σ rep·cached_grad``.
  It holds the query representations, the ``(Bq, Bp)`` score matrices and one sub-batch's
  activations, whatever the number, length or width of the passages. With ``layer_checkpointing``
  every pass with grad (the kept sub-batch, steps (4) and (5)) runs under the encoder's layer
  checkpointing, so that one sub-batch holds its layers' inputs plus one layer, not every activation;
  the passes without grad are unchanged.

The memory trick knows nothing about the objective beyond :class:`Objective`: a score function of
(queries, a block of passages) and a loss function of whole score matrices.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Literal, Protocol, get_args

import torch
from torch.utils.checkpoint import checkpoint

from m3embed.heap_trim import HeapTrim
from m3embed.losses import BatchScores, LossOutput
from m3embed.reps import M3Reps, inverse_permutation, merge, split_like
from m3embed.settings import AT_LEAST_1, Bounds, check_fields, setting
from m3embed.tensor_bytes import available_memory, peak_live_bytes, saved_bytes

logger = logging.getLogger(__name__)

EncodeFn = Callable[[torch.Tensor, torch.Tensor], M3Reps]
CheckpointingFn = Callable[[bool], None]


class Objective(Protocol):
    """What a strategy needs of the objective, at the score level (e.g. ``m3embed.losses.M3Objective``).

    Every score must be a function of one query and one passage, so that a block of passages can be
    scored on its own and its columns concatenated with the others'.
    """

    def share(self, queries: M3Reps) -> M3Reps:
        """This process's queries -> those every passage is scored against (autograd flows back)."""
        ...

    def scores(self, queries: M3Reps, passages: M3Reps) -> BatchScores:
        """Shapes: queries (Bq, ...), passages (b, ...) -> each score (Bq, b)."""
        ...

    def loss(self, scores: BatchScores) -> LossOutput:
        """The objective of the whole batch from its score matrices, each (Bq, Bp)."""
        ...


Strategy = Literal["none", "checkpoint", "cache"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


@dataclass(frozen=True)
class MemoryConfig:
    """How a batch is split and what is kept for backward."""

    strategy: Strategy = setting(
        "cache",
        "none: plain autograd; checkpoint: FlagEmbedding's (gradient checkpointing + sub-batches); cache: "
        "gradient caching, memory flat in the batch size",
    )
    sub_batch_size: int | Literal["auto"] | None = setting(
        8,
        "texts encoded at once; auto = largest fitting --memory-budget according to a short measured "
        "probe; none = whole batch",
        metavar="N|auto|none",
        bounds=AT_LEAST_1,
    )
    sub_batch_tokens: int | None = setting(
        None,
        "most padded tokens (texts x longest length) per sub-batch; unset = no token budget",
        metavar="TOKENS",
        bounds=AT_LEAST_1,
    )
    memory_budget: int | None = setting(
        None,
        "activation budget of one sub-batch for --sub-batch-size auto; unset = --memory-fraction of free memory",
        metavar="BYTES",
        bounds=AT_LEAST_1,
    )
    memory_fraction: float = setting(
        0.5,
        "share of free memory that --sub-batch-size auto may plan for",
        metavar="FRACTION",
        bounds=Bounds(gt=0, le=1),
    )
    layer_checkpointing: bool = setting(
        False,
        "cache: run its passes with grad under the encoder's layer checkpointing, so a sub-batch holds its "
        "layers' inputs plus one layer instead of every activation (less memory, larger --sub-batch-size "
        "auto, one more forward per sub-batch); checkpoint always does this",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.layer_checkpointing and self.strategy == "none":
            raise ValueError(
                "MemoryConfig.layer_checkpointing needs strategy 'cache' (or 'checkpoint', which always "
                "checkpoints layers), got strategy 'none', which keeps every activation by definition"
            )


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
    objective: Objective,
    queries: TokenBatch,
    passages: TokenBatch,
    config: MemoryConfig,
    *,
    gradient_checkpointing: CheckpointingFn | None = None,
) -> LossOutput:
    """Forward and backward of one batch; gradients are left in the parameters' ``.grad``.

    ``gradient_checkpointing(on)`` switches the encoder's own layer checkpointing for the
    ``checkpoint`` strategy and for ``cache`` with ``layer_checkpointing`` (without it, each sub-batch's
    encode is checkpointed as a whole).
    Returns the objective's :class:`LossOutput`, detached: what it backpropagated and what it reports.
    """
    size = config.sub_batch_size
    if size == "auto":
        size = choose_sub_batch_size(
            encode, queries, passages, config, gradient_checkpointing=gradient_checkpointing
        )
    q_plan = plan_sub_batches(queries.lengths(), size, config.sub_batch_tokens)
    p_plan = plan_sub_batches(passages.lengths(), size, config.sub_batch_tokens)

    if config.strategy == "cache":
        grad_encode = encode
        if config.layer_checkpointing:
            grad_encode = layer_checkpointed(encode, gradient_checkpointing)
        return _cached_step(encode, grad_encode, objective, queries, passages, q_plan, p_plan)
    if config.strategy == "checkpoint":
        if gradient_checkpointing is None:
            return _plain_step(_checkpointed(encode), objective, queries, passages, q_plan, p_plan)
        gradient_checkpointing(True)
        try:
            return _plain_step(encode, objective, queries, passages, q_plan, p_plan)
        finally:
            gradient_checkpointing(False)
    return _plain_step(encode, objective, queries, passages, q_plan, p_plan)


def _plain_step(encode, objective, queries, passages, q_plan, p_plan) -> LossOutput:
    """``none`` / ``checkpoint``: every sub-batch's graph stays alive until the one backward."""
    q = merge([encode(*_args(queries.select(rows))) for rows in q_plan], q_plan)
    p = merge([encode(*_args(passages.select(rows))) for rows in p_plan], p_plan)
    out = objective.loss(objective.scores(objective.share(q), p))
    out.loss.backward()
    return out.detached()


def _cached_step(encode, grad_encode, objective, queries, passages, q_plan, p_plan) -> LossOutput:
    """``cache``: queries cached as representations, passages as score columns, in five steps.
    ``encode`` runs the passes without grad, ``grad_encode`` those with grad (the same encoder, maybe
    layer-checkpointed)."""
    # Step (1): encode the queries without grad, remembering the RNG state each sub-batch started from;
    # keep their representations (short texts, few of them). ``q_all`` are the queries every passage
    # is scored against (every rank's, under cross-device negatives), with autograd back to ``q``.
    trim = HeapTrim(queries.input_ids.device)
    with torch.no_grad():
        q_states, q_parts = zip(*_sub_batches(encode, queries, q_plan, trim))
    q = merge(list(q_parts), q_plan).detach(requires_grad=True)
    del q_parts
    q_all = objective.share(q)
    q_leaf = q_all.detach(requires_grad=True)  # collects dL/dq over every passage block of step (4)
    for t in q_leaf.float_tensors().values():
        t.grad = torch.zeros_like(t)  # allocated once, so a score function may add into it in place

    # Step (2): the score columns of every passage sub-batch against all queries (see _score_passages).
    *replayed, kept_rows = p_plan
    scores, kept, p_states = _score_passages(encode, grad_encode, objective, q_leaf, passages, p_plan, trim)

    # Step (3): the loss on the whole score matrices; backward stops at them: dL/dS, each (Bq, Bp).
    out = objective.loss(scores)
    out.loss.backward()
    score_grads = scores.map(_grad_or_zeros)
    del scores
    trim.now()  # the loss's temporaries, (Bq, Bp) each, are dead: give their heap back before step (4)

    # Step (4): backprop Σ S_block·dL/dS_block for each passage sub-batch (the kept one first, the others
    # re-encoded with their RNG state and re-scored): parameter gradients through the passages, and
    # dL/dq accumulates in q_leaf.
    def columns_of(rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return score_grads.map(lambda g: g[:, rows.to(g.device)]).tensors()

    _backward_dot(kept.tensors(), columns_of(kept_rows))
    del kept
    trim.now()  # the kept sub-batch's activations are dead: give their heap back before the re-encodes
    for rows, state in zip(replayed, p_states):
        with state:
            block = objective.scores(q_leaf, grad_encode(*_args(passages.select(rows))))
            _backward_dot(block.tensors(), columns_of(rows))
        del block
        trim()

    # Step (5): the queries' gradients (summed over ranks by ``share``'s backward), then re-encode each
    # query sub-batch with its RNG state and backprop Σ rep·cached_grad.
    _backward_dot(q_all.float_tensors(), q_leaf.map(_grad_or_zeros).float_tensors())
    q_grads = split_like(q.map(_grad_or_zeros), q_plan, [_longest(queries, r) for r in q_plan])
    del q, q_all, q_leaf
    for rows, state, grad in zip(q_plan, q_states, q_grads):
        with state:
            rep = grad_encode(*_args(queries.select(rows)))
            _backward_dot(rep.float_tensors(), grad)
        del rep
        trim()
    return out.detached()


def _score_passages(encode, grad_encode, objective, q_leaf, passages, p_plan, trim: HeapTrim):
    """Step (2) of ``cache``: each passage sub-batch but the last encoded without grad and scored
    against all queries; only its score columns are kept, its representations are dropped. The last
    one is encoded and scored with grad and its graph kept, so step (4) backpropagates it without
    re-encoding it (one sub-batch's activations, which step (4) holds anyway).

    Returns the score matrices in batch order (leaves that will receive dL/dS), the kept sub-batch's
    scores (with graph) and the RNG state of each other sub-batch.
    """
    *replayed, kept_rows = p_plan
    p_states, columns = [], []
    with torch.no_grad():
        for state, reps in _sub_batches(encode, passages, replayed, trim):
            p_states.append(state)
            columns.append(objective.scores(q_leaf, reps))
        reps = None  # the last sub-batch's representations, kept alive by the loop variable
    kept = objective.scores(q_leaf, grad_encode(*_args(passages.select(kept_rows))))
    columns.append(kept.map(torch.Tensor.detach))
    batch_order = inverse_permutation(p_plan, columns[0].dense.device)
    scores = BatchScores.cat(columns).map(lambda t: t[:, batch_order].requires_grad_())
    return scores, kept, p_states


def _sub_batches(encode, batch: TokenBatch, plan, trim: HeapTrim) -> Iterator[tuple[RandContext, M3Reps]]:
    """Each sub-batch's representations, with the RNG state its encode started from (run it under
    ``torch.no_grad()``; the heap is trimmed once the caller is done with each sub-batch)."""
    for rows in plan:
        sub = batch.select(rows)
        state = RandContext(sub.input_ids.device)
        yield state, encode(*_args(sub))
        trim()


def _backward_dot(tensors: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
    """Backprop ``Σ_name (tensors[name] · grads[name]).sum()``; tensors without a graph are skipped."""
    pairs = [(t, grads[name]) for name, t in tensors.items() if t.requires_grad]
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g.to(t.dtype) for t, g in pairs])


def _grad_or_zeros(t: torch.Tensor) -> torch.Tensor:
    return t.grad if t.grad is not None else torch.zeros_like(t)


def _longest(batch: TokenBatch, rows: torch.Tensor) -> int:
    return int(batch.attention_mask[rows].sum(1).max())


def _args(batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    return batch.input_ids, batch.attention_mask


def layer_checkpointed(encode: EncodeFn, gradient_checkpointing: CheckpointingFn | None) -> EncodeFn:
    """``encode`` with the encoder's layer checkpointing switched on for the call (non-reentrant, so
    each layer's recompute replays its RNG state: dropout masks repeat); without
    ``gradient_checkpointing``, the whole call is checkpointed instead."""
    if gradient_checkpointing is None:
        return _checkpointed(encode)

    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> M3Reps:
        gradient_checkpointing(True)
        try:
            return encode(input_ids, attention_mask)
        finally:  # the recompute in backward calls the layers directly: the switch may go off now
            gradient_checkpointing(False)

    return run


def _checkpointed(encode: EncodeFn) -> EncodeFn:
    """Checkpoint a whole encode call (for encoders without layer-level checkpointing)."""

    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> M3Reps:
        names: list[str] = []

        def fn(ids, mask):
            floats = encode(ids, mask).float_tensors()
            names[:] = floats
            return tuple(floats.values())

        outputs = checkpoint(fn, input_ids, attention_mask, use_reentrant=False)
        empty = M3Reps(outputs[0], None, None, input_ids, attention_mask)
        return replace(empty, **dict(zip(names, outputs)))

    return run


# ---------------------------------------------------------------------- sub_batch_size="auto"
def choose_sub_batch_size(
    encode: EncodeFn,
    queries: TokenBatch,
    passages: TokenBatch,
    config: MemoryConfig,
    *,
    gradient_checkpointing: CheckpointingFn | None = None,
) -> int:
    """The largest sub-batch whose activations fit the memory budget, from a measured probe.

    Encodes 1 and then 2 of the longest passages with autograd (RNG untouched), measures the bytes
    they hold, fits ``bytes(s) = a + b·s`` and solves for the budget. What is measured is what a grad
    pass of ``config``'s step holds: the bytes autograd saves for backward, or, for ``cache`` with
    ``layer_checkpointing``, the peak bytes alive through the layer-checkpointed encode and its
    backward (layer inputs plus one recomputed layer: far fewer per text, so a larger sub-batch).
    """
    longest = passages if passages.input_ids.shape[1] >= queries.input_ids.shape[1] else queries
    top = torch.argsort(longest.lengths(), descending=True)[:2]
    device = longest.input_ids.device
    budget = config.memory_budget or int(config.memory_fraction * available_memory(device))
    if config.strategy == "cache" and config.layer_checkpointing:
        grad_encode = layer_checkpointed(encode, gradient_checkpointing)
        measure = lambda b: peak_live_bytes(lambda: grad_encode(*_args(b)).float_tensors().values())  # noqa: E731
    else:
        measure = lambda b: saved_bytes(lambda: encode(*_args(b)))  # noqa: E731
    with RandContext(device):
        one = measure(longest.select(top[:1]))
        two = measure(longest.select(top[:2].repeat(2)[:2]))
    per_text = max(two - one, 1)
    fixed = max(one - per_text, 0)
    size = max(1, min(len(passages), (budget - fixed) // per_text))
    logger.info(
        "sub_batch_size=auto: %d texts (budget %.1f MiB, %.2f MiB per text at length %d%s)",
        size,
        budget / 2**20,
        per_text / 2**20,
        longest.input_ids.shape[1],
        ", layer checkpointing" if config.layer_checkpointing else "",
    )
    return int(size)

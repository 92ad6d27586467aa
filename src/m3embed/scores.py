"""Query-passage scores of the three outputs: pure functions of tensors, shared by inference and losses.

Batch scores are memory-lean by construction:
- sparse: each query is pooled to (row, token, max weight) entries and passages to the queries'
  tokens only, so no ``(B, L, vocab)``, ``(B, vocab)`` or ``(Bq, query tokens)`` tensor exists;
- colbert: MaxSim is computed a block of queries × passages at a time, so only one ``(a, Lq, b, Lp)``
  block of at most ``block_elements`` similarities exists at once, whatever the batch, and backward
  uses the kept argmax positions instead of the similarity tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

# ---------------------------------------------------------------------- retrieval modes and fusion
Output = Literal["dense", "sparse", "colbert"]
OUTPUTS: tuple[Output, ...] = ("dense", "sparse", "colbert")  # the order of every weights triple
# Each mode is the weighted mean of the outputs it names (FlagEmbedding's ``compute_score`` keys); the
# name is its outputs joined by "+", so a mode's name and what it needs cannot disagree.
MODE_OUTPUTS: dict[str, tuple[Output, ...]] = {
    "+".join(outputs): outputs
    for outputs in (
        ("dense",),
        ("sparse",),
        ("colbert",),
        ("sparse", "dense"),
        ("colbert", "sparse", "dense"),
    )
}
MODES: tuple[str, ...] = tuple(MODE_OUTPUTS)
# (dense, sparse, colbert): the weights FlagEmbedding's README recommends for BGE-M3 retrieval.
DEFAULT_WEIGHTS: tuple[float, float, float] = (0.4, 0.2, 0.4)
# FlagEmbedding's ``compute_score`` default (``weights_for_different_modes=None``): plain means.
PAIR_SCORE_WEIGHTS: tuple[float, float, float] = (1.0, 1.0, 1.0)

ScoreT = TypeVar("ScoreT")


def check_modes(modes: Sequence[str], what: str = "modes") -> None:
    """ValueError naming ``what``, the unknown modes and the known ones."""
    unknown = [m for m in modes if m not in MODE_OUTPUTS]
    if unknown:
        raise ValueError(f"{what} must be one of {', '.join(MODES)}; got {', '.join(map(repr, unknown))}")


def check_weights(weights: Sequence[float], what: str) -> tuple[float, float, float]:
    """``weights`` as a float triple (dense, sparse, colbert); ValueError naming ``what`` otherwise."""
    if len(weights) != len(OUTPUTS):
        raise ValueError(f"{what} must be [dense, sparse, colbert], got {list(weights)}")
    return tuple(float(w) for w in weights)  # type: ignore[return-value]


def fuse(
    scores: Mapping[str, ScoreT], weights: Sequence[float], modes: Sequence[str] = MODES
) -> dict[str, ScoreT]:
    """Every mode's score from the outputs' scores: the weighted mean of the outputs the mode names.

    ``sparse+dense = (w_s·s + w_d·d) / (w_s + w_d)``,
    ``colbert+sparse+dense = (w_c·c + w_s·s + w_d·d) / (w_c + w_s + w_d)``; a one-output mode is
    that output's score. ``scores`` maps output names to arrays (or tensors) of one shape; only the
    outputs ``modes`` name need to be there. ``weights`` = (w_dense, w_sparse, w_colbert).
    """
    w = dict(zip(OUTPUTS, check_weights(weights, "fusion weights")))
    fused: dict[str, Any] = {}
    for mode in modes:
        outputs = MODE_OUTPUTS[mode]
        if len(outputs) == 1:
            fused[mode] = scores[outputs[0]]
        else:
            fused[mode] = sum(w[o] * scores[o] for o in outputs) / sum(w[o] for o in outputs)
    return fused


# Elements of one MaxSim / sparse block: 2**20 fp32 elements = 4 MiB. Blocks this size already run at
# full matmul speed on CPU (2**20 to 2**24 timed alike), and a smaller block is what keeps the
# score-level cache's memory flat in the number of queries.
DEFAULT_BLOCK_ELEMENTS = 2**20


def dense_scores(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Inner products of every query with every passage.

    Shapes: q (Bq, D), p (Bp, D) -> (Bq, Bp).
    """
    return q @ p.T


def sparse_scores(
    q_ids: torch.Tensor,
    q_weights: torch.Tensor,
    p_ids: torch.Tensor,
    p_weights: torch.Tensor,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Lexical matching scores ``Σ_{t in q∩p} w_q(t)·w_p(t)`` with ``w(t)`` the max weight of token t.

    Weights are non-negative and zero where a position must not count (padding, special tokens).
    Each query is pooled to one entry per distinct token (row, token, max weight): at most ``Bq·Lq``
    entries, never a ``(Bq, vocabulary)`` matrix. Passages are pooled per token of the queries'
    vocabulary (tokens no query has cannot score), a block of passages at a time, and each entry
    gathers its token's passage weight, so one block holds ``b × (entries + query tokens)`` floats.

    Shapes: q_ids, q_weights (Bq, Lq); p_ids, p_weights (Bp, Lp) -> (Bq, Bp).
    """
    rows, tokens, weights = _query_entries(q_ids, q_weights)  # (K,) each
    vocab, entry_local = torch.unique(tokens, return_inverse=True)  # (U,), (K,)
    n_local = vocab.numel()
    pos = torch.searchsorted(vocab, p_ids).clamp(max=n_local - 1)  # (Bp, Lp)
    # Passage tokens outside the query vocabulary go to a dump column n_local, which no entry reads.
    p_local = torch.where(vocab[pos] == p_ids, pos, torch.full_like(pos, n_local))

    block = max(1, block_elements // (weights.numel() + n_local + 1))
    out = []
    for start in range(0, p_ids.shape[0], block):
        stop = start + block
        out.append(
            _maybe_checkpoint(
                _sparse_block,
                weights,
                p_local[start:stop],
                p_weights[start:stop],
                entry_local,
                rows,
                n_local,
                q_ids.shape[0],
            )
        )
    return torch.cat(out, dim=1)


def _query_entries(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each query's distinct tokens with their max weight. Shapes: (Bq, Lq) -> rows, tokens, weights (K,)."""
    span = int(ids.max()) + 1 if ids.numel() else 1
    keys, entry = torch.unique(
        torch.arange(ids.shape[0], device=ids.device)[:, None] * span + ids, return_inverse=True
    )
    pooled = weights.new_zeros(keys.numel()).scatter_reduce(
        0, entry.reshape(-1), weights.reshape(-1), reduce="amax", include_self=True
    )
    return keys // span, keys % span, pooled


def _max_pool(local_ids: torch.Tensor, weights: torch.Tensor, n_local: int) -> torch.Tensor:
    """(B, L) positions -> (B, n_local) max weight per batch-local token id (0 where absent)."""
    pooled = weights.new_zeros(weights.shape[0], n_local)
    return pooled.scatter_reduce(1, local_ids, weights, reduce="amax", include_self=True)


def _sparse_block(
    q_entries: torch.Tensor,
    p_local: torch.Tensor,
    p_weights: torch.Tensor,
    entry_local: torch.Tensor,
    entry_rows: torch.Tensor,
    n_local: int,
    n_queries: int,
) -> torch.Tensor:
    """Scores of every query against a block of passages. Shapes: q_entries (K,), p (b, Lp) -> (Bq, b)."""
    p_pooled = _max_pool(p_local, p_weights, n_local + 1)  # (b, U + 1)
    matched = p_pooled[:, entry_local] * q_entries  # (b, K): w_p(token of entry)·w_q(entry)
    out = matched.new_zeros(p_pooled.shape[0], n_queries).index_add_(1, entry_rows, matched)
    return out.T  # (Bq, b)


def colbert_scores(
    q_vecs: torch.Tensor,
    q_mask: torch.Tensor,
    p_vecs: torch.Tensor,
    p_mask: torch.Tensor,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """ColBERT MaxSim ``(1/n_q) Σ_i max_j q_i·p_j`` over valid query tokens i and passage tokens j.

    Padding never wins the max (it is masked out, not left at 0), so scores do not depend on how much
    padding a batch has. The similarity tensor is built one block of queries × passages at a time
    (at most ``block_elements`` similarities, or one query × one passage), so its memory does not grow
    with either batch; only the argmax positions are kept for backward (int32, ``Bq·Lq·Bp`` of them),
    which gathers and scatters each block's gradient at them instead of recomputing the block.

    When ``q_vecs`` is a leaf whose ``.grad`` is already allocated (the score-level cache's queries,
    scored against one passage block after another), backward adds the queries' gradient into that
    ``.grad`` in place, as autograd's own accumulation would, instead of returning a second
    ``(Bq, Lq, C)`` tensor for autograd to add; ``torch.autograd.grad`` with respect to such a leaf
    therefore sees no gradient (use ``.backward()``).

    Shapes: q_vecs (Bq, Lq, C), q_mask (Bq, Lq), p_vecs (Bp, Lp, C), p_mask (Bp, Lp) -> (Bq, Bp).
    """
    return _MaxSim.apply(q_vecs, q_mask.to(q_vecs.dtype), p_vecs, p_mask.bool(), block_elements)


def _sim_blocks(q: torch.Tensor, p: torch.Tensor, block_elements: int) -> Iterator[tuple[slice, slice]]:
    """(query rows, passage rows) of each similarity block: whole passage rows first, then fewer
    queries once one passage against every query exceeds ``block_elements``."""
    (bq, lq, _), (bp, lp, _) = q.shape, p.shape
    per_pair = lq * lp
    q_step = max(1, min(bq, block_elements // max(1, per_pair)))
    p_step = max(1, block_elements // max(1, q_step * per_pair))
    for p_start in range(0, bp, p_step):
        for q_start in range(0, bq, q_step):
            yield slice(q_start, q_start + q_step), slice(p_start, p_start + p_step)


class _MaxSim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, q_mask, p, p_mask, block_elements):
        bq, lq, c = q.shape
        bp, lp, _ = p.shape
        n_q = q_mask.sum(1).clamp(min=1)  # (Bq,)
        has_tokens = p_mask.any(-1)  # (Bp,): an all-padding passage scores 0
        scores = q.new_empty(bq, bp)
        argmax = torch.empty(bq, lq, bp, dtype=torch.int32 if lp < 2**31 else torch.int64, device=q.device)
        for qs, ps in _sim_blocks(q, p, block_elements):
            q_block, p_block = q[qs], p[ps]  # (a, Lq, C), (b, Lp, C)
            sim = (q_block.reshape(-1, c) @ p_block.reshape(-1, c).T).view(
                q_block.shape[0], lq, p_block.shape[0], lp
            )  # (a, Lq, b, Lp)
            sim.masked_fill_(~p_mask[ps][None, None], torch.finfo(sim.dtype).min)
            best, idx = sim.max(dim=-1)  # (a, Lq, b)
            del sim
            best = best * has_tokens[ps]
            scores[qs, ps] = (best * q_mask[qs, :, None]).sum(1) / n_q[qs, None]
            argmax[qs, :, ps] = idx
        ctx.save_for_backward(q, q_mask, p, has_tokens, argmax)
        ctx.block_elements = block_elements
        ctx.q_grad_in_place = q.is_leaf and q.grad is not None and q.grad.shape == q.shape
        return scores

    @staticmethod
    def backward(ctx, grad):
        q, q_mask, p, has_tokens, argmax = ctx.saved_tensors
        c = q.shape[2]
        lp = p.shape[1]
        # d score[a, b] / d best[a, i, b] = q_mask[a, i] / n_q[a] (0 for all-padding passages), and
        # best[a, i, b] = q[a, i]·p[b, argmax[a, i, b]]: only the argmax tokens get a gradient, so it is
        # gathered / scattered at them (Bq·Lq·Bp·C work) instead of multiplying a one-hot Lp-long
        # similarity gradient (Lp times more).
        weight = grad[:, None, :] * (q_mask / q_mask.sum(1, keepdim=True).clamp(min=1))[..., None]
        weight = weight * has_tokens  # (Bq, Lq, Bp)
        in_place = ctx.q_grad_in_place and ctx.needs_input_grad[0] and not torch.is_grad_enabled()
        grad_q = q.grad if in_place else torch.zeros_like(q) if ctx.needs_input_grad[0] else None
        grad_p = torch.zeros_like(p) if ctx.needs_input_grad[2] else None
        # gathered rows are C long where similarities were Lp long: the same memory per block
        for qs, ps in _sim_blocks(q, p, ctx.block_elements * lp // max(lp, c)):
            q_block, p_block = q[qs], p[ps]  # (a, Lq, C), (b, Lp, C)
            b = p_block.shape[0]
            w = weight[qs, :, ps]  # (a, Lq, b)
            # row of p_block.view(b·Lp, C) that each (query token, passage) pair matched
            rows = (argmax[qs, :, ps].long() + torch.arange(b, device=q.device) * lp).reshape(-1)
            if grad_q is not None:
                matched = p_block.reshape(b * lp, c).index_select(0, rows).view(*w.shape, c)
                grad_q[qs] += torch.einsum("aib,aibc->aic", w, matched)
            if grad_p is not None:
                contrib = (w[..., None] * q_block[:, :, None, :]).reshape(-1, c)  # (a·Lq·b, C)
                grad_p[ps] += p.new_zeros(b * lp, c).index_add_(0, rows, contrib).view_as(p_block)
        return None if in_place else grad_q, None, grad_p, None, None


def _maybe_checkpoint(fn, *args: torch.Tensor | int) -> torch.Tensor:
    """Run ``fn`` so that backward recomputes its intermediates rather than keeping them."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# ---------------------------------------------------------------------- single pairs (inference outputs)
def lexical_matching_score(weights_1: dict[str, float], weights_2: dict[str, float]) -> float:
    """Σ over tokens in both dicts of w1·w2 (FlagEmbedding's ``compute_lexical_matching_score``)."""
    if len(weights_2) < len(weights_1):
        weights_1, weights_2 = weights_2, weights_1
    return float(sum(w * weights_2[t] for t, w in weights_1.items() if t in weights_2))


def colbert_pair_score(q_vecs: np.ndarray, p_vecs: np.ndarray) -> float:
    """(1/n_q) Σ_i max_j q_i·p_j. Shapes: q_vecs (n_q, C), p_vecs (n_p, C) -> scalar."""
    q = torch.as_tensor(np.asarray(q_vecs, dtype=np.float32))
    p = torch.as_tensor(np.asarray(p_vecs, dtype=np.float32))
    if q.shape[0] == 0 or p.shape[0] == 0:
        return 0.0
    return float((q @ p.T).max(dim=1).values.sum() / q.shape[0])


# ---------------------------------------------------------------------- FlagEmbedding's pair-scoring API
def lexical_matching_scores(weights_1: Any, weights_2: Any) -> float | np.ndarray:
    """FlagEmbedding's ``compute_lexical_matching_score``: two dicts give a float, two lists a matrix.

    Shapes: n1 dicts, n2 dicts -> (n1, n2).
    """
    if isinstance(weights_1, dict) and isinstance(weights_2, dict):
        return lexical_matching_score(weights_1, weights_2)
    if isinstance(weights_1, list) and isinstance(weights_2, list):
        return np.array([[lexical_matching_score(a, b) for b in weights_2] for a in weights_1])
    raise ValueError("lexical weights must be two dicts or two lists of dicts")


def as_pairs(
    sentence_pairs: Sequence[tuple[str, str]] | tuple[str, str],
) -> tuple[list[tuple[str, str]], bool]:
    """``compute_score``'s input as a list of (query, passage) pairs, and whether one pair was given."""
    single = isinstance(sentence_pairs[0], str)
    pairs = [tuple(sentence_pairs)] if single else [tuple(p) for p in sentence_pairs]
    for i, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ValueError(f"sentence_pairs[{i}] must be a (query, passage) pair, got {len(pair)} items")
    return pairs, single  # type: ignore[return-value]


def encoded_pair_scores(
    queries: Mapping[str, Any], passages: Mapping[str, Any], weights: Sequence[float]
) -> dict[str, list[float]]:
    """Query i against passage i in every mode, from two ``M3Model.encode`` outputs of n texts each.

    An output the encodings lack (no sparse or ColBERT head) scores 0. Returns ``{mode: n floats}``.
    """
    dense = np.einsum("nd,nd->n", queries["dense_vecs"], passages["dense_vecs"])
    per_output = {"dense": dense, "sparse": np.zeros_like(dense), "colbert": np.zeros_like(dense)}
    if queries["lexical_weights"] is not None:
        pairs = zip(queries["lexical_weights"], passages["lexical_weights"])
        per_output["sparse"] = np.array([lexical_matching_score(a, b) for a, b in pairs])
    if queries["colbert_vecs"] is not None:
        pairs = zip(queries["colbert_vecs"], passages["colbert_vecs"])
        per_output["colbert"] = np.array([colbert_pair_score(a, b) for a, b in pairs])
    return {mode: score.tolist() for mode, score in fuse(per_output, weights).items()}

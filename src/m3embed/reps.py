"""The representations one encoder pass produces, as one container the memory strategies can move around."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


@dataclass
class M3Reps:
    """Dense, sparse and ColBERT representations of a batch of texts.

    Shapes: dense (B, D); token_weights (B, L) or None; colbert (B, L-1, C) or None;
    input_ids and attention_mask (B, L). ``token_weights`` are the sparse head's per-position weights,
    already zero on padding and special tokens; pooling them per token id happens in the scores.
    """

    dense: torch.Tensor
    token_weights: torch.Tensor | None
    colbert: torch.Tensor | None
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    # Fields that carry gradients (the ones gradient caching caches gradients for).
    FLOAT_FIELDS = ("dense", "token_weights", "colbert")

    def __len__(self) -> int:
        return self.dense.shape[0]

    @property
    def colbert_mask(self) -> torch.Tensor:
        """(B, L-1) bool mask of the ColBERT vectors (every non-pad token after CLS)."""
        return self.attention_mask[:, 1:].bool()

    def float_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.FLOAT_FIELDS if getattr(self, name) is not None}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> M3Reps:
        """A copy with ``fn`` applied to every float field that is present (ids and mask are shared)."""
        return replace(self, **{name: fn(t) for name, t in self.float_tensors().items()})

    def detach(self, requires_grad: bool = False) -> M3Reps:
        """A copy cut from the graph; with ``requires_grad`` the float fields become leaves for caching."""
        return self.map(lambda t: t.detach().requires_grad_(requires_grad))

    def at_least_fp32(self) -> M3Reps:
        """Scores and losses run in at least fp32 even when the encoder ran under autocast."""
        return self.map(lambda t: t.float() if t.dtype in (torch.float16, torch.bfloat16) else t)


def pad_length(t: torch.Tensor, length: int, dim: int = 1, value: float = 0) -> torch.Tensor:
    """Right-pad ``t`` along ``dim`` to ``length``."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, missing]
    return F.pad(t, pad, value=value)


def merge(parts: list[M3Reps], order: list[torch.Tensor]) -> M3Reps:
    """Concatenate sub-batch reps, padding to the longest, and put row ``order[k][i]`` where it came from.

    ``order[k]`` holds the batch positions of sub-batch ``k``'s rows; the result is in batch order.
    Padding added here is zero (masked), so scores computed on the merged reps equal those on the parts.
    """
    length = max(p.input_ids.shape[1] for p in parts)
    index = torch.cat(order).to(parts[0].dense.device)
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(len(index), device=index.device)

    def cat(name: str, pad_dim: int | None, value: float = 0):
        tensors = [getattr(p, name) for p in parts]
        if tensors[0] is None:
            return None
        if pad_dim is not None:
            target = length - 1 if name == "colbert" else length
            tensors = [pad_length(t, target, pad_dim, value) for t in tensors]
        return torch.cat(tensors)[inverse]

    return M3Reps(
        dense=cat("dense", None),
        token_weights=cat("token_weights", 1),
        colbert=cat("colbert", 1),
        input_ids=cat("input_ids", 1),
        attention_mask=cat("attention_mask", 1),
    )


def split_like(grads: M3Reps, order: list[torch.Tensor], lengths: list[int]) -> list[dict[str, torch.Tensor]]:
    """The inverse of :func:`merge` for gradients: rows of each sub-batch, cut back to its own length."""
    out = []
    for rows, length in zip(order, lengths):
        rows = rows.to(grads.dense.device)
        part = {"dense": grads.dense[rows]}
        if grads.token_weights is not None:
            part["token_weights"] = grads.token_weights[rows, :length]
        if grads.colbert is not None:
            part["colbert"] = grads.colbert[rows, : length - 1]
        out.append(part)
    return out

"""The representations one encoder pass produces, as one container the memory strategies can move around."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

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
    # Fields with a token dimension (dim 1), and how many positions shorter than L it is.
    TOKEN_FIELDS = {"token_weights": 0, "colbert": 1, "input_ids": 0, "attention_mask": 0}

    def __len__(self) -> int:
        return self.dense.shape[0]

    @property
    def colbert_mask(self) -> torch.Tensor:
        """(B, L-1) bool mask of the ColBERT vectors (every non-pad token after CLS)."""
        return self.attention_mask[:, 1:].bool()

    def float_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.FLOAT_FIELDS if getattr(self, name) is not None}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> M3Reps:
        """A copy with ``fn`` applied to every float field that is present (ids and mask are shared)."""
        return replace(self, **{name: fn(t) for name, t in self.float_tensors().items()})

    def map_tokens(self, fn: Callable[[torch.Tensor, int], torch.Tensor]) -> M3Reps:
        """A copy with ``fn(t, length_offset)`` applied to every present field with a token dimension."""
        present = self.tensors()
        return replace(self, **{n: fn(present[n], k) for n, k in self.TOKEN_FIELDS.items() if n in present})

    def detach(self, requires_grad: bool = False) -> M3Reps:
        """A copy cut from the graph; with ``requires_grad`` the float fields become leaves for caching."""
        return self.map(lambda t: t.detach().requires_grad_(requires_grad))

    def at_least_fp32(self) -> M3Reps:
        """Scores and losses run in at least fp32 even when the encoder ran under autocast."""
        return self.map(lambda t: t.float() if t.dtype in (torch.float16, torch.bfloat16) else t)

    def padded(self, length: int) -> M3Reps:
        """Token dimensions right-padded with zeros (masked) to ``length`` (ColBERT: ``length - 1``)."""
        return self.map_tokens(lambda t, offset: pad_length(t, length - offset))

    def truncated(self, length: int) -> M3Reps:
        """Token dimensions cut to ``length`` (ColBERT: ``length - 1``)."""
        return self.map_tokens(lambda t, offset: t[:, : length - offset])

    def rows(self, index: torch.Tensor) -> M3Reps:
        index = index.to(self.dense.device)
        return replace(self, **{name: t[index] for name, t in self.tensors().items()})

    @staticmethod
    def cat(parts: list[M3Reps]) -> M3Reps:
        """Rows of every part, token dimensions padded to the longest part's."""
        length = max(p.input_ids.shape[1] for p in parts)
        parts = [p.padded(length) for p in parts]
        return replace(parts[0], **{n: torch.cat([getattr(p, n) for p in parts]) for n in parts[0].tensors()})


def pad_length(t: torch.Tensor, length: int, dim: int = 1, value: float = 0) -> torch.Tensor:
    """Right-pad ``t`` along ``dim`` to ``length``."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, missing]
    return F.pad(t, pad, value=value)


def inverse_permutation(order: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Where each batch row sits in ``torch.cat(order)`` (``order[k]`` = batch rows of sub-batch k)."""
    index = torch.cat(order).to(device)
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(len(index), device=device)
    return inverse


def merge(parts: list[M3Reps], order: list[torch.Tensor]) -> M3Reps:
    """Concatenate sub-batch reps, padding to the longest, and put row ``order[k][i]`` where it came from.

    Padding added here is zero (masked), so scores computed on the merged reps equal those on the parts.
    """
    return M3Reps.cat(parts).rows(inverse_permutation(order, parts[0].dense.device))


def split_like(grads: M3Reps, order: list[torch.Tensor], lengths: list[int]) -> list[dict[str, torch.Tensor]]:
    """The inverse of :func:`merge` for gradients: rows of each sub-batch, cut back to its own length."""
    return [grads.rows(rows).truncated(length).float_tensors() for rows, length in zip(order, lengths)]

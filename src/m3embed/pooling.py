"""The dense vector from the encoder's last hidden state: CLS, masked mean, or last token."""

from __future__ import annotations

import torch

from m3embed.backbones import POOLINGS


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, method: str) -> torch.Tensor:
    """One vector per text.

    Shapes: hidden (B, L, H), attention_mask (B, L) -> (B, H).
    """
    if method == "cls":
        return hidden[:, 0]
    if method == "mean":
        mask = attention_mask.to(hidden.dtype)
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    if method == "last_token":
        return last_token_pool(hidden, attention_mask)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {method!r}")


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden state at each text's last non-padding position, for left and right padding alike
    (FlagEmbedding's ``last_token_pool`` tells the two apart by the whole batch; this looks per row).

    Shapes: hidden (B, L, H), attention_mask (B, L) -> (B, H).
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (L,)
    last = (attention_mask.long() * positions).argmax(1)  # (B,) position of the last 1 in each row
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

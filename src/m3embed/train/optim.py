"""Optimisation: AdamW's parameter groups, the learning-rate schedule and gradient clipping."""

from __future__ import annotations

import math

import torch

from m3embed.model import M3Model
from m3embed.train.config import NEW_HEAD_LR_SCALE, TrainConfig

OPTIMIZER_GROUPS = ("encoder", "encoder_no_decay", "heads", "heads_no_decay")


def build_optimizer(model: M3Model, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW with four parameter groups (:data:`OPTIMIZER_GROUPS`, always all four so a checkpoint's
    optimizer state fits any run): encoder and heads, each split into decayed weights and undecayed
    biases and LayerNorm weights (1-d tensors), as in transformers' Trainer. The heads learn at
    ``head_learning_rate`` (unset: ``NEW_HEAD_LR_SCALE`` × the encoder's rate if the model came without
    them, the encoder's rate if they were loaded) with ``head_weight_decay``."""
    head_params = {
        id(p)
        for head in (model.sparse_linear, model.colbert_linear)
        if head is not None
        for p in head.parameters()
    }
    params: dict[str, list[torch.Tensor]] = {name: [] for name in OPTIMIZER_GROUPS}
    for p in model.parameters():
        if p.requires_grad:
            part = "heads" if id(p) in head_params else "encoder"
            params[part if p.ndim >= 2 else f"{part}_no_decay"].append(p)
    head_lr = tc.head_learning_rate or tc.learning_rate * (NEW_HEAD_LR_SCALE if model.new_heads else 1.0)
    head_decay = tc.weight_decay if tc.head_weight_decay is None else tc.head_weight_decay
    settings = {
        "encoder": (tc.learning_rate, tc.weight_decay),
        "encoder_no_decay": (tc.learning_rate, 0.0),
        "heads": (head_lr, head_decay),
        "heads_no_decay": (head_lr, 0.0),
    }
    groups = [
        {"name": name, "params": params[name], "lr": lr, "weight_decay": decay}
        for name, (lr, decay) in settings.items()
    ]
    return torch.optim.AdamW(groups, lr=tc.learning_rate)


def build_scheduler(
    optimizer: torch.optim.Optimizer, tc: TrainConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak rate, then linear decay to 0 at ``total`` steps."""
    warmup = tc.warmup_steps if tc.warmup_steps is not None else math.ceil(tc.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_gradients(params: list[torch.Tensor], max_norm: float | None) -> float:
    """The global L2 norm of the gradients before clipping; clipped to ``max_norm`` when set."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm:
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))

"""``train_step``: one forward + backward of the BGE-M3 objective under a memory strategy.

The public entry point for users' own loops; ``m3embed train`` uses it too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from m3embed.distributed import CrossDeviceGather
from m3embed.losses import BatchScores, LossConfig, LossOutput, M3Objective
from m3embed.memory import EncodeFn, MemoryConfig, Objective, TokenBatch, run_step
from m3embed.model import M3Model, check_texts
from m3embed.reps import M3Reps

TextsOrTokens = Sequence[str] | TokenBatch | Mapping[str, torch.Tensor]


def train_step(
    model: M3Model,
    queries: TextsOrTokens,
    passages: TextsOrTokens,
    group_size: int,
    *,
    memory: MemoryConfig | None = None,
    loss: LossConfig | None = None,
    step: int = 0,
    teacher_scores: torch.Tensor | Sequence[Sequence[float]] | None = None,
    query_max_length: int = 512,
    passage_max_length: int = 512,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    gather: CrossDeviceGather | None = None,
) -> dict[str, float]:
    """Encode B queries and B·G passages, compute the BGE-M3 loss, backpropagate.

    Gradients are left in ``.grad`` (call your optimiser after); returns the loss and each of its parts
    as floats. ``queries``/``passages`` are strings (tokenised here with the model's tokenizer) or an
    already tokenised batch (``TokenBatch`` or a dict with ``input_ids`` and ``attention_mask``).
    Passages are laid out ``[q0: pos, neg1..neg(G-1), q1: pos, ...]``. ``memory`` chooses the memory
    strategy and sub-batching (default ``MemoryConfig()``: ``cache``, sub-batches of 8); ``gather``
    adds cross-device negatives (with several processes, then sum the gradients with
    :func:`m3embed.distributed.all_reduce_gradients`).

    ``autocast_dtype`` runs the encoder under ``torch.autocast`` (scores and the loss stay fp32).
    With ``scaler`` (fp16), what is backpropagated is ``scaler.scale(loss)``: the scale enters once,
    at the loss (for ``cache``, the loss of step (3), so ``dL/dS`` and the queries' cached gradients
    carry it through steps (4) and (5)). The ``.grad`` left behind are then scaled: call
    ``scaler.unscale_(optimizer)`` before clipping, ``scaler.step(optimizer)`` and ``scaler.update()``.
    The returned loss and parts are unscaled. With ``gather`` every rank must hold the same scale (each
    scales the same global loss, and the gradients are summed over ranks before unscaling).
    """
    memory = memory or MemoryConfig()
    loss = loss or LossConfig()
    device = model.device
    q_batch = _tokens(model, queries, query_max_length, device)
    p_batch = _tokens(model, passages, passage_max_length, device)
    if group_size < 1 or len(p_batch) != len(q_batch) * group_size:
        raise ValueError(
            f"expected len(passages) == len(queries) * group_size, got {len(p_batch)} passages for "
            f"{len(q_batch)} queries and group_size={group_size}"
        )
    teacher = None
    if teacher_scores is not None:
        teacher = torch.as_tensor(teacher_scores, dtype=torch.float32, device=device).view(
            len(q_batch), group_size
        )

    encode = model
    if autocast_dtype is not None:
        encode = _autocast(encode, device, autocast_dtype)

    objective = M3Objective(loss, group_size, step, teacher)
    if gather is not None:
        objective = gather.objective(objective)
    if scaler is not None:
        objective = ScaledObjective(objective, scaler)

    def checkpointing(on: bool) -> None:
        model.gradient_checkpointing_enable() if on else model.gradient_checkpointing_disable()

    out = run_step(encode, objective, q_batch, p_batch, memory, gradient_checkpointing=checkpointing)
    return out.as_floats()


@dataclass(frozen=True)
class ScaledObjective:
    """``inner`` with its loss multiplied by the fp16 loss scale for backward (an :class:`Objective`).

    The memory strategies backpropagate whatever ``loss()`` returns and never learn of the scale;
    ``LossOutput.unscaled`` keeps the loss itself for reporting. Scores are not scaled: the scale
    enters once, at the loss, and reaches every gradient through backward.
    """

    inner: Objective
    scaler: torch.amp.GradScaler

    def share(self, queries: M3Reps) -> M3Reps:
        return self.inner.share(queries)

    def scores(self, queries: M3Reps, passages: M3Reps) -> BatchScores:
        return self.inner.scores(queries, passages)

    def loss(self, scores: BatchScores) -> LossOutput:
        out = self.inner.loss(scores)
        return LossOutput(self.scaler.scale(out.loss), out.parts, unscaled=out.loss.detach())


def _tokens(model: M3Model, texts: TextsOrTokens, max_length: int, device: torch.device) -> TokenBatch:
    if isinstance(texts, TokenBatch):
        batch = texts
    elif isinstance(texts, Mapping):
        batch = TokenBatch(texts["input_ids"], texts["attention_mask"])
    else:
        texts = list(texts)
        check_texts(texts)
        batch = TokenBatch(**model.tokenize(texts, max_length))
    return TokenBatch(batch.input_ids.to(device), batch.attention_mask.to(device))


def _autocast(encode: EncodeFn, device: torch.device, dtype: torch.dtype) -> EncodeFn:
    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        with torch.autocast(device.type, dtype=dtype):
            return encode(input_ids, attention_mask)

    return run

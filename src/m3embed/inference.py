"""What ``M3Model.encode`` does around the forward pass: texts checked and tokenised, eval mode and
autocast for the duration, and a batch's outputs in FlagEmbedding's NumPy format."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from m3embed.reps import M3Reps

logger = logging.getLogger(__name__)


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """:meth:`~m3embed.model.M3Model.tokenize` with a given tokenizer (e.g. a background thread's own copy).

    Shapes: ``input_ids`` and ``attention_mask`` (len(texts), longest text in tokens, <= max_length).
    """
    batch = tokenizer(
        list(texts),
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def check_texts(texts: list[Any]) -> None:
    """ValueError naming the index of the first text that is not a non-empty string."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(
                f"text at index {i} is {type(text).__name__} ({text!r:.40}), expected a non-empty str"
            )
        if not text.strip():
            raise ValueError(
                f"text at index {i} is empty; every text must contain at least one non-space character"
            )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the duration (dropout off), then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def autocast_for(device: torch.device, use_fp16: bool, use_bf16: bool):
    """The autocast context of an ``encode`` call: fp16 (CUDA only), bf16, or full precision."""
    if use_fp16 and use_bf16:
        raise ValueError("use_fp16 and use_bf16 are exclusive")
    if use_fp16:
        if device.type != "cuda":
            raise ValueError(f"use_fp16 needs a CUDA device (model is on {device}); use use_bf16 on CPU")
        return torch.autocast("cuda", dtype=torch.float16)
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def numpy_outputs(
    reps: M3Reps, batch: dict[str, torch.Tensor], keys: Collection[str]
) -> dict[str, list[Any]]:
    """One batch's outputs named by ``keys`` (FlagEmbedding's), as one NumPy value per text, in batch order.

    Lexical weights and ColBERT vectors cover each text's own tokens only (no padding, on whichever side;
    ColBERT skips the first position).
    """
    keep = batch["attention_mask"].bool().cpu().numpy()  # (b, L)
    out: dict[str, list[Any]] = {}
    if "dense_vecs" in keys:
        out["dense_vecs"] = list(reps.dense.float().cpu().numpy())
    if "lexical_weights" in keys:
        weights = reps.token_weights.float().cpu().numpy()
        token_ids = batch["input_ids"].cpu().numpy()
        out["lexical_weights"] = [
            _lexical_weights(token_ids[k, row], weights[k, row]) for k, row in enumerate(keep)
        ]
    if "colbert_vecs" in keys:
        colbert = reps.colbert.float().cpu().numpy()  # (b, L-1, C): positions 1.. of the text
        out["colbert_vecs"] = [colbert[k, row[1:]] for k, row in enumerate(keep)]
    return out


def _lexical_weights(token_ids: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    """{str(token_id): max weight over the token's positions}, positive weights only."""
    keep = weights > 0
    token_ids, weights = token_ids[keep], weights[keep]
    if token_ids.size == 0:
        return {}
    order = np.lexsort((weights, token_ids))  # by id, then weight: the last of each id is its max
    token_ids, weights = token_ids[order], weights[order]
    last = np.append(token_ids[1:] != token_ids[:-1], True)
    return dict(zip(map(str, token_ids[last].tolist()), weights[last].tolist()))


def encode_batches(
    model: Any, token_ids: list[list[int]], batch_size: int, autocast: Any = None
) -> Iterator[tuple[list[int], dict[str, torch.Tensor], M3Reps]]:
    """Run ``model`` over length-sorted batches of tokenised texts: yield ``(rows, batch, reps)``.

    Texts are batched longest first, so each batch carries little padding; ``rows`` are the texts'
    positions in ``token_ids``, ``batch`` the padded ``input_ids`` / ``attention_mask`` on the model's
    device. A batch that runs out of memory is retried with 3/4 of the batch size (FlagEmbedding's
    back-off), down to one text; the smaller size is kept for the rest. ``autocast`` is a context
    manager around each forward pass (none by default).

    Shapes: batch["input_ids"], batch["attention_mask"] (b, L) -> reps of b texts.
    """
    device = model.device
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    start = 0
    while start < len(order):
        rows = order[start : start + batch_size]
        padded = model.tokenizer.pad({"input_ids": [token_ids[i] for i in rows]}, return_tensors="pt")
        batch = {
            "input_ids": padded["input_ids"].to(device),
            "attention_mask": padded["attention_mask"].to(device),
        }
        try:
            with autocast or contextlib.nullcontext():
                reps = model(batch["input_ids"], batch["attention_mask"])
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size = batch_size * 3 // 4 or 1
            logger.warning("out of memory while encoding; retrying with batch_size=%d", batch_size)
            _empty_cache(device)
            continue
        yield rows, batch, reps
        start += len(rows)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()

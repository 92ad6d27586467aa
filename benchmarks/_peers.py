"""The reference implementations ``benchmarks/memory.py`` compares with (the optional ``peers`` extra).

- FlagEmbedding 1.4.2's M3 *training* model (``finetune.embedder.encoder_only.m3``), built the way its
  runner builds it (``AutoModel`` + ``colbert_linear`` + ``sparse_linear``);
- FlagEmbedding 1.4.2's decoder-only *training* model (``finetune.embedder.decoder_only.base``) with
  peft LoRA, as its runner builds it for LLM embedders;
- sentence-transformers' ``CachedMultipleNegativesRankingLoss`` (gradient caching, dense only).

Nothing here is part of m3embed; these helpers exist so the benchmark measures the peers as their own
trainers run them, and they say where the benchmark had to work around a peer.
"""

from __future__ import annotations

import importlib
import importlib.util
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn


def available(peer: str) -> str | None:
    """``None`` when ``peer`` ("flagembedding" or "sentence-transformers") can run, else the reason."""
    if peer == "flagembedding":
        try:
            flagembedding_m3_finetune()
        except ImportError as err:
            return f"FlagEmbedding unavailable ({err})"
        return None
    if peer == "sentence-transformers":
        if importlib.util.find_spec("sentence_transformers") is None:
            return "sentence-transformers not installed (pip install 'm3embed[peers]')"
        return None
    raise ValueError(f"unknown peer {peer!r}")


def flagembedding_m3_finetune() -> types.ModuleType:
    """FlagEmbedding's ``finetune.embedder.encoder_only.m3`` module, imported without running the
    package ``__init__`` (it imports LLM rerankers that fail under transformers 5)."""
    from m3embed.peers import load_flagembedding_m3_finetune

    return load_flagembedding_m3_finetune()


def flagembedding_m3_model(
    tokenizer: Any,
    *,
    model_path: str | None = None,
    parts: dict[str, nn.Module] | None = None,
    sub_batch_size: int = 8,
    checkpointing: bool = True,
    temperature: float = 0.02,
) -> nn.Module:
    """FlagEmbedding's ``EncoderOnlyEmbedderM3Model`` in training mode, unified fine-tuning with
    self-distillation (BGE-M3's recipe).

    ``model_path`` builds the parts with FlagEmbedding's own ``Runner.get_model`` (heads freshly
    initialised when the directory has none); ``parts`` (``{"model", "colbert_linear",
    "sparse_linear"}``) passes ready-made ones (the tiny random models). ``checkpointing`` does what
    FlagEmbedding's runner and HF trainer do with ``--gradient_checkpointing``:
    ``gradient_checkpointing_enable()`` on the encoder and ``enable_input_require_grads()``.

    Workaround: FlagEmbedding's sparse head zeroes ``tokenizer.eos_token_id``, which is ``None`` for
    BERT tokenizers (an index error). The tokenizer given here gets ``eos_token = sep_token`` when it
    has no eos; this zeroes [SEP] in the sparse output, as m3embed does for BERT tokenizers.
    """
    fe = flagembedding_m3_finetune()
    if tokenizer.eos_token_id is None:
        tokenizer.eos_token = tokenizer.sep_token
    if parts is None:
        if model_path is None:
            raise ValueError("give model_path or parts")
        parts = fe.EncoderOnlyEmbedderM3Runner.get_model(model_path)
    model = fe.EncoderOnlyEmbedderM3Model(
        parts,
        tokenizer=tokenizer,
        temperature=temperature,
        sub_batch_size=sub_batch_size,
        normalize_embeddings=True,
        unified_finetuning=True,
        use_self_distill=True,
        sentence_pooling_method="cls",
    )
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.train()
    return model


def flagembedding_decoder_model(
    backbone: nn.Module,
    tokenizer: Any,
    lora: dict[str, Any],
    *,
    sub_batch_size: int = 8,
    checkpointing: bool = True,
    temperature: float = 0.02,
) -> nn.Module:
    """FlagEmbedding's ``BiDecoderOnlyEmbedderModel`` in training mode over ``backbone`` with LoRA.

    As its decoder-only runner does: ``peft.get_peft_model`` with ``LoraConfig(task_type=
    FEATURE_EXTRACTION, r, lora_alpha, lora_dropout, target_modules)`` (``lora`` gives them),
    last-token pooling, normalised embeddings, the given temperature; ``checkpointing`` is its
    ``--gradient_checkpointing``: ``gradient_checkpointing_enable()`` + ``enable_input_require_grads()``.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    from m3embed.peers import _import

    fe = _import("FlagEmbedding.finetune.embedder.decoder_only.base.modeling")
    config = LoraConfig(
        task_type=TaskType.FEATURE_EXTRACTION,
        inference_mode=False,
        r=lora["rank"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=list(lora["target_modules"]),
    )
    model = fe.BiDecoderOnlyEmbedderModel(
        get_peft_model(backbone, config),
        tokenizer=tokenizer,
        temperature=temperature,
        sub_batch_size=sub_batch_size,
        sentence_pooling_method="last_token",
        normalize_embeddings=True,
    )
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.train()
    return model


def flagembedding_step(model: nn.Module, queries: dict, passages: dict) -> float:
    """One forward + backward of FlagEmbedding's M3 loss; returns the loss."""
    loss = model(queries=queries, passages=passages).loss
    loss.backward()
    return float(loss.detach())


def st_cached_loss(model_path: str | Path, mini_batch_size: int = 8) -> tuple[nn.Module, nn.Module]:
    """A SentenceTransformer (train mode) and its ``CachedMultipleNegativesRankingLoss``."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    model = SentenceTransformer(str(model_path), device="cpu")
    model.train()
    return model, CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size)


def st_step(loss_fn: nn.Module, queries: dict, positives: dict, negatives: dict) -> float:
    """One forward + backward of the cached MNRL loss over (anchor, positive, hard negative) columns."""
    labels = torch.zeros(len(queries["input_ids"]), dtype=torch.long)  # unused by MNRL
    loss = loss_fn([dict(queries), dict(positives), dict(negatives)], labels)
    loss.backward()
    return float(loss.detach())

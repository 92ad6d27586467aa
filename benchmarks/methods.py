"""The methods ``benchmarks/memory.py`` measures, as a registry: m3embed's memory strategies and the
peers (FlagEmbedding's M3 trainer, sentence-transformers' cached MNRL).

A method is a name, a label for the report, the peer package it needs (None: m3embed itself) and a
``prepare`` function that loads its model and one batch of the workload and returns a function running
one training step (forward + backward, no optimiser step; returns the loss). Adding a method is adding
an entry to ``METHODS``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Point:
    """What one benchmark point runs: a method on a workload at one batch size.

    Methods reach the workload only through this object (its model, texts and ``build_batch``), so
    ``workloads.py`` may read the registry here and this module imports nothing from it.
    """

    workload: Any  # workloads.Workload
    method: str
    batch: int
    device: str
    data: Path
    trace: Any = None  # phase_trace.PhaseTrace (m3embed methods on CPU, with --trace)

    @property
    def sub_batch(self) -> int | None:
        return self.workload.sub_batch_of(self.method)


Step = Callable[[], float]


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    prepare: Callable[[Point], Step]
    needs: str | None = None  # the peer package it needs ("flagembedding", "sentence-transformers")


def _batch(point: Point, tokenizer) -> tuple[dict, dict]:
    q, p = point.workload.build_batch(tokenizer, point.batch, point.data)
    return ({k: v.to(point.device) for k, v in q.items()}, {k: v.to(point.device) for k, v in p.items()})


def _peer_tokenizer(point: Point):
    """The pretrained model's tokenizer, or (random workloads) the m3embed model's with the model."""
    if point.workload.pretrained is not None:
        from transformers import AutoTokenizer

        return None, AutoTokenizer.from_pretrained(point.workload.pretrained())
    m3 = point.workload.model()
    return m3, m3.tokenizer


# ---------------------------------------------------------------------- m3embed
def m3embed(
    strategy: str, autocast: str | None = None, layer_checkpointing: bool = False
) -> Callable[[Point], Step]:
    """One step of ``m3embed.memory.run_step`` with ``M3Objective(LossConfig())`` and ``strategy``
    (LoRA adapters and loss settings as the workload gives them);
    ``autocast`` "bf16" or "fp16" runs the encoder under that autocast (fp16 with a dynamic loss scaler,
    as ``train --fp16``: the scaled loss, then unscale_ as the training loop does);
    ``layer_checkpointing`` is ``MemoryConfig``'s (``train --layer-checkpointing``)."""

    def prepare(point: Point) -> Step:
        import torch

        from m3embed.losses import LossConfig, M3Objective
        from m3embed.memory import MemoryConfig, TokenBatch, run_step
        from m3embed.step import ScaledObjective, _autocast

        model = point.workload.model()
        if point.workload.lora is not None:  # the adapters m3embed train --lora-rank puts on
            lora = point.workload.lora
            model.add_lora(lora["rank"], lora["alpha"], lora["dropout"], lora["target_modules"])
        model = model.train().to(point.device)
        q, p = _batch(point, model.tokenizer)
        queries, passages = TokenBatch(**q), TokenBatch(**p)
        objective, encode = M3Objective(LossConfig(**point.workload.loss), point.workload.group), model
        if point.trace is not None:
            objective, encode = point.trace.objective(objective), point.trace.encode(model)
        config = MemoryConfig(
            strategy, sub_batch_size=point.sub_batch, layer_checkpointing=layer_checkpointing
        )
        scaler = torch.amp.GradScaler(torch.device(point.device).type) if autocast == "fp16" else None
        if autocast is not None:
            dtype = torch.float16 if autocast == "fp16" else torch.bfloat16
            encode = _autocast(encode, torch.device(point.device), dtype)
        if scaler is not None:
            objective = ScaledObjective(objective, scaler)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # unscale_ needs one; it never steps

        def checkpointing(on: bool) -> None:
            model.gradient_checkpointing_enable() if on else model.gradient_checkpointing_disable()

        def step() -> float:
            model.zero_grad(set_to_none=True)
            if point.trace is not None:
                point.trace.new_step()
            out = run_step(encode, objective, queries, passages, config, gradient_checkpointing=checkpointing)
            if scaler is not None:
                scaler.unscale_(optimizer)
                scaler.update()
            return float(out.as_floats()["loss"])

        return step

    return prepare


# ---------------------------------------------------------------------- peers
def flagembedding(checkpointing: bool) -> Callable[[Point], Step]:
    """FlagEmbedding's M3 training model, as its runner builds it (``_peers``)."""

    def prepare(point: Point) -> Step:
        import _peers

        m3, tokenizer = _peer_tokenizer(point)
        q, p = _batch(point, tokenizer)
        if point.workload.pretrained is not None:
            source: dict[str, Any] = {"model_path": point.workload.pretrained()}
        else:  # the same random weights as m3embed's model
            heads = {"colbert_linear": m3.colbert_linear, "sparse_linear": m3.sparse_linear}
            source = {"parts": {"model": m3.backbone, **heads}}
        model = _peers.flagembedding_m3_model(
            tokenizer, sub_batch_size=point.sub_batch or -1, checkpointing=checkpointing, **source
        )
        model.to(point.device)

        def step() -> float:
            model.zero_grad(set_to_none=True)
            return _peers.flagembedding_step(model, q, p)

        return step

    return prepare


def flagembedding_decoder(point: Point) -> Step:
    """FlagEmbedding's decoder-only training model with LoRA, sub-batches and gradient checkpointing
    (``_peers``), on the workload's random decoder (the same weights as m3embed's)."""
    import _peers

    m3 = point.workload.model()
    q, p = _batch(point, m3.tokenizer)
    model = _peers.flagembedding_decoder_model(
        m3.backbone, m3.tokenizer, point.workload.lora, sub_batch_size=point.sub_batch or -1
    )
    model.to(point.device)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        return _peers.flagembedding_step(model, q, p)

    return step


def st_cached_mnrl(point: Point) -> Step:
    """sentence-transformers' ``CachedMultipleNegativesRankingLoss`` on (query, positive, first hard
    negative) columns, dense only."""
    import _peers

    m3, tokenizer = _peer_tokenizer(point)
    q, p = _batch(point, tokenizer)
    if point.workload.pretrained is not None:
        path = point.workload.pretrained()
    else:  # the same random encoder, saved for SentenceTransformer to load (mean pooling)
        path = tempfile.mkdtemp(prefix="m3embed-bench-st-")
        m3.backbone.save_pretrained(path)
        tokenizer.save_pretrained(path)
    del m3
    model, loss_fn = _peers.st_cached_loss(path, mini_batch_size=point.sub_batch)
    model.to(point.device)
    g = point.workload.group
    positives = {k: v[0::g] for k, v in p.items()}
    negatives = {k: v[1::g] for k, v in p.items()}  # the first hard negative of each query

    def step() -> float:
        model.zero_grad(set_to_none=True)
        return _peers.st_step(loss_fn, q, positives, negatives)

    return step


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("m3embed-none", "m3embed none", m3embed("none")),
        Method("m3embed-checkpoint", "m3embed checkpoint", m3embed("checkpoint")),
        Method("m3embed-cache", "m3embed cache", m3embed("cache")),
        Method(
            "m3embed-cache-layerckpt",
            "m3embed cache, layer checkpointing",
            m3embed("cache", layer_checkpointing=True),
        ),
        Method("m3embed-cache-bf16", "m3embed cache, bf16 autocast", m3embed("cache", "bf16")),
        Method("m3embed-cache-fp16", "m3embed cache, fp16 autocast + loss scaling", m3embed("cache", "fp16")),
        Method(
            "flagembedding-none", "FlagEmbedding, no checkpointing", flagembedding(False), "flagembedding"
        ),
        Method(
            "flagembedding-checkpoint", "FlagEmbedding checkpointing", flagembedding(True), "flagembedding"
        ),
        Method(
            "flagembedding-decoder",
            "FlagEmbedding decoder-only (LoRA, checkpointing)",
            flagembedding_decoder,
            "flagembedding",
        ),
        Method(
            "st-cached-mnrl",
            "sentence-transformers cached MNRL (dense only)",
            st_cached_mnrl,
            "sentence-transformers",
        ),
    )
}
LABELS = {name: m.label for name, m in METHODS.items()}


def unavailable() -> dict[str, str]:
    """Methods whose peer package cannot run here, with the reason."""
    import _peers

    reasons = {peer: _peers.available(peer) for peer in {m.needs for m in METHODS.values() if m.needs}}
    return {
        name: f"skipped ({reasons[m.needs]})" for name, m in METHODS.items() if m.needs and reasons[m.needs]
    }

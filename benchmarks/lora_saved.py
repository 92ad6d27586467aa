"""What one sub-batch of the decoder workload costs with peft's LoRA forward and with m3embed's lean
one (``m3embed.lora_lean``): the bytes autograd saves for backward (no checkpointing), and the peak
RSS of a layer-checkpointed forward + backward above the loaded model. Each variant runs in a fresh
subprocess with glibc's mmap threshold fixed (so the peak counts live memory) and prints one row.

    HF_HUB_OFFLINE=1 python benchmarks/lora_saved.py                # 4 layers, 8 x 512 tokens
    HF_HUB_OFFLINE=1 python benchmarks/lora_saved.py --layers 1 --batch 4
    HF_HUB_OFFLINE=1 python benchmarks/lora_saved.py --rounds 5  # step time: the variants alternate

Memory is stable from run to run; the time column is the median over ``--rounds`` alternating runs.

The model is the decoder workload's: a random Qwen3 at Qwen3-Embedding-0.6B's widths, bf16 base
weights, LoRA rank 16 (alpha 16, dropout 0.1, the 7 projections) in fp32, last-token pooling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
VARIANTS = ("peft", "m3embed")


def worker(args: argparse.Namespace) -> dict:
    import gc

    import torch

    sys.path.insert(0, str(HERE))
    from m3embed.peak_memory import PeakMemory
    from m3embed.tensor_bytes import saved_bytes
    from workloads import DECODER_LORA, qwen3_0_6b_width

    torch.set_num_threads(args.threads)
    model = qwen3_0_6b_width(layers=args.layers)
    model.add_lora(
        DECODER_LORA["rank"], DECODER_LORA["alpha"], DECODER_LORA["dropout"], DECODER_LORA["target_modules"]
    )
    if args.variant == "peft":  # the class's forward again: peft's own
        for module in model.modules():
            vars(module).pop("forward", None)
    model.train()
    ids = torch.randint(10, 1900, (args.batch, args.length))
    mask = torch.ones_like(ids)

    saved = saved_bytes(lambda: model(ids, mask), exclude=model.parameters())
    gc.collect()

    model.gradient_checkpointing_enable()
    memory = PeakMemory("cpu")
    memory.start()
    start = time.perf_counter()
    model(ids, mask).dense.float().sum().backward()
    seconds = time.perf_counter() - start
    return {"saved_mb": saved / 2**20, "peak_mb": memory.peak_above_baseline() / 2**20, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="texts in the sub-batch")
    parser.add_argument("--length", type=int, default=512, help="tokens per text")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs per variant, alternating; time is their median"
    )
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(worker(args)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--variant", variant] + [
                f"--{k}={getattr(args, k)}" for k in ("layers", "batch", "length", "threads")
            ]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = {
        variant: {
            "saved_mb": statistics.median(r["saved_mb"] for r in rs),
            "peak_mb": statistics.median(r["peak_mb"] for r in rs),
            "seconds": statistics.median(r["seconds"] for r in rs),
        }
        for variant, rs in runs.items()
    }
    print(
        f"random Qwen3 at Qwen3-Embedding-0.6B's widths, {args.layers} layers, bf16 base weights, "
        f"LoRA rank 16 in fp32, one sub-batch of {args.batch} x {args.length} tokens, {args.threads} thread(s), "
        f"median of {args.rounds} alternating run(s)\n"
    )
    print(
        "| LoRA forward | saved for backward, MB (no checkpointing) | layer-checkpointed fwd+bwd peak, MB | its time, s |"
    )
    print("|---|---:|---:|---:|")
    for variant, r in rows.items():
        print(f"| {variant} | {r['saved_mb']:.0f} | {r['peak_mb']:.0f} | {r['seconds']:.1f} |")
    p, m = rows["peft"], rows["m3embed"]
    ratios = [m[k] / p[k] for k in ("saved_mb", "peak_mb", "seconds")]
    print("| m3embed / peft | " + " | ".join(f"{r:.2f}×" for r in ratios) + " |")


if __name__ == "__main__":
    main()

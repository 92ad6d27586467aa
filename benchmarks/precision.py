"""fp32, bf16 and fp16 autocast side by side for ``cache``: peak memory and step time, back to back.

Each point is one fresh ``memory.py --worker`` subprocess (the same measurement as the memory
benchmark: peak RSS above the loaded model on CPU, allocator peak on CUDA; median step time after the
first). The three precisions run in turn, ``--rounds`` times, so a shared machine's load hits them
alike; the table gives each one's median over the rounds.

    HF_HUB_OFFLINE=1 python benchmarks/precision.py --data PATH/train.jsonl.gz            # default workload
    HF_HUB_OFFLINE=1 python benchmarks/precision.py --workload tiny --batch 8              # seconds

On a CPU without fast 16-bit matrix units (no AMX / AVX512-FP16), autocast adds casts and saves no
time: read the time column there as a check that it runs, not as the speed a GPU would see.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = {"fp32": "m3embed-cache", "bf16": "m3embed-cache-bf16", "fp16": "m3embed-cache-fp16"}


def point(args: argparse.Namespace, method: str) -> dict:
    command = [
        sys.executable, str(HERE / "memory.py"), "--worker", "--workload", args.workload,
        "--method", method, "--batch", str(args.batch), "--steps", str(args.steps),
        "--threads", str(args.threads), "--device", args.device, "--data", str(args.data),
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, cwd=HERE)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"status": f"failed: {out.stderr.strip().splitlines()[-1:]}"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", default="default")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", default="data/debdesc/train/train.jsonl.gz")
    args = parser.parse_args()
    args.data = Path(args.data).resolve()
    results: dict[str, list[dict]] = {name: [] for name in METHODS}
    for _ in range(args.rounds):
        for name, method in METHODS.items():
            results[name].append(point(args, method))
    print(
        f"workload {args.workload}, B={args.batch}, {args.steps} steps, {args.rounds} rounds, {args.device}\n"
    )
    print("| precision | peak above the model (MB) | step (s), median | vs fp32 | loss |")
    print("|---|---:|---:|---:|---:|")
    base = None
    for name, runs in results.items():
        ok = [r for r in runs if r.get("status") == "ok"]
        if not ok:
            print(f"| {name} | {runs[0].get('status')} | | | |")
            continue
        peak = statistics.median(r["peak_mb"] for r in ok)
        step = statistics.median(r["step_s"] for r in ok)
        base = base or step
        print(f"| {name} | {peak:.0f} | {step:.2f} | {step / base:.2f}x | {ok[0]['loss']:.4f} |")


if __name__ == "__main__":
    main()

"""Step (4) of the score-level cache, the loss side alone: one passage block scored against Bq queries.

The queries are leaves with their gradient allocated (as ``memory._cached_step`` makes them); one
block of 16 passages × 128 tokens is scored with all three outputs (``losses.batch_scores``) and
backpropagated, three times. Reports, per number of queries, the peak RSS above the start (each
point in a fresh subprocess, heap trimmed first) and the median time of the sparse score's forward
and backward. Token ids are Zipf-like draws from a 30,000-token vocabulary, C = 384, q32.

    HF_HUB_OFFLINE=1 python benchmarks/score_block.py            # queries 32, 256, 1024
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import time

import torch

from m3embed import losses, scores
from m3embed.peak_memory import reset_rss_peak, rss_bytes, rss_peak_bytes
from m3embed.reps import M3Reps

Q_LEN, P_LEN, BLOCK, DIM = 32, 128, 16, 384


def _reps(n: int, length: int, gen: torch.Generator, grad: bool) -> M3Reps:
    ids = (30000 * torch.rand(n, length, generator=gen) ** 3).long() + 100
    t = lambda *shape: torch.rand(*shape, generator=gen).requires_grad_(grad)  # noqa: E731
    return M3Reps(
        t(n, DIM), t(n, length), t(n, length - 1, DIM), ids, torch.ones(n, length, dtype=torch.long)
    )


def memory_point(n_queries: int) -> float:
    """MB above the start while scoring 3 passage blocks against ``n_queries`` leaf queries."""
    gen = torch.Generator().manual_seed(0)
    q = _reps(n_queries, Q_LEN, gen, grad=True)
    for t in q.float_tensors().values():
        t.grad = torch.zeros_like(t)
    blocks = [_reps(BLOCK, P_LEN, gen, grad=True) for _ in range(3)]
    config = losses.LossConfig(heads="all")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = rss_bytes()
    reset_rss_peak()
    for p in blocks:
        block = list(losses.batch_scores(q, p, config).tensors().values())
        torch.autograd.backward(block, [torch.ones_like(s) for s in block])
        del block
    return (rss_peak_bytes() - base) / 2**20


def sparse_ms(n_queries: int, repeats: int = 7) -> float:
    """Median ms of one sparse forward + backward of a passage block against ``n_queries``."""
    gen = torch.Generator().manual_seed(0)
    q, p = _reps(n_queries, Q_LEN, gen, grad=True), _reps(BLOCK, P_LEN, gen, grad=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(5):
            scores.sparse_scores(q.input_ids, q.token_weights, p.input_ids, p.token_weights).sum().backward()
        times.append((time.perf_counter() - start) / 5 * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, nargs="*", default=[32, 256, 1024])
    parser.add_argument("--point", type=int, help=argparse.SUPPRESS)  # one memory point (subprocess)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.point is not None:
        print(memory_point(args.point))
        return
    print(
        "| queries | peak MB above start (3 blocks, all scores, backward) | sparse fwd+bwd ms (median of 7) |"
    )
    print("|---:|---:|---:|")
    for n in args.queries:
        out = subprocess.run([sys.executable, __file__, "--point", str(n)], capture_output=True, text=True)
        mb = float(out.stdout.strip().splitlines()[-1])
        print(f"| {n} | {mb:.1f} | {sparse_ms(n):.2f} |")


if __name__ == "__main__":
    main()

"""Phase tracing for ``benchmarks/memory.py --trace``: the peak RSS and seconds of each phase of an
m3embed step, told by the encode function and the objective the step is given (nothing is patched).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from m3embed.peak_memory import reset_rss_peak, rss_bytes, rss_peak_bytes

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

    It is told what happens by the functions the step is given: :meth:`encode` wraps the model and
    :meth:`objective` the objective (share / scores / loss). For ``cache`` it tells step (1) from (2) by the
    ``share`` call that separates them, and step (4) from (5) by counting the score calls with grad
    after the loss against the passage blocks scored without grad before it.
    """

    def __init__(self, strategy: str) -> None:
        self.cached = strategy.startswith("cache")  # cache, cache-layerckpt, cache-bf16, ...
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
        peak, now = rss_peak_bytes(), time.perf_counter()
        if self.phase != "before":
            mb = lambda x: round((x - self.baseline) / 2**20, 1)  # noqa: E731
            self.log.append(
                {
                    "step": self.phase_step,
                    "phase": self.phase,
                    "held_at_start_mb": mb(self.entered_rss),
                    "peak_mb": mb(peak),
                    "seconds": round(now - self.entered_at, 2),
                }
            )
        if not reset_rss_peak():
            raise RuntimeError("could not reset the RSS high-water mark through /proc/self/clear_refs")
        self.phase, self.phase_step = phase, self.step
        self.entered_rss, self.entered_at = rss_bytes(), time.perf_counter()

    def encode(self, model: Any) -> Any:
        """``model`` as an encode function that tells the trace when it runs (and with or without grad)."""
        import torch

        def run(input_ids, attention_mask):
            self.on_encode(torch.is_grad_enabled())
            return model(input_ids, attention_mask)

        return run

    def objective(self, inner: Any) -> TracedObjective:
        return TracedObjective(inner, self)

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

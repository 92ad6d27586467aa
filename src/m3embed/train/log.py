"""The run's record as it trains: :class:`RunLog` appends entries to ``train_log.jsonl`` (the format
is :mod:`m3embed.runlog`'s) and hands them to the reporters; :class:`Meter` adds time, throughput and
peak memory to each step's entry and sums them up for the summary."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from m3embed.peak_memory import reset_rss_peak, rss_peak_bytes
from m3embed.report import RunReports
from m3embed.runlog import append_entry, read_log
from m3embed.train.summary import TrainResult


class RunLog:
    """``train_log.jsonl``: one JSON object per step (and per evaluation); rank 0 only. Every entry
    also goes to the reporters of ``train.report_to`` (``reports``).

    Only ever appended to: a resumed run first writes ``{"resumed_from": ..., "resumed_at_step": k}``
    and goes on from step k + 1, so what the interrupted process logged after k stays in the file.
    :func:`read_log` reads it as one uninterrupted run.
    """

    def __init__(self, path: Path, reports: RunReports) -> None:
        self.path = path
        self.reports = reports
        path.parent.mkdir(parents=True, exist_ok=True)

    def eval_at(self, step: int) -> dict[str, float] | None:
        entries = read_log(self.path) if self.path.exists() else []
        found = [e["eval_ndcg@10"] for e in entries if e.get("step") == step and "eval_ndcg@10" in e]
        return found[-1] if found else None

    def write(self, entry: Mapping[str, Any]) -> None:
        append_entry(self.path, entry)
        self.reports.write(entry)


class Meter:
    """Time, throughput and peak memory of this process: each step's metrics and the summary's numbers.

    Memory is a high-water mark, so the training peak is measured after a reset that follows model
    loading and every evaluation; the overall peak keeps the maximum across those resets.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.started = time.perf_counter()
        self.device = torch.device("cpu")
        self.losses: list[float] = []
        self.queries = self.tokens = 0
        self.step_seconds = 0.0
        self.overall_peak = self.train_peak = 0

    def start_training(self, device: torch.device) -> None:
        self.device = device
        self.overall_peak = rss_peak_bytes()
        reset_rss_peak()  # step metrics report the training peak, not the evaluation's

    def after_evaluation(self) -> None:
        self.overall_peak = max(self.overall_peak, rss_peak_bytes())
        reset_rss_peak()

    def step(self, metrics: dict[str, Any], batch, queries, passages, seconds: float) -> dict[str, Any]:
        """``metrics`` (step, epoch, loss parts, lr, grad_norm) with time, throughput and memory added."""
        queries_done = len(batch.queries) * self.world_size
        tokens = int(queries["attention_mask"].sum() + passages["attention_mask"].sum()) * self.world_size
        self.step_seconds += seconds
        self.queries += queries_done
        self.tokens += tokens
        self.losses.append(metrics["loss"])
        self.train_peak = max(self.train_peak, rss_peak_bytes())
        return {
            **metrics,
            "seconds": round(seconds, 4),
            "queries_per_s": queries_done / seconds,
            "tokens_per_s": tokens / seconds,
            "peak_rss_mb": rss_peak_bytes() / 2**20,
            **_gpu_memory(self.device),
            "dataset": batch.dataset,
        }

    def result(
        self, steps: int, first_step: int, log_file, checkpoint, eval_before, eval_after
    ) -> TrainResult:
        cuda = self.device.type == "cuda"
        return TrainResult(
            steps=steps,
            first_step=first_step,
            log_file=log_file,
            checkpoint=checkpoint,
            losses=self.losses,
            eval_before=eval_before,
            eval_after=eval_after,
            peak_rss_bytes=max(self.overall_peak, rss_peak_bytes()),
            train_peak_rss_bytes=self.train_peak,
            peak_gpu_bytes=torch.cuda.max_memory_allocated(self.device) if cuda else None,
            seconds=time.perf_counter() - self.started,
            queries_per_second=self.queries / self.step_seconds if self.step_seconds else 0.0,
            tokens_per_second=self.tokens / self.step_seconds if self.step_seconds else 0.0,
        )


def _gpu_memory(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20}

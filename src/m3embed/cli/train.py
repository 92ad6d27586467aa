"""`m3embed train` (fine-tune a model) and `m3embed plot` (draw a run's curves)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from m3embed.cli.common import quiet_unless_rank_0, user_errors
from m3embed.cli.config_flags import add_setting_flags, in_flag_terms


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a model (see `m3embed train --help`)",
        description=_TRAIN_DESCRIPTION.format(eval_defaults=_eval_defaults()),
        epilog=_TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML (.yaml/.yml/.json) or TOML (.toml) file with sections train, data, memory, loss "
        "(keys: the [section.key] names shown below); flags given here override it. A checkpoint's "
        "train_config.json is such a file.",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (YAML) and exit without training",
    )
    add_setting_flags(p)
    from m3embed.report import MissingExtra

    p.set_defaults(func=user_errors(_run_train, MissingExtra))


_TRAIN_DESCRIPTION = """\
Fine-tune an encoder with BGE-M3's objective (dense + sparse + ColBERT, self-distillation) using a
memory strategy that keeps huge contrastive batches affordable.

With no --config and no --train-data, runs the built-in demo: all-MiniLM-L6-v2 (packaged, mean
pooling) on 300 packaged debdesc lines, 1 epoch, batch 16, group 4, strategy cache, with nDCG@10 on
the packaged dev set before and after (a few minutes on 2 CPU cores). Other flags still apply to it.

Settings come from (later wins): the built-in defaults (or the demo's), --config FILE, the flags.

Evaluation (--eval) uses the settings `m3embed eval` defaults to, so a checkpoint scores the same in
both: {eval_defaults}.

A run's --output-dir belongs to it: starting a new run where another run's log or checkpoints are is
refused unless --resume (continue it) or --overwrite (start over) says which; nothing in the folder is
touched before the config, the data, the evaluation set and the model have been checked. The log is
only appended to."""


_TRAIN_EPILOG = """\
examples:
  m3embed train                                   # the built-in demo
  m3embed train --config configs/debdesc.yaml     # a config file
  m3embed train --config configs/debdesc.yaml --max-steps 100 --strategy checkpoint
  m3embed train --model BAAI/bge-m3 --train-data data/ --batch-size 64 --group-size 8 --bf16
  m3embed train --config configs/debdesc.yaml --resume            # continue from the newest checkpoint
  torchrun --nproc_per_node=4 -m m3embed train --config configs/debdesc.yaml   # 4 processes

Output (in --output-dir): checkpoint-<step>/ (a BGE-M3-layout model plus optimizer, scheduler, RNG and
sampler state and train_config.json), latest (name of the newest checkpoint), train_log.jsonl (one
JSON object per step: every loss part, lr, grad_norm, queries/s, tokens/s, peak memory; and per
evaluation), train_log.png (loss parts and nDCG@10 per output; needs the 'plot' extra; `m3embed plot
RUN_DIR` draws it for any run, also one still going) and, with --report-to tensorboard, tensorboard/
(the same numbers as TensorBoard scalars: tensorboard --logdir <output-dir>/tensorboard). Bad input
(config values, training data lines) is reported before training starts, as one line, exit status 2."""


def _eval_defaults() -> str:
    from m3embed.eval_defaults import EVAL_DEFAULTS

    return EVAL_DEFAULTS.describe()


def config_from_args(args: argparse.Namespace):
    """The :class:`~m3embed.train.RunConfig` that ``m3embed train`` runs with these parsed arguments:
    the demo's config unless ``--config`` or ``--train-data``, then the file, then the flags."""
    from m3embed.train import RunConfig, demo_config, load_config_file, merge_sections

    overrides: dict[str, dict] = {}
    for dest, value in vars(args).items():
        if "." in dest:
            section, key = dest.split(".", 1)
            overrides.setdefault(section, {})[key] = value
    if args.config:
        base = load_config_file(args.config)
    elif "train_data" in overrides.get("data", {}):
        base = {}
    else:
        base = demo_config()
        logging.getLogger("m3embed.train").info(
            "no --config and no --train-data: running the built-in demo (all-MiniLM-L6-v2 on packaged debdesc data)"
        )
    try:
        return RunConfig.from_dict(merge_sections(base, overrides), where=args.config or "command line")
    except ValueError as err:
        raise ValueError(in_flag_terms(str(err), overrides, args.config)) from None


def _run_train(args: argparse.Namespace) -> int:
    import yaml

    from m3embed.train import format_summary, train
    from m3embed.train.precision import NonFiniteStop

    config = config_from_args(args)
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    rank = int(os.environ.get("RANK", "0"))
    quiet_unless_rank_0(rank)
    try:
        result = train(config)
    except NonFiniteStop as err:  # not bad input: the run went wrong; exit status 1, the message says why
        if rank == 0:
            print(f"m3embed train: error: {err}", file=sys.stderr)
        return 1
    if rank == 0:
        print(format_summary(result))
    return 0


def add_plot(sub: argparse._SubParsersAction) -> None:
    from m3embed.report import PLOT_FILE, MissingExtra

    p = sub.add_parser(
        "plot",
        help="draw a training run's loss parts and evaluation curves into a PNG",
        description="Plot train_log.jsonl of a training run, finished or still going: the loss and each "
        "of its parts per step, nDCG@10 per output per evaluation (needs matplotlib: pip install "
        "'m3embed[plot]').",
    )
    p.add_argument("run_dir", help="the run's --output-dir (or its train_log.jsonl)")
    p.add_argument("--output", metavar="PNG", help=f"where to write the image (default RUN_DIR/{PLOT_FILE})")
    p.set_defaults(func=user_errors(_run_plot, MissingExtra))


def _run_plot(args: argparse.Namespace) -> int:
    from m3embed.report import plot_run

    print(f"plot: {plot_run(args.run_dir, args.output)}")
    return 0

"""The training-data commands: `m3embed mine` (hard negatives, with filters for likely positives) and
`m3embed score` (teacher scores for distillation)."""

from __future__ import annotations

import argparse
import logging

from m3embed.cli import lengths as length_flags
from m3embed.cli.common import (
    PASSAGE_FLAG,
    device_of,
    dist_timeout_arg,
    index_dir_arg,
    instruction_args,
    instructions,
    load_model,
    model_args,
    processes,
    user_errors,
    weights_arg,
)

logger = logging.getLogger("m3embed.cli")


def add_mining(sub: argparse._SubParsersAction) -> None:
    """The mine and score commands; every default is MineOptions' or ScoreOptions'."""
    _add_mine(sub)
    _add_score(sub)


def _filter_args(p: argparse.ArgumentParser) -> None:
    """The rules that drop likely positives (none by default: every candidate in --range is kept)."""
    p.add_argument(
        "--relative-margin",
        type=float,
        metavar="M",
        help="drop candidates scoring above (1 - M) x the positive's score (NV-Retriever's TopK-PercPos "
        "with M = 0.05); M in [0, 1)",
    )
    p.add_argument(
        "--absolute-margin",
        type=float,
        metavar="M",
        help="drop candidates scoring above the positive's score - M",
    )
    p.add_argument("--max-score", type=float, metavar="S", help="drop candidates scoring above S")
    p.add_argument(
        "--write-scores",
        action="store_true",
        help="write pos_scores and neg_scores (the --mode scores used) for distillation",
    )


def _add_mine(sub: argparse._SubParsersAction) -> None:
    from m3embed.mine import MineOptions
    from m3embed.scores import MODES

    d = MineOptions()
    p = sub.add_parser("mine", help="mine hard negatives with the model into a new training file")
    p.add_argument("model", help="model directory (BGE-M3 layout) or Hub name")
    p.add_argument("train", help="training JSONL (query, pos, neg)")
    p.add_argument("corpus", help="candidate documents: corpus.jsonl, .jsonl with 'text', or a text file")
    model_args(p)
    instruction_args(p)
    p.add_argument("--output", required=True, help="training JSONL to write")
    p.add_argument(
        "--range",
        type=int,
        nargs=2,
        default=d.rank_range,
        metavar=("FROM", "TO"),
        help="rank range to sample from (default {} {})".format(*d.rank_range),
    )
    p.add_argument(
        "--negatives", type=int, default=d.negatives, help=f"negatives per query (default {d.negatives})"
    )
    p.add_argument(
        "--mode", choices=MODES, default=d.mode, help=f"the score that ranks and filters (default {d.mode})"
    )
    weights_arg(p)
    _filter_args(p)
    length_flags.add_length_args(p, {k: getattr(d, k) for k in length_flags.FLAGS})
    for name in ("batch_size", "shard_size", "seed"):
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=int, default=getattr(d, name), help=f"default {getattr(d, name)}")
    index_dir_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    dist_timeout_arg(p)
    p.set_defaults(func=user_errors(_run_mine, flags={**PASSAGE_FLAG, "MineOptions.rank_range": "--range"}))


def _run_mine(args: argparse.Namespace) -> int:
    from m3embed.mine import MineOptions, mine_hard_negatives, mining_summary

    defaults = {key: getattr(MineOptions, key) for key in length_flags.FLAGS}
    lengths, said = length_flags.resolve(args.model, args, defaults)
    options = MineOptions(
        rank_range=tuple(args.range),
        negatives=args.negatives,
        mode=args.mode,
        **lengths,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        seed=args.seed,
        weights=tuple(args.weights),
        relative_margin=args.relative_margin,
        absolute_margin=args.absolute_margin,
        max_score=args.max_score,
        write_scores=args.write_scores,
        **instructions(args),
    )
    with processes(args) as ranks:
        logger.info(said)
        model = load_model(args.model, args)
        stats = mine_hard_negatives(
            model,
            args.train,
            args.corpus,
            args.output,
            options,
            index_dir=args.index_dir,
            show_progress_bar=not args.no_progress,
            ranks=ranks,
        )
    if stats is not None:  # rank 0 (the others helped encode)
        print(f"wrote {args.output}: {mining_summary(stats)}")
    return 0


def _add_score(sub: argparse._SubParsersAction) -> None:
    from m3embed.scores import MODES
    from m3embed.teacher import ScoreOptions

    d = ScoreOptions()
    p = sub.add_parser(
        "score",
        help="write a training file back with a teacher's pos_scores and neg_scores (distillation)",
        description="Score every (query, passage) pair of a training JSONL with a teacher and write the "
        "file back line for line with pos_scores and neg_scores added. Resumable: a rerun reuses the "
        "finished chunks in OUTPUT.parts/. Under torchrun the processes share the chunks.",
    )
    p.add_argument("train", help="training JSONL (query, pos, neg), .gz allowed")
    p.add_argument(
        "--teacher",
        required=True,
        help="an m3embed / BGE-M3-layout model folder, or a sentence-transformers CrossEncoder folder",
    )
    p.add_argument("-o", "--output", required=True, help="training JSONL to write")
    model_args(p)
    p.add_argument("--mode", choices=MODES, default=d.mode, help=f"the teacher's score (default {d.mode})")
    weights_arg(p)
    length_flags.add_length_args(
        p, {k: getattr(d, k) for k in length_flags.FLAGS}, note="; a cross-encoder's own unless given"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument(
        "--chunk-lines",
        type=int,
        default=d.chunk_lines,
        help=f"lines per part file: the unit of resuming and of sharing out work (default {d.chunk_lines})",
    )
    p.add_argument(
        "--overwrite-scores",
        action="store_true",
        help="rescore lines that already have pos_scores and neg_scores (default: keep them)",
    )
    instruction_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    dist_timeout_arg(p)
    p.set_defaults(func=user_errors(_run_score))


def _run_score(args: argparse.Namespace) -> int:
    import torch

    from m3embed.model import M3Model
    from m3embed.teacher import ScoreOptions, load_teacher, score_training_file

    defaults = {key: getattr(ScoreOptions, key) for key in length_flags.FLAGS}
    lengths, said = length_flags.resolve(args.teacher, args, defaults)
    options = ScoreOptions(
        mode=args.mode,
        weights=tuple(args.weights),
        batch_size=args.batch_size,
        chunk_lines=args.chunk_lines,
        overwrite_scores=args.overwrite_scores,
        **instructions(args),
        **lengths,
    )
    with processes(args) as ranks:
        torch.manual_seed(0)  # heads missing from the folder start the same in a rerun (resumes match)
        teacher = load_teacher(
            args.teacher, device=device_of(args), pooling=args.pooling, max_length=args.passage_max_length
        )
        if isinstance(teacher, M3Model):  # a cross-encoder has its own max length
            logger.info(said)
        counts = score_training_file(
            teacher, args.train, args.output, options, show_progress_bar=not args.no_progress, ranks=ranks
        )
    if ranks.is_main:
        print(
            f"wrote {args.output}: {counts['lines']} lines, {counts['scored']} scored, {counts['kept']} kept "
            f"with their scores ({counts['reused_chunks']} of {counts['chunks']} chunks reused)"
        )
    return 0

"""Command line: ``m3embed train | plot | encode | search | eval | mine``. Arguments -> config -> call."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import sys
import typing
from collections.abc import Mapping
from typing import Any, Literal

from m3embed import settings


def _add_train(sub: argparse._SubParsersAction) -> None:
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
    _add_setting_flags(p)
    p.set_defaults(func=_user_errors(_run_train))


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

_TRAIN_SECTIONS = {
    "train": "model, optimiser, run length, checkpoints, evaluation (section 'train')",
    "data": "training data (section 'data')",
    "memory": "memory strategy of the step (section 'memory')",
    "loss": "objective (section 'loss'; defaults are FlagEmbedding's BGE-M3 values; the formulas are in "
    "docs/design.md)",
}


def _eval_defaults() -> str:
    from m3embed.eval_defaults import EVAL_DEFAULTS

    return EVAL_DEFAULTS.describe()


def _add_setting_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field, in one group per section: the flags are the configs' fields."""
    from m3embed.train import SECTIONS

    for section, kind in SECTIONS.items():
        group = p.add_argument_group(_TRAIN_SECTIONS[section])
        hints = settings.type_hints(kind)
        for f in dataclasses.fields(kind):
            kwargs = _flag_kwargs(f, hints[f.name])
            default = "unset" if f.default is None or f.default == () else f.default
            kwargs["help"] = f"{f.metadata['help']} [{section}.{f.name}, default: {default}]"
            group.add_argument(
                *settings.flags(f), dest=f"{section}.{f.name}", default=argparse.SUPPRESS, **kwargs
            )


def _flag_kwargs(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """argparse's arguments for a field of type ``hint``: a bool is --x/--no-x, a Literal gives the
    choices, a sequence or mapping takes several values, anything else is parsed by its type."""
    kinds = settings.members(hint)
    if bool in kinds:
        return {"action": argparse.BooleanOptionalAction}
    choices = settings.literal_values(hint)
    if all(typing.get_origin(k) is Literal or k is type(None) for k in kinds):
        return {"choices": choices}
    kwargs: dict[str, Any] = {"metavar": f.metadata["metavar"] or f.name.upper()}
    origins = {typing.get_origin(k) for k in kinds}
    if tuple in origins:
        kwargs.update(nargs="+")
    elif Mapping in origins:
        kwargs.update(nargs="+", type=_pair, action=_PairsToDict)
    else:
        kwargs["type"] = _value_parser(kinds, settings.expectation(hint, f.metadata))
    if f.metadata["const"] is not None:
        kwargs.update(nargs="?", const=f.metadata["const"])
    return kwargs


_NONE = ("none", "None", "null")


def _value_parser(kinds: list[Any], expected: str):
    """Text -> value for a field whose type has the alternatives ``kinds`` (e.g. int, 'auto', None)."""
    literals = [typing.get_args(k)[0] for k in kinds if typing.get_origin(k) is Literal]

    def parse(text: str) -> Any:
        if type(None) in kinds and text in _NONE:
            return None
        if text in literals:
            return text
        for kind in (int, float):
            if kind in kinds:
                with contextlib.suppress(ValueError):
                    return kind(text)
        if str in kinds:
            return text
        raise argparse.ArgumentTypeError(f"expected {expected.replace('null', repr('none'))}, got {text!r}")

    return parse


def _pair(text: str) -> tuple[int, int]:
    key, sep, value = text.partition("=")
    try:
        return int(key), int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected MIN_TOKENS=BATCH_SIZE, e.g. 128=32, got {text!r}"
        ) from None


class _PairsToDict(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, dict(values))


_CONFIG_FIELD = re.compile(
    r"\b(?P<cls>\w+Config)\.(?P<key>\w+)(?P<rest> must be (?:an integer |a number )?(?P<op>>=|<=|>|<)? ?)?"
)


def _in_flag_terms(message: str, given: dict[str, dict], config_file: str | None) -> str:
    """A config error about a setting the user gave as a flag, reworded in terms of that flag:
    "DataConfig.batch_size must be an integer >= 1, got 0" -> "--batch-size must be ≥ 1, got 0".
    Settings that came from a config file are named as its section.key, with the file."""
    from m3embed.train import SECTIONS

    section_of = {kind.__name__: (name, kind) for name, kind in SECTIONS.items()}

    def reword(m: re.Match) -> str:
        if m["cls"] not in section_of:
            return m[0]
        (section, kind), key = section_of[m["cls"]], m["key"]
        if key not in given.get(section, {}):  # from the config file (or a default)
            where = f" (in {config_file})" if config_file else ""
            return f"{section}.{key}{where}{m['rest'] or ''}"
        flag = settings.flags(settings.field_of(kind, key))[0]
        if not m["rest"]:
            return flag
        op = {">=": "≥ ", "<=": "≤ ", ">": "> ", "<": "< "}.get(m["op"] or "", "")
        return f"{flag} must be {op}"

    out = _CONFIG_FIELD.sub(reword, message)
    return out.replace(" or null,", " or 'none',") if out != message else out


def _run_train(args: argparse.Namespace) -> int:
    import yaml

    from m3embed.train import RunConfig, demo_config, format_summary, load_config_file, merge_sections, train

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
        config = RunConfig.from_dict(merge_sections(base, overrides), where=args.config or "command line")
    except ValueError as err:
        raise ValueError(_in_flag_terms(str(err), overrides, args.config)) from None
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    rank = int(os.environ.get("RANK", "0"))
    _quiet_unless_rank_0(rank)
    result = train(config)
    if rank == 0:
        print(format_summary(result))
    return 0


def _add_plot(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=_user_errors(_run_plot, MissingExtra))


def _run_plot(args: argparse.Namespace) -> int:
    from m3embed.report import plot_run

    print(f"plot: {plot_run(args.run_dir, args.output)}")
    return 0


def _add_retrieval(sub: argparse._SubParsersAction) -> None:
    """The encode, search, eval and mine commands; every default is their options class's (or
    EVAL_DEFAULTS'), every mode name :data:`m3embed.scores.MODES`."""
    _add_encode(sub)
    _add_search(sub)
    _add_eval(sub)
    _add_mine(sub)


def _add_encode(sub: argparse._SubParsersAction) -> None:
    from m3embed.index import DTYPES, IndexOptions

    d = IndexOptions()
    p = sub.add_parser("encode", help="encode a corpus into an index folder (resumable)")
    p.add_argument("model", help="model directory (BGE-M3 layout) or Hub name")
    p.add_argument(
        "corpus", help="corpus.jsonl (BEIR: _id, title, text), .jsonl.gz, or a text file (one doc a line)"
    )
    p.add_argument("out", help="index folder to write (an unfinished one is resumed)")
    _model_args(p)
    p.add_argument(
        "--max-length",
        type=int,
        default=d.max_length,
        help=f"passage truncation in tokens (default {d.max_length})",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    _shard_size_arg(p)
    p.add_argument(
        "--dtype", choices=DTYPES, default=d.dtype, help=f"dense/ColBERT storage type (default {d.dtype})"
    )
    for output, what in (
        ("dense", "dense vectors"),
        ("sparse", "lexical weights"),
        ("colbert", "ColBERT vectors"),
    ):
        p.add_argument(f"--no-{output}", action="store_true", help=f"do not store {what}")
    p.add_argument("--overwrite", action="store_true", help="delete an existing index at OUT first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _dist_timeout_arg(p)
    p.set_defaults(func=_user_errors(_run_encode))


def _add_search(sub: argparse._SubParsersAction) -> None:
    from m3embed.scores import MODES
    from m3embed.search import DEFAULT_MODE, SearchOptions

    d = SearchOptions()
    p = sub.add_parser("search", help="search an index folder; writes TREC and JSONL runs")
    p.add_argument("index", help="index folder made by `m3embed encode`")
    p.add_argument("queries", help="queries.jsonl (_id, text) or a TSV file 'id<TAB>text'")
    p.add_argument("--model", help="model to encode queries with (default: the one recorded in the index)")
    _model_args(p, pooling_default_from_index=True)
    p.add_argument(
        "--mode",
        nargs="+",
        choices=MODES,
        default=[DEFAULT_MODE],
        help=f"one or more modes (default {DEFAULT_MODE})",
    )
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"hits per query (default {d.top_k})")
    _candidates_and_weights(p, d.candidates)
    p.add_argument(
        "--query-max-length",
        type=int,
        default=d.query_max_length,
        help=f"query truncation in tokens (default {d.query_max_length})",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--numpy", action="store_true", help="exact NumPy dense search instead of faiss")
    p.add_argument(
        "--output", default="runs", help="folder for <mode>.trec and <mode>.jsonl (default ./runs)"
    )
    p.set_defaults(func=_user_errors(_run_search))


def _candidates_and_weights(p: argparse.ArgumentParser, candidates: int) -> None:
    """--candidates and --weights, the settings of ColBERT rerank and fusion (search and eval)."""
    from m3embed.scores import DEFAULT_WEIGHTS

    p.add_argument(
        "--candidates",
        type=int,
        default=candidates,
        help=f"dense and sparse top-N fed to ColBERT rerank and fusion (default {candidates})",
    )
    p.add_argument(
        "--weights",
        type=float,
        nargs=3,
        default=DEFAULT_WEIGHTS,
        metavar=("DENSE", "SPARSE", "COLBERT"),
        help="fusion weights (default {} {} {})".format(*DEFAULT_WEIGHTS),
    )


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from m3embed.eval_defaults import EVAL_DEFAULTS as ED
    from m3embed.scores import MODES

    p = sub.add_parser(
        "eval",
        help="encode + search + nDCG@10 / Recall@100 / MRR@10 on a BEIR folder",
        description="Encode a BEIR folder's corpus, search it in every mode and score the runs. The "
        "defaults are the ones the demo and `m3embed train --eval` use, so a checkpoint gets the same "
        f"numbers from all three: {ED.describe()}.",
    )
    p.add_argument("model", help="model directory (BGE-M3 layout) or Hub name")
    p.add_argument("beir_folder", help="folder with corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    _model_args(p)
    p.add_argument("--split", default=ED.split, help=f"qrels split (default {ED.split})")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="default: all")
    p.add_argument(
        "--max-docs", type=int, help="relevant documents + a seeded random sample of the rest, N in all"
    )
    p.add_argument(
        "--seed", type=int, default=ED.seed, help=f"seed of the --max-docs sample (default {ED.seed})"
    )
    for what in ("query", "passage"):
        value = getattr(ED, f"{what}_max_length")
        p.add_argument(
            f"--{what}-max-length",
            type=int,
            default=value,
            help=f"{what} truncation in tokens (default {value}, as the demo)",
        )
    p.add_argument(
        "--batch-size",
        type=int,
        default=ED.batch_size,
        help=f"texts per encode batch (default {ED.batch_size})",
    )
    p.add_argument("--top-k", type=int, default=ED.top_k, help=f"hits per query (default {ED.top_k})")
    _candidates_and_weights(p, ED.candidates)
    _shard_size_arg(p)
    _index_dir_arg(p)
    p.add_argument("--output", help="write eval.json and eval.md into this folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _dist_timeout_arg(p)
    p.set_defaults(func=_user_errors(_run_eval))


def _add_mine(sub: argparse._SubParsersAction) -> None:
    from m3embed.mine import MineOptions
    from m3embed.scores import MODES

    d = MineOptions()
    p = sub.add_parser("mine", help="mine hard negatives with the model into a new training file")
    p.add_argument("model", help="model directory (BGE-M3 layout) or Hub name")
    p.add_argument("train", help="training JSONL (query, pos, neg)")
    p.add_argument("corpus", help="candidate documents: corpus.jsonl, .jsonl with 'text', or a text file")
    _model_args(p)
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
    p.add_argument("--mode", choices=MODES, default=d.mode, help=f"default {d.mode}")
    for name in ("query_max_length", "passage_max_length", "batch_size", "shard_size", "seed"):
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=int, default=getattr(d, name), help=f"default {getattr(d, name)}")
    _index_dir_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _dist_timeout_arg(p)
    p.set_defaults(func=_user_errors(_run_mine))


def _index_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--index-dir",
        help="keep the encoded corpus here (resumable) instead of a temporary folder; under torchrun "
        "on several machines, a folder every machine reaches",
    )


def _shard_size_arg(p: argparse.ArgumentParser) -> None:
    from m3embed.index import IndexOptions

    default = IndexOptions.shard_size
    p.add_argument(
        "--shard-size",
        type=int,
        default=default,
        help=f"documents per index shard: the unit of resuming, and of sharing out the encoding under "
        f"torchrun (default {default})",
    )


def _dist_timeout_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="under torchrun, the longest a process waits for the others (they finish about one shard "
        "apart; default 1800)",
    )


@contextlib.contextmanager
def _processes(args: argparse.Namespace):
    """The process group torchrun describes (none for one process), for the length of a command."""
    from m3embed.distributed import process_group

    with process_group(args.dist_timeout) as ranks:
        _quiet_unless_rank_0(ranks.rank)
        yield ranks


def _quiet_unless_rank_0(rank: int) -> None:
    if rank != 0:  # under torchrun, rank 0 speaks for the job
        logging.getLogger("m3embed").setLevel(logging.WARNING)


def _user_errors(run, *also: type[Exception]):
    """Report bad input (missing file, bad line, mismatched index, and the errors ``also`` names) as one
    line on stderr, exit status 2."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (FileNotFoundError, FileExistsError, ValueError, *also) as err:
            rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") != "1" else None
            where = "" if rank is None else f" (rank {rank})"
            print(f"m3embed {args.command}: error{where}: {err}", file=sys.stderr)
            return 2

    return wrapped


def _model_args(p: argparse.ArgumentParser, pooling_default_from_index: bool = False) -> None:
    where = "the index's" if pooling_default_from_index else "the model's m3embed_config.json, else cls"
    p.add_argument("--pooling", choices=("cls", "mean"), help=f"dense pooling (default: {where})")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda if available)")


def _load_model(path: str, args: argparse.Namespace, config: dict | None = None):
    import torch

    from m3embed.model import M3Model

    overrides = dict(config or {})
    if args.pooling:
        overrides["pooling"] = args.pooling
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # Heads missing from the directory are initialised randomly: seed them so that `encode` and a later
    # `search` load the same model (same fingerprint) and `eval` numbers are reproducible.
    torch.manual_seed(0)
    return M3Model.from_pretrained(path, device=device, **overrides)


def _run_encode(args: argparse.Namespace) -> int:
    from m3embed.index import IndexOptions, encode_corpus, index_summary

    options = IndexOptions(
        max_length=args.max_length,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        dtype=args.dtype,
        dense=not args.no_dense,
        sparse=not args.no_sparse,
        colbert=not args.no_colbert,
    )
    with _processes(args) as ranks:
        model = _load_model(args.model, args)
        out = encode_corpus(
            model,
            args.corpus,
            args.out,
            options,
            overwrite=args.overwrite,
            show_progress_bar=not args.no_progress,
            ranks=ranks,
        )
    if ranks.is_main:
        print(index_summary(out))
    return 0


def _run_search(args: argparse.Namespace) -> int:
    from pathlib import Path

    from m3embed.beir import read_queries
    from m3embed.index import CorpusIndex
    from m3embed.search import Searcher, SearchOptions, write_jsonl, write_trec

    index = CorpusIndex(args.index)
    queries = {qid: q.text for qid, q in read_queries(args.queries).items()}  # checked before the model loads
    recorded = index.manifest["model"]
    model_path = args.model or recorded["name"]
    if not model_path:
        raise SystemExit(f"{args.index}: the index does not record a model path; pass --model")
    model = _load_model(model_path, args, config=recorded["config"])
    options = SearchOptions(
        top_k=args.top_k,
        candidates=args.candidates,
        weights=tuple(args.weights),
        query_max_length=args.query_max_length,
        batch_size=args.batch_size,
        use_faiss=not args.numpy,
    )
    searcher = Searcher(index, model, options)
    runs = searcher.search_modes(queries, args.mode)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for mode, run in runs.items():
        write_trec(run, out / f"{mode}.trec", run_name=f"m3embed-{mode}")
        write_jsonl(run, out / f"{mode}.jsonl")
        print(f"{mode}: {len(run)} queries -> {out / (mode + '.trec')}, {out / (mode + '.jsonl')}")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from m3embed.evaluate import evaluate_beir, markdown_report

    with _processes(args) as ranks:
        model = _load_model(args.model, args)
        result = evaluate_beir(
            model,
            args.beir_folder,
            args.split,
            query_max_length=args.query_max_length,
            passage_max_length=args.passage_max_length,
            batch_size=args.batch_size,
            max_docs=args.max_docs,
            modes=args.modes,
            weights=args.weights,
            top_k=args.top_k,
            candidates=args.candidates,
            seed=args.seed,
            index_dir=args.index_dir,
            shard_size=args.shard_size,
            show_progress_bar=not args.no_progress,
            ranks=ranks,
        )
    if result is None:
        return 0  # not rank 0: it helped encode
    report = markdown_report(result)
    print(report)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "eval.md").write_text(report)
        print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return 0


def _run_mine(args: argparse.Namespace) -> int:
    from m3embed.mine import MineOptions, mine_hard_negatives

    options = MineOptions(
        rank_range=tuple(args.range),
        negatives=args.negatives,
        mode=args.mode,
        query_max_length=args.query_max_length,
        passage_max_length=args.passage_max_length,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        seed=args.seed,
    )
    with _processes(args) as ranks:
        model = _load_model(args.model, args)
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
        print(
            f"wrote {stats['lines']} lines to {args.output} ({stats['padded']} padded with random negatives)"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m3embed",
        description="Train and run BGE-M3-style embedding models (dense + sparse + ColBERT).",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, and other libraries' messages below WARNING",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_plot(sub)
    _add_retrieval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # m3embed's own progress at INFO; other libraries (transformers, faiss's loader, ...) only from
    # WARNING up unless -v: their INFO chatter says nothing a user has to act on.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("m3embed").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

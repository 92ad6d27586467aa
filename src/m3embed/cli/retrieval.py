"""The retrieval commands: `m3embed encode | search | eval` (mining and teacher scores: cli/mining.py)."""

from __future__ import annotations

import argparse
import logging

from m3embed.cli import lengths as length_flags
from m3embed.cli.common import (
    PASSAGE_FLAG,
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


def add_retrieval(sub: argparse._SubParsersAction) -> None:
    """The encode, search and eval commands; every default is their options class's (or
    EVAL_DEFAULTS'), every mode name :data:`m3embed.scores.MODES`."""
    _add_encode(sub)
    _add_search(sub)
    _add_eval(sub)


def _add_encode(sub: argparse._SubParsersAction) -> None:
    from m3embed.index import DTYPES, IndexOptions

    d = IndexOptions()
    p = sub.add_parser("encode", help="encode a corpus into an index folder (resumable)")
    p.add_argument("model", help="model directory (BGE-M3 layout) or Hub name")
    p.add_argument(
        "corpus", help="corpus.jsonl (BEIR: _id, title, text), .jsonl.gz, or a text file (one doc a line)"
    )
    p.add_argument("out", help="index folder to write (an unfinished one is resumed)")
    model_args(p)
    p.add_argument(
        "--max-length",
        type=int,
        help=length_flags.length_help("passage_max_length", d.max_length),
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
    dist_timeout_arg(p)
    p.set_defaults(func=user_errors(_run_encode, flags={"IndexOptions.max_length": "--max-length"}))


def _add_search(sub: argparse._SubParsersAction) -> None:
    from m3embed.scores import MODES
    from m3embed.search import DEFAULT_MODE, SearchOptions

    d = SearchOptions()
    p = sub.add_parser("search", help="search an index folder; writes TREC and JSONL runs")
    p.add_argument("index", help="index folder made by `m3embed encode`")
    p.add_argument("queries", help="queries.jsonl (_id, text) or a TSV file 'id<TAB>text'")
    p.add_argument("--model", help="model to encode queries with (default: the one recorded in the index)")
    model_args(p, pooling_default_from_index=True)
    instruction_args(p)
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
        help=length_flags.length_help(
            "query_max_length", d.query_max_length, "; passages were cut when the index was encoded"
        ),
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--numpy", action="store_true", help="exact NumPy dense search instead of faiss")
    p.add_argument(
        "--output", default="runs", help="folder for <mode>.trec and <mode>.jsonl (default ./runs)"
    )
    p.set_defaults(func=user_errors(_run_search))


def _candidates_and_weights(p: argparse.ArgumentParser, candidates: int) -> None:
    """--candidates and --weights, the settings of ColBERT rerank and fusion (search and eval)."""
    p.add_argument(
        "--candidates",
        type=int,
        default=candidates,
        help=f"dense and sparse top-N fed to ColBERT rerank and fusion (default {candidates})",
    )
    weights_arg(p)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from m3embed.eval_defaults import EVAL_DEFAULTS as ED
    from m3embed.scores import MODES

    p = sub.add_parser(
        "eval",
        help="encode + search + nDCG@10 / Recall@100 / MRR@10 on a BEIR folder",
        description="Encode a BEIR folder's corpus, search it in every mode and score the runs. The "
        "defaults are the ones the demo and `m3embed train --eval` use, so a checkpoint gets the same "
        f"numbers from all three: {ED.describe()}. The lengths of a checkpoint written by `m3embed "
        "train` are the ones it was trained with (its train_config.json), unless given as flags.",
    )
    p.add_argument("model", help="model directory (BGE-M3 layout) or Hub name")
    p.add_argument("beir_folder", help="folder with corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    model_args(p)
    instruction_args(p)
    p.add_argument("--split", default=ED.split, help=f"qrels split (default {ED.split})")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="default: all")
    p.add_argument(
        "--max-docs", type=int, help="relevant documents + a seeded random sample of the rest, N in all"
    )
    p.add_argument(
        "--seed", type=int, default=ED.seed, help=f"seed of the --max-docs sample (default {ED.seed})"
    )
    length_flags.add_length_args(p, {k: getattr(ED, k) for k in length_flags.FLAGS}, ", as the demo")
    p.add_argument(
        "--batch-size",
        type=int,
        default=ED.batch_size,
        help=f"texts per encode batch (default {ED.batch_size})",
    )
    p.add_argument("--top-k", type=int, default=ED.top_k, help=f"hits per query (default {ED.top_k})")
    _candidates_and_weights(p, ED.candidates)
    _shard_size_arg(p)
    index_dir_arg(p)
    p.add_argument("--output", help="write eval.json and eval.md into this folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    dist_timeout_arg(p)
    p.set_defaults(func=user_errors(_run_eval, flags=PASSAGE_FLAG))


def _shard_size_arg(p: argparse.ArgumentParser) -> None:
    from m3embed.index import IndexOptions

    default = IndexOptions.shard_size
    p.add_argument(
        "--shard-size",
        type=int,
        default=default,
        help=f"documents per index shard: the unit of resuming (a kill loses at most one shard's work; "
        f"{default} documents are 1-2 minutes for a small model on a CPU: raise it on a GPU) and of "
        f"sharing out the encoding under torchrun (default {default})",
    )


def _run_encode(args: argparse.Namespace) -> int:
    from m3embed.index import IndexOptions, encode_corpus, index_summary

    key = "passage_max_length"
    flags = {key: "--max-length"}
    lengths, said = length_flags.resolve(args.model, args, {key: IndexOptions.max_length}, flags)
    options = IndexOptions(
        max_length=lengths[key],
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        dtype=args.dtype,
        dense=not args.no_dense,
        sparse=not args.no_sparse,
        colbert=not args.no_colbert,
    )
    with processes(args) as ranks:
        logger.info(said)
        model = load_model(args.model, args)
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
    from m3embed.index import MANIFEST, CorpusIndex
    from m3embed.search import Searcher, SearchOptions, write_jsonl, write_trec

    index = CorpusIndex(args.index)
    queries = {qid: q.text for qid, q in read_queries(args.queries).items()}  # checked before the model loads
    model_path = args.model or index.recorded_model()
    key = "query_max_length"
    lengths, said = length_flags.resolve(model_path, args, {key: SearchOptions.query_max_length})
    options = SearchOptions(
        top_k=args.top_k,
        candidates=args.candidates,
        weights=tuple(args.weights),
        query_max_length=lengths[key],
        batch_size=args.batch_size,
        use_faiss=not args.numpy,
        **instructions(args),
    )
    logger.info(
        "%s; passages %d tokens (as the index was encoded)", said, index.manifest["options"]["max_length"]
    )
    try:
        model = load_model(model_path, args, config=index.manifest["model"]["config"])
    except FileNotFoundError as err:
        if args.model:
            raise
        raise FileNotFoundError(
            f"the model recorded in {index.path / MANIFEST} is not found: {err}; pass --model PATH"
        ) from None
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

    from m3embed.eval_defaults import EVAL_DEFAULTS
    from m3embed.evaluate import evaluate_beir, markdown_report

    defaults = {key: getattr(EVAL_DEFAULTS, key) for key in length_flags.FLAGS}
    lengths, said = length_flags.resolve(args.model, args, defaults)
    _check_eval_flags(args, lengths)
    with processes(args) as ranks:
        logger.info(said)
        model = load_model(args.model, args)
        result = evaluate_beir(
            model,
            args.beir_folder,
            args.split,
            **lengths,
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
            **instructions(args),
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


def _check_eval_flags(args: argparse.Namespace, lengths: dict[str, int]) -> None:
    """The options evaluate_beir builds from these flags, built once here so that a bad flag fails
    before the model loads and the files are read."""
    from m3embed.index import IndexOptions
    from m3embed.search import SearchOptions

    IndexOptions(
        max_length=lengths["passage_max_length"], batch_size=args.batch_size, shard_size=args.shard_size
    )
    SearchOptions(
        top_k=args.top_k,
        candidates=args.candidates,
        weights=tuple(args.weights),
        query_max_length=lengths["query_max_length"],
        batch_size=args.batch_size,
        **instructions(args),
    )

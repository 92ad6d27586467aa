"""The retrieval commands: `m3embed encode | search | eval | mine`."""

from __future__ import annotations

import argparse
import contextlib
import logging

from m3embed.backbones import POOLINGS
from m3embed.cli import lengths as length_flags
from m3embed.cli.common import quiet_unless_rank_0, user_errors

logger = logging.getLogger("m3embed.cli")


def add_retrieval(sub: argparse._SubParsersAction) -> None:
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
    _dist_timeout_arg(p)
    p.set_defaults(func=user_errors(_run_encode, flags={"IndexOptions.max_length": "--max-length"}))


def _add_search(sub: argparse._SubParsersAction) -> None:
    from m3embed.scores import MODES
    from m3embed.search import DEFAULT_MODE, SearchOptions

    d = SearchOptions()
    p = sub.add_parser("search", help="search an index folder; writes TREC and JSONL runs")
    p.add_argument("index", help="index folder made by `m3embed encode`")
    p.add_argument("queries", help="queries.jsonl (_id, text) or a TSV file 'id<TAB>text'")
    p.add_argument("--model", help="model to encode queries with (default: the one recorded in the index)")
    _model_args(p, pooling_default_from_index=True)
    _instruction_args(p)
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
        f"numbers from all three: {ED.describe()}. The lengths of a checkpoint written by `m3embed "
        "train` are the ones it was trained with (its train_config.json), unless given as flags.",
    )
    p.add_argument("model", help="model directory (BGE-M3 layout) or Hub name")
    p.add_argument("beir_folder", help="folder with corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    _model_args(p)
    _instruction_args(p)
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
    _index_dir_arg(p)
    p.add_argument("--output", help="write eval.json and eval.md into this folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _dist_timeout_arg(p)
    p.set_defaults(func=user_errors(_run_eval, flags=_PASSAGE_FLAG))


def _add_mine(sub: argparse._SubParsersAction) -> None:
    from m3embed.mine import MineOptions
    from m3embed.scores import MODES

    d = MineOptions()
    p = sub.add_parser("mine", help="mine hard negatives with the model into a new training file")
    p.add_argument("model", help="model directory (BGE-M3 layout) or Hub name")
    p.add_argument("train", help="training JSONL (query, pos, neg)")
    p.add_argument("corpus", help="candidate documents: corpus.jsonl, .jsonl with 'text', or a text file")
    _model_args(p)
    _instruction_args(p)
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
    length_flags.add_length_args(p, {k: getattr(d, k) for k in length_flags.FLAGS})
    for name in ("batch_size", "shard_size", "seed"):
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=int, default=getattr(d, name), help=f"default {getattr(d, name)}")
    _index_dir_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _dist_timeout_arg(p)
    p.set_defaults(func=user_errors(_run_mine, flags={**_PASSAGE_FLAG, "MineOptions.rank_range": "--range"}))


_PASSAGE_FLAG = {"IndexOptions.max_length": "--passage-max-length"}  # eval's and mine's index


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
        help=f"documents per index shard: the unit of resuming (a kill loses at most one shard's work; "
        f"{default} documents are 1-2 minutes for a small model on a CPU: raise it on a GPU) and of "
        f"sharing out the encoding under torchrun (default {default})",
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
        quiet_unless_rank_0(ranks.rank)
        yield ranks


def _model_args(p: argparse.ArgumentParser, pooling_default_from_index: bool = False) -> None:
    where = "the index's" if pooling_default_from_index else "the model's m3embed_config.json, else cls"
    p.add_argument("--pooling", choices=POOLINGS, help=f"dense pooling (default: {where})")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda if available)")


def _instruction_args(p: argparse.ArgumentParser) -> None:
    """FlagEmbedding's query-instruction settings (search, eval and mine encode queries)."""
    p.add_argument(
        "--query-instruction-for-retrieval",
        "--query-instruction",
        metavar="TEXT",
        help="instruction put before every query, in --query-instruction-format (default: none)",
    )
    p.add_argument(
        "--query-instruction-format",
        metavar="FORMAT",
        help="template of instruction and query, e.g. $'Instruct: {}\\nQuery: {}' (default: the model "
        "family's: that one for decoder-only LLMs, '{}{}' for encoders)",
    )


def _instructions(args: argparse.Namespace) -> dict[str, str | None]:
    return {
        "query_instruction_for_retrieval": args.query_instruction_for_retrieval,
        "query_instruction_format": args.query_instruction_format,
    }


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
    with _processes(args) as ranks:
        logger.info(said)
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
        **_instructions(args),
    )
    logger.info(
        "%s; passages %d tokens (as the index was encoded)", said, index.manifest["options"]["max_length"]
    )
    try:
        model = _load_model(model_path, args, config=index.manifest["model"]["config"])
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
    with _processes(args) as ranks:
        logger.info(said)
        model = _load_model(args.model, args)
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
            **_instructions(args),
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
        **_instructions(args),
    )


def _run_mine(args: argparse.Namespace) -> int:
    from m3embed.mine import MineOptions, mine_hard_negatives

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
        **_instructions(args),
    )
    with _processes(args) as ranks:
        logger.info(said)
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

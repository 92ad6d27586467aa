"""Command line: ``m3embed train | encode | search | eval | mine``. Argument parsing -> config -> call."""

from __future__ import annotations

import argparse
import logging
import sys


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a model (see `m3embed train --help`)")
    p.set_defaults(func=_not_ready("train"))


def _add_retrieval(sub: argparse._SubParsersAction) -> None:
    modes = ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense")

    p = sub.add_parser("encode", help="encode a corpus into an index folder (resumable)")
    p.add_argument("model", help="model directory (BGE-M3 layout) or Hub name")
    p.add_argument(
        "corpus", help="corpus.jsonl (BEIR: _id, title, text), .jsonl.gz, or a text file (one doc a line)"
    )
    p.add_argument("out", help="index folder to write (an unfinished one is resumed)")
    _model_args(p)
    p.add_argument("--max-length", type=int, default=512, help="passage truncation in tokens (default 512)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=10_000, help="documents per shard, the unit of resuming")
    p.add_argument(
        "--dtype", choices=("float32", "float16"), default="float32", help="dense/ColBERT storage type"
    )
    p.add_argument("--no-dense", action="store_true", help="do not store dense vectors")
    p.add_argument("--no-sparse", action="store_true", help="do not store lexical weights")
    p.add_argument("--no-colbert", action="store_true", help="do not store ColBERT vectors")
    p.add_argument("--overwrite", action="store_true", help="delete an existing index at OUT first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_user_errors(_run_encode))

    p = sub.add_parser("search", help="search an index folder; writes TREC and JSONL runs")
    p.add_argument("index", help="index folder made by `m3embed encode`")
    p.add_argument("queries", help="queries.jsonl (_id, text) or a TSV file 'id<TAB>text'")
    p.add_argument("--model", help="model to encode queries with (default: the one recorded in the index)")
    _model_args(p, pooling_default_from_index=True)
    p.add_argument(
        "--mode", nargs="+", choices=modes, default=["dense"], help="one or more modes (default dense)"
    )
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument(
        "--candidates", type=int, default=100, help="dense and sparse top-N fed to ColBERT rerank and fusion"
    )
    p.add_argument(
        "--weights", type=float, nargs=3, default=(0.4, 0.2, 0.4), metavar=("DENSE", "SPARSE", "COLBERT")
    )
    p.add_argument("--query-max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--numpy", action="store_true", help="exact NumPy dense search instead of faiss")
    p.add_argument(
        "--output", default="runs", help="folder for <mode>.trec and <mode>.jsonl (default ./runs)"
    )
    p.set_defaults(func=_user_errors(_run_search))

    p = sub.add_parser("eval", help="encode + search + nDCG@10 / Recall@100 / MRR@10 on a BEIR folder")
    p.add_argument("model", help="model directory (BGE-M3 layout) or Hub name")
    p.add_argument("beir_folder", help="folder with corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    _model_args(p)
    p.add_argument("--split", default="test")
    p.add_argument("--modes", nargs="+", choices=modes, default=list(modes))
    p.add_argument(
        "--weights", type=float, nargs=3, default=(0.4, 0.2, 0.4), metavar=("DENSE", "SPARSE", "COLBERT")
    )
    p.add_argument(
        "--max-docs", type=int, help="relevant documents + a seeded random sample of the rest, N in all"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the --max-docs sample")
    p.add_argument("--query-max-length", type=int, default=128)
    p.add_argument("--passage-max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument(
        "--index-dir", help="keep the encoded corpus here (resumable) instead of a temporary folder"
    )
    p.add_argument("--output", help="write eval.json and eval.md into this folder")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_user_errors(_run_eval))

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
        default=(10, 100),
        metavar=("FROM", "TO"),
        help="rank range to sample from (default 10 100)",
    )
    p.add_argument("--negatives", type=int, default=15, help="negatives per query (default 15)")
    p.add_argument("--mode", choices=modes, default="dense")
    p.add_argument("--query-max-length", type=int, default=128)
    p.add_argument("--passage-max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--index-dir", help="keep the encoded corpus here (resumable) instead of a temporary folder"
    )
    p.set_defaults(func=_user_errors(_run_mine))


def _user_errors(run):
    """Report bad input (missing file, bad line, mismatched index) as one line on stderr, exit status 2."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (FileNotFoundError, FileExistsError, ValueError) as err:
            print(f"m3embed {args.command}: error: {err}", file=sys.stderr)
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
    return M3Model.from_pretrained(path, device=device, **overrides)


def _run_encode(args: argparse.Namespace) -> int:
    from m3embed.index import IndexOptions, encode_corpus

    options = IndexOptions(
        max_length=args.max_length,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        dtype=args.dtype,
        dense=not args.no_dense,
        sparse=not args.no_sparse,
        colbert=not args.no_colbert,
    )
    model = _load_model(args.model, args)
    out = encode_corpus(
        model,
        args.corpus,
        args.out,
        options,
        overwrite=args.overwrite,
        show_progress_bar=not args.no_progress,
    )
    print(out)
    return 0


def _run_search(args: argparse.Namespace) -> int:
    from pathlib import Path

    from m3embed.beir import read_queries
    from m3embed.index import CorpusIndex
    from m3embed.search import Searcher, SearchOptions, write_jsonl, write_trec

    index = CorpusIndex(args.index)
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
    queries = {qid: q.text for qid, q in read_queries(args.queries).items()}
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
        show_progress_bar=not args.no_progress,
    )
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

    model = _load_model(args.model, args)
    options = MineOptions(
        rank_range=tuple(args.range),
        negatives=args.negatives,
        mode=args.mode,
        query_max_length=args.query_max_length,
        passage_max_length=args.passage_max_length,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    stats = mine_hard_negatives(
        model, args.train, args.corpus, args.output, options, index_dir=args.index_dir
    )
    print(f"wrote {stats['lines']} lines to {args.output} ({stats['padded']} padded with random negatives)")
    return 0


def _not_ready(name: str):
    def run(args: argparse.Namespace) -> int:
        print(f"m3embed {name}: not implemented yet", file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m3embed", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_retrieval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

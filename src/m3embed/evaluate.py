"""Evaluate a model on a BEIR folder: encode the corpus, search in every mode, score with ``ir-measures``.

Metrics: nDCG@10, Recall@100 and MRR@10 (``ir_measures``' ``nDCG@10``, ``R@100``, ``RR@10``), averaged
over every query of the split's qrels; a query the run has no results for counts as 0 (``ir-measures``
alone would leave it out of the mean). When the queries carry a ``lang`` field the same metrics are
reported per language.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3embed.beir import BeirFolder, Document, Query, read_corpus, read_qrels, read_queries
from m3embed.distributed import ONE_PROCESS, DistInfo
from m3embed.eval_defaults import EVAL_DEFAULTS
from m3embed.index import IndexOptions, encode_corpus, index_folder, model_name
from m3embed.model import M3Model
from m3embed.scores import DEFAULT_WEIGHTS, MODES, OUTPUTS, check_modes
from m3embed.search import Run, Searcher, SearchOptions, outputs_needed

logger = logging.getLogger(__name__)

METRIC_NAMES = ("ndcg@10", "recall@100", "mrr@10")


def _measures() -> dict[str, Any]:
    from ir_measures import RR, R, nDCG

    return {"ndcg@10": nDCG @ 10, "recall@100": R @ 100, "mrr@10": RR @ 10}


def compute_metrics(
    qrels: Mapping[str, Mapping[str, int]], run: Run
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean and per-query nDCG@10, Recall@100, MRR@10 of ``run`` over every query in ``qrels``.

    Returns ``(means, {query_id: {metric: value}})``; queries absent from the run score 0.
    """
    import ir_measures

    measures = _measures()
    by_measure = {m: name for name, m in measures.items()}
    run_dict = {qid: {doc: float(score) for doc, score in hits} for qid, hits in run.items() if hits}
    qrels_dict = {qid: dict(docs) for qid, docs in qrels.items()}
    per_query = {qid: dict.fromkeys(METRIC_NAMES, 0.0) for qid in qrels_dict}
    for metric in ir_measures.iter_calc(list(measures.values()), qrels_dict, run_dict):
        if metric.query_id in per_query:
            per_query[metric.query_id][by_measure[metric.measure]] = float(metric.value)
    n = max(1, len(per_query))
    means = {name: sum(q[name] for q in per_query.values()) / n for name in METRIC_NAMES}
    return means, per_query


def evaluate_beir(
    model: M3Model,
    folder: str | os.PathLike,
    split: str = EVAL_DEFAULTS.split,
    *,
    query_max_length: int = EVAL_DEFAULTS.query_max_length,
    passage_max_length: int = EVAL_DEFAULTS.passage_max_length,
    batch_size: int = EVAL_DEFAULTS.batch_size,
    max_docs: int | None = None,
    modes: Sequence[str] = MODES,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    top_k: int = EVAL_DEFAULTS.top_k,
    candidates: int = EVAL_DEFAULTS.candidates,
    seed: int = EVAL_DEFAULTS.seed,
    index_dir: str | os.PathLike | None = None,
    dtype: str = "float32",
    shard_size: int = IndexOptions.shard_size,
    show_progress_bar: bool = False,
    return_runs: bool = False,
    ranks: DistInfo = ONE_PROCESS,
    name: str | None = None,
    query_instruction_for_retrieval: str | None = None,
    query_instruction_format: str | None = None,
) -> dict[str, Any] | None:
    """Encode, search and score ``model`` on the BEIR folder ``folder`` (split ``split``).

    Unset settings are :data:`m3embed.eval_defaults.EVAL_DEFAULTS`, the ones the demo and
    ``m3embed train --eval`` use, so a checkpoint gets the same numbers from every entry point.

    ``max_docs`` limits the corpus to every document relevant to an evaluated query plus a
    deterministic (``seed``) random sample of the others, ``max_docs`` in total, for quick runs.
    Modes the model cannot compute (no sparse or ColBERT head) are skipped and listed in
    ``info["skipped_modes"]``. Only the outputs the requested modes need are encoded and stored
    (:func:`m3embed.search.outputs_needed`; for ``modes=("colbert",)`` the ColBERT candidates then come
    from the dense top-N alone). ``index_dir`` keeps the encoded corpus there (resumable); by default it
    goes to a temporary folder; either way in shards of ``shard_size`` documents. With ``ranks`` (a
    process group, as under ``torchrun``) every process encodes its share of the shards
    (:func:`~m3embed.index.encode_corpus`); rank 0 then searches and scores alone, the other ranks
    return None. ``name`` is what the log line calls the model (default: the folder it was loaded from).
    The queries are read with ``query_instruction_for_retrieval`` in ``query_instruction_format``
    (:class:`~m3embed.search.SearchOptions`).

    Returns::

        {
          "dense": {"ndcg@10": float, "recall@100": float, "mrr@10": float},   # one key per mode run
          ...,
          "per_language": {mode: {lang: {"ndcg@10", "recall@100", "mrr@10", "queries"}}},  # {} if no lang
          "info": {"modes", "skipped_modes", "queries", "documents", "corpus_documents", "weights", ...},
          "runs": {mode: run},   # only with return_runs=True
        }
    """
    # Longer than 60 lines: the public signature and its documented result take 42 of them, and the
    # settings it reports back in "info" are listed once, here. The work is in the helpers below.
    check_modes(modes)
    qrels, queries, corpus, corpus_size = read_eval_split(folder, split, max_docs, seed)
    n_docs = corpus_size if corpus.keep is None else len(corpus.keep)
    logger.info(
        "evaluating %s on %d queries and %d of %d documents",
        name or model_name(model) or "model",
        len(queries),
        n_docs,
        corpus_size,
    )
    index_options = _index_options(modes, passage_max_length, batch_size, dtype, shard_size)
    search_options = SearchOptions(
        top_k=top_k,
        candidates=candidates,
        weights=tuple(weights),
        query_max_length=query_max_length,
        batch_size=batch_size,
        query_instruction_for_retrieval=query_instruction_for_retrieval,
        query_instruction_format=query_instruction_format,
    )
    searched = _encode_and_search(
        model, corpus, queries, modes, index_options, search_options, index_dir, show_progress_bar, ranks
    )
    if searched is None:
        return None  # not rank 0: it helped encode
    runs, skipped, seconds = searched
    metrics = {mode: compute_metrics(qrels, run) for mode, run in runs.items()}
    result: dict[str, Any] = {mode: means for mode, (means, _) in metrics.items()}
    result["per_language"] = per_language(queries, {mode: per_q for mode, (_, per_q) in metrics.items()})
    result["info"] = {
        "model": model_name(model),
        "folder": str(folder),
        "split": split,
        "modes": list(runs),
        "skipped_modes": skipped,
        "queries": len(queries),
        "documents": n_docs,
        "corpus_documents": corpus_size,
        "max_docs": max_docs,
        "seed": seed,
        "weights": list(search_options.weights),
        "top_k": top_k,
        "candidates": candidates,
        "query_max_length": query_max_length,
        "passage_max_length": passage_max_length,
        **seconds,
    }
    if return_runs:
        result["runs"] = runs
    return result


def _index_options(
    modes: Sequence[str], max_length: int, batch_size: int, dtype: str, shard_size: int
) -> IndexOptions:
    """Index options storing only the outputs ``modes`` read (ColBERT vectors are by far the largest)."""
    needed = outputs_needed(modes)
    return IndexOptions(
        max_length=max_length,
        batch_size=batch_size,
        shard_size=shard_size,
        dtype=dtype,  # type: ignore[arg-type]
        **{output: output in needed for output in OUTPUTS},
    )


def _encode_and_search(
    model: M3Model,
    corpus: Iterable[Document],
    queries: Mapping[str, Query],
    modes: Sequence[str],
    index_options: IndexOptions,
    search_options: SearchOptions,
    index_dir: str | os.PathLike | None,
    show_progress_bar: bool,
    ranks: DistInfo,
) -> tuple[dict[str, Run], list[str], dict[str, float]] | None:
    """Encode ``corpus`` into ``index_dir`` (default: a temporary folder) and search it in ``modes``.

    Returns ``{mode: run}`` of the modes the model supports, the modes skipped, and the seconds spent;
    None on ranks other than 0 (they only encode).
    """
    with index_folder(index_dir, "m3embed-eval-", ranks) as out:
        started = time.perf_counter()
        encode_corpus(model, corpus, out, index_options, show_progress_bar=show_progress_bar, ranks=ranks)
        if not ranks.is_main:
            return None
        encoded = time.perf_counter()
        searcher = Searcher(out, model, search_options)
        run_modes = [m for m in modes if m in searcher.modes]
        skipped = [m for m in modes if m not in searcher.modes]
        if skipped:
            logger.info("skipping modes the model cannot compute: %s", ", ".join(skipped))
        runs = searcher.search_modes({qid: q.text for qid, q in queries.items()}, run_modes)
        searched = time.perf_counter()
    seconds = {
        "encode_seconds": round(encoded - started, 1),  # corpus (0 when index_dir already held it)
        "search_seconds": round(searched - encoded, 1),  # query encoding + every mode's search
    }
    return runs, skipped, seconds


def read_eval_split(
    folder: str | os.PathLike, split: str, max_docs: int | None, seed: int
) -> tuple[dict[str, dict[str, int]], dict[str, Query], _Subset, int]:
    """What :func:`evaluate_beir` scores on: qrels, their queries, the corpus (the ``max_docs`` subset:
    every relevant document plus a ``seed``-ed sample of the others) and the full corpus's size."""
    paths = BeirFolder.locate(folder, split)
    qrels, queries = _read_split(paths)
    relevant = {doc for docs in qrels.values() for doc, rel in docs.items() if rel > 0}
    keep, corpus_size = _select_documents(paths.corpus, relevant, max_docs, seed)
    return qrels, queries, _Subset(paths.corpus, keep), corpus_size


def _read_split(paths: BeirFolder) -> tuple[dict[str, dict[str, int]], dict[str, Query]]:
    """The split's qrels and their queries; qrels of a query the queries file lacks are dropped (logged)."""
    qrels = read_qrels(paths.qrels)
    all_queries = read_queries(paths.queries)
    missing = [qid for qid in qrels if qid not in all_queries]
    if missing:
        logger.warning(
            "%d query ids of %s are not in %s (first: %r); they are skipped",
            len(missing),
            paths.qrels,
            paths.queries,
            missing[0],
        )
        qrels = {qid: docs for qid, docs in qrels.items() if qid in all_queries}
    queries = {qid: all_queries[qid] for qid in qrels}
    if not queries:
        raise ValueError(f"{paths.qrels}: no query of the qrels is in {paths.queries}")
    return qrels, queries


def per_language(
    queries: Mapping[str, Query], per_query_of: Mapping[str, Mapping[str, Mapping[str, float]]]
) -> dict[str, dict[str, dict[str, float]]]:
    """``{mode: {lang: {metric: mean, "queries": n}}}`` over the queries of each language ({} if none).

    ``per_query_of`` is ``{mode: {query_id: {metric: value}}}`` (:func:`compute_metrics`).
    """
    langs = sorted({q.lang for q in queries.values() if q.lang is not None})
    if not langs:
        return {}
    per_language: dict[str, dict[str, dict[str, float]]] = {}
    for mode, per_query in per_query_of.items():
        per_language[mode] = {}
        for lang in langs:
            rows = [per_query[qid] for qid, q in queries.items() if q.lang == lang]
            per_language[mode][lang] = {
                **{name: sum(r[name] for r in rows) / len(rows) for name in METRIC_NAMES},
                "queries": len(rows),
            }
    return per_language


def _select_documents(
    corpus: Path, relevant: set[str], max_docs: int | None, seed: int
) -> tuple[set[str] | None, int]:
    """Ids to keep (None = all) and the corpus size: the relevant ids plus a seeded sample of the rest."""
    ids = [doc.id for doc in read_corpus(corpus)]  # validates the whole file before any encoding
    if max_docs is None or max_docs >= len(ids):
        return None, len(ids)
    present = relevant.intersection(ids)
    if len(present) >= max_docs:
        logger.warning(
            "max_docs=%d <= %d relevant documents: keeping only the relevant ones", max_docs, len(present)
        )
        return present, len(ids)
    others = [i for i in ids if i not in present]
    sample = random.Random(seed).sample(others, max_docs - len(present))
    return present | set(sample), len(ids)


@dataclass(frozen=True)
class _Subset:
    """The documents of ``corpus`` whose id is in ``keep`` (all with None); each iteration rereads."""

    corpus: Path
    keep: set[str] | None

    def __iter__(self) -> Iterator[Document]:
        return (doc for doc in read_corpus(self.corpus) if self.keep is None or doc.id in self.keep)


def markdown_report(result: Mapping[str, Any], metric: str = "ndcg@10") -> str:
    """Two Markdown tables: every metric per mode, and ``metric`` per language and mode."""
    modes = list(result["info"]["modes"])
    lines = ["| mode | " + " | ".join(METRIC_NAMES) + " |", "|---|" + "---:|" * len(METRIC_NAMES)]
    for mode in modes:
        lines.append(f"| {mode} | " + " | ".join(f"{result[mode][m]:.3f}" for m in METRIC_NAMES) + " |")
    per_language = result.get("per_language") or {}
    if per_language:
        langs = sorted(next(iter(per_language.values())))
        lines += ["", f"{metric} per query language:", ""]
        lines.append("| lang | queries | " + " | ".join(modes) + " |")
        lines.append("|---|---:|" + "---:|" * len(modes))
        for lang in langs:
            n = per_language[modes[0]][lang]["queries"]
            cells = " | ".join(f"{per_language[m][lang][metric]:.3f}" for m in modes)
            lines.append(f"| {lang} | {n} | {cells} |")
    return "\n".join(lines) + "\n"

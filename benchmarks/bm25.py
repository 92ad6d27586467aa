"""BM25 on a BEIR folder, on the same documents and queries as ``m3embed eval`` / ``train --eval``.

The baseline a learned sparse output has to beat (docs/training.md, "Heads that learn"). It uses
``bm25s`` (Lucene's BM25, k1 = 1.5, b = 0.75) with one tokenisation for every language: bm25s's
Unicode word regex, lower-cased, no stemming and no stop words. ``--max-docs`` keeps the same corpus
subset as ``evaluate_beir`` (every relevant document plus a seeded sample of the others), and the
metrics come from the same ``compute_metrics`` (ir-measures).

    pip install bm25s
    python benchmarks/bm25.py data/debdesc/dev --max-docs 5000
"""

from __future__ import annotations

import argparse
import json

from m3embed.eval_defaults import EVAL_DEFAULTS
from m3embed.evaluate import compute_metrics, per_language, read_eval_split


def bm25_run(documents: list, queries: dict, top_k: int) -> dict[str, list[tuple[str, float]]]:
    """``{query_id: [(doc_id, score), ...]}``, the ``top_k`` best documents of each query."""
    import bm25s

    retriever = bm25s.BM25(k1=1.5, b=0.75)
    corpus_tokens = bm25s.tokenize([d.text for d in documents], stopwords=None, show_progress=False)
    retriever.index(corpus_tokens, show_progress=False)
    ids = list(queries)
    tokens = bm25s.tokenize([queries[q].text for q in ids], stopwords=None, show_progress=False)
    hits, scores = retriever.retrieve(tokens, k=min(top_k, len(documents)), show_progress=False)
    return {
        qid: [(documents[int(d)].id, float(s)) for d, s in zip(row_docs, row_scores) if s > 0]
        for qid, row_docs, row_scores in zip(ids, hits, scores)
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    parser.add_argument("--split", default=EVAL_DEFAULTS.split)
    parser.add_argument("--max-docs", type=int, default=None, help="the same subset as m3embed eval's")
    parser.add_argument("--seed", type=int, default=EVAL_DEFAULTS.seed, help="of the --max-docs sample")
    parser.add_argument("--top-k", type=int, default=EVAL_DEFAULTS.top_k)
    args = parser.parse_args(argv)

    qrels, queries, corpus, corpus_size = read_eval_split(args.folder, args.split, args.max_docs, args.seed)
    documents = list(corpus)
    means, per_query = compute_metrics(qrels, bm25_run(documents, queries, args.top_k))
    languages = per_language(queries, {"bm25": per_query}).get("bm25", {})
    print(f"BM25 (bm25s) on {len(queries)} queries, {len(documents)} of {corpus_size} documents")
    print(
        json.dumps(
            {"bm25": means, "per_language_ndcg@10": {k: round(v["ndcg@10"], 4) for k, v in languages.items()}}
        )
    )


if __name__ == "__main__":
    main()

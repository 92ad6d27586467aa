"""Build src/m3embed/demo_data/ (the README's first fine-tune) from the debdesc task.

Deterministic: the same source and seed give byte-identical files.

    python scripts/make_demo_data.py --source data/debdesc --out src/m3embed/demo_data

* ``train.jsonl``: ``--train-lines`` lines drawn uniformly without replacement from
  ``train/train.jsonl.gz`` (kept in file order), each cut to its positive and its first
  ``--negatives`` negatives (the file lists BM25 negatives best-first, so these are the hardest).
* ``dev/``: a BEIR folder: ``--dev-queries`` queries drawn from ``dev/queries.jsonl`` (stratified by
  language: every language gets ``round(share * n)`` queries, at least one for languages with >= 10
  dev queries), their relevant documents from ``dev/qrels/test.tsv``, and random other documents of
  ``dev/corpus.jsonl`` up to ``--dev-docs`` documents in all.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

logger = logging.getLogger("make_demo_data")

SEED = 20240521


def sample_train(source: Path, out: Path, n_lines: int, n_neg: int, rng: np.random.Generator) -> None:
    path = source / "train" / "train.jsonl.gz"
    with gzip.open(path, "rb") as f:
        total = sum(1 for _ in f)
    keep = set(rng.choice(total, size=n_lines, replace=False).tolist())
    with gzip.open(path, "rt", encoding="utf-8") as f, (out / "train.jsonl").open("w", encoding="utf-8") as w:
        for i, line in enumerate(f):
            if i in keep:
                ex = json.loads(line)
                small = {"query": ex["query"], "pos": ex["pos"][:1], "neg": ex["neg"][:n_neg]}
                w.write(json.dumps(small, ensure_ascii=False) + "\n")
    logger.info("train.jsonl: %d of %d lines", n_lines, total)


def sample_dev(source: Path, out: Path, n_queries: int, n_docs: int, rng: np.random.Generator) -> None:
    dev = source / "dev"
    queries = [json.loads(line) for line in (dev / "queries.jsonl").open(encoding="utf-8")]
    by_lang: dict[str, list[dict]] = defaultdict(list)
    for q in queries:
        by_lang[q["lang"]].append(q)
    chosen: list[dict] = []
    for lang in sorted(by_lang):
        group = by_lang[lang]
        k = round(len(group) / len(queries) * n_queries)
        if k == 0 and len(group) >= 10:
            k = 1
        chosen.extend(
            group[i] for i in sorted(rng.choice(len(group), size=min(k, len(group)), replace=False))
        )
    ids = {q["_id"] for q in chosen}
    rows = (dev / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()
    qrels = [r for r in rows[1:] if r.split("\t")[0] in ids]
    relevant = {r.split("\t")[1] for r in qrels}

    corpus_path = dev / "corpus.jsonl"
    with corpus_path.open(encoding="utf-8") as f:
        all_ids = [json.loads(line)["_id"] for line in f]
    others = [i for i, d in enumerate(all_ids) if d not in relevant]
    extra = n_docs - len(relevant)
    picked = rng.choice(len(others), size=extra, replace=False).tolist()
    keep = relevant | {all_ids[others[i]] for i in picked}

    (out / "dev" / "qrels").mkdir(parents=True, exist_ok=True)
    with (
        corpus_path.open(encoding="utf-8") as f,
        (out / "dev" / "corpus.jsonl").open("w", encoding="utf-8") as w,
    ):
        for line in f:
            doc = json.loads(line)
            if doc["_id"] in keep:
                w.write(json.dumps(doc, ensure_ascii=False) + "\n")
    with (out / "dev" / "queries.jsonl").open("w", encoding="utf-8") as w:
        for q in chosen:
            w.write(json.dumps(q, ensure_ascii=False) + "\n")
    (out / "dev" / "qrels" / "test.tsv").write_text("\n".join([rows[0], *qrels]) + "\n", encoding="utf-8")
    langs = {lang: sum(q["lang"] == lang for q in chosen) for lang in sorted(by_lang)}
    logger.info("dev: %d queries %s, %d qrels, %d documents", len(chosen), langs, len(qrels), len(keep))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=Path("data/debdesc"),
        help="the debdesc folder (not part of the package; docs/training.md)",
    )
    parser.add_argument("--out", type=Path, default=Path("src/m3embed/demo_data"))
    parser.add_argument("--train-lines", type=int, default=300)
    parser.add_argument("--negatives", type=int, default=3)
    parser.add_argument("--dev-queries", type=int, default=150)
    parser.add_argument("--dev-docs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    sample_train(
        args.source, args.out, args.train_lines, args.negatives, np.random.default_rng([args.seed, 0])
    )
    sample_dev(args.source, args.out, args.dev_queries, args.dev_docs, np.random.default_rng([args.seed, 1]))
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    logger.info("%s: %.2f MB in all", args.out, size / 2**20)


if __name__ == "__main__":
    main()

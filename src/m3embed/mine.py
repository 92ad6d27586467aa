"""Hard-negative mining with the model itself (FlagEmbedding's ``hn_mine``, done with m3embed's index).

For each training line: search the candidate corpus with the line's query, keep ranks
``[from, to)`` of the results (0-based, like FlagEmbedding's ``range_for_sampling``), drop documents
whose text is a positive of the line or the query itself, and sample ``negatives`` of the rest
(seeded). When fewer remain, random corpus documents (not positives) fill up the list, as
FlagEmbedding does. The line is written back with the new ``neg`` (and without ``neg_scores``, which
described the old negatives); every other field is kept.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from m3embed.beir import parse_json_line, read_corpus, read_lines
from m3embed.distributed import ONE_PROCESS, DistInfo
from m3embed.index import IndexOptions, encode_corpus, index_folder
from m3embed.model import M3Model
from m3embed.scores import check_modes
from m3embed.search import Searcher, SearchOptions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MineOptions:
    """Where in the ranking negatives come from, how many, and how texts are encoded."""

    rank_range: tuple[int, int] = (10, 100)  # 0-based ranks [from, to) sampled from (FlagEmbedding's 10-100)
    negatives: int = 15  # negatives per line (FlagEmbedding's negative_number)
    mode: str = "dense"  # retrieval mode used for ranking
    query_max_length: int = 128
    passage_max_length: int = 512
    batch_size: int = 32
    shard_size: int = IndexOptions.shard_size  # index shard: unit of resuming and of sharing out encoding
    seed: int = 0  # seeds the sampling of negatives
    queries_per_search: int = 1024  # lines searched at once (bounds memory on big training files)

    def __post_init__(self) -> None:
        lo, hi = self.rank_range
        if not 0 <= lo < hi:
            raise ValueError(f"MineOptions.rank_range must be 0 <= from < to, got {self.rank_range}")
        if self.negatives < 1:
            raise ValueError(f"MineOptions.negatives must be >= 1, got {self.negatives}")
        check_modes([self.mode], "MineOptions.mode")


def read_train_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream ``(line number, object)`` of a training JSONL, checking ``query`` and ``pos``."""
    path = Path(path)
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        obj = parse_json_line(line, path, lineno)
        if not isinstance(obj.get("query"), str) or not obj["query"].strip():
            raise ValueError(f"{path}, line {lineno}: field 'query' must be a non-empty string")
        pos = obj.get("pos")
        if not isinstance(pos, list) or not pos or not all(isinstance(p, str) for p in pos):
            raise ValueError(f"{path}, line {lineno}: field 'pos' must be a non-empty list of strings")
        yield lineno, obj


def mine_hard_negatives(
    model: M3Model,
    train_path: str | os.PathLike,
    corpus: str | os.PathLike,
    out_path: str | os.PathLike,
    options: MineOptions | None = None,
    *,
    index_dir: str | os.PathLike | None = None,
    show_progress_bar: bool = False,
    ranks: DistInfo = ONE_PROCESS,
) -> dict[str, int] | None:
    """Write ``out_path``: the lines of ``train_path`` with negatives mined from ``corpus``.

    Every input is read and checked before the corpus is encoded: the training file, then the corpus.
    The output is written to a temporary file next to ``out_path`` and renamed when complete, so a
    failed or interrupted run leaves no partial output (and an earlier ``out_path`` untouched).
    Returns counts: ``{"lines", "padded"}`` (``padded`` = lines that needed random negatives).
    With ``ranks`` (a process group, as under ``torchrun``) every process encodes its share of the
    corpus; rank 0 then mines alone, and the other ranks return None.
    """
    options = options or MineOptions()
    train_path, out_path = Path(train_path), Path(out_path)
    if out_path.resolve() == train_path.resolve():
        raise ValueError(f"{out_path}: output would overwrite the training file; choose another path")
    # 1. Check the inputs: a bad line fails now, not after the corpus is encoded.
    n_lines = sum(1 for _ in read_train_lines(train_path))
    if not n_lines:
        raise ValueError(f"{train_path}: the training file has no lines")
    if ranks.is_main:
        texts = [doc.text for doc in read_corpus(corpus)]  # texts of the negatives written out
        n_docs = len(texts)
    else:  # reads it all too: every rank stops at a bad line before any waits for another
        texts, n_docs = [], sum(1 for _ in read_corpus(corpus))
    if not n_docs:
        raise ValueError(f"{corpus}: the corpus has no documents")
    with index_folder(index_dir, "m3embed-mine-", ranks) as index:
        # 2. Encode the corpus.
        index_options = IndexOptions(
            max_length=options.passage_max_length,
            batch_size=options.batch_size,
            shard_size=options.shard_size,
        )
        encode_corpus(model, corpus, index, index_options, show_progress_bar=show_progress_bar, ranks=ranks)
        if not ranks.is_main:
            return None  # it helped encode
        search_options = SearchOptions(
            top_k=options.rank_range[1],
            candidates=max(100, options.rank_range[1]),
            query_max_length=options.query_max_length,
            batch_size=options.batch_size,
        )
        searcher = Searcher(index, model, search_options)
        # 3. Search and sample, batch by batch, into a temporary file renamed when complete.
        bar = tqdm(total=n_lines, desc="Mining negatives", unit="line", disable=not show_progress_bar)
        with bar:
            counts = _write_mined(searcher, train_path, out_path, texts, options, bar.update)
    logger.info(
        "mined negatives for %d lines (%d padded with random documents)", counts["lines"], counts["padded"]
    )
    return counts


def _write_mined(
    searcher: Searcher,
    train_path: Path,
    out_path: Path,
    texts: list[str],
    options: MineOptions,
    progress: Callable[[int], object],
) -> dict[str, int]:
    """Write the lines of ``train_path`` with mined negatives to ``out_path``, ``queries_per_search`` lines
    at a time; via a temporary file renamed when complete (removed on failure). Returns the counts."""
    rng = random.Random(options.seed)
    counts = {"lines": 0, "padded": 0}
    row_of = searcher.index.id_to_row
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.partial")
    try:
        with open(partial, "w", encoding="utf-8") as out:
            batch: list[dict[str, Any]] = []
            for _, obj in read_train_lines(train_path):
                batch.append(obj)
                if len(batch) == options.queries_per_search:
                    _mine_batch(searcher, batch, texts, row_of, options, rng, out, counts)
                    progress(len(batch))
                    batch = []
            if batch:
                _mine_batch(searcher, batch, texts, row_of, options, rng, out, counts)
                progress(len(batch))
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
    return counts


def _mine_batch(
    searcher: Searcher,
    batch: list[dict[str, Any]],
    texts: list[str],
    row_of: dict[str, int],
    options: MineOptions,
    rng: random.Random,
    out: Any,
    counts: dict[str, int],
) -> None:
    run = searcher.search([obj["query"] for obj in batch], options.mode)
    lo, hi = options.rank_range
    for i, obj in enumerate(batch):
        exclude = set(obj["pos"]) | {obj["query"]}
        ranked = [texts[row_of[doc_id]] for doc_id, _ in run[str(i)][lo:hi]]
        pool = list(dict.fromkeys(t for t in ranked if t not in exclude))  # unique, rank order
        negs = rng.sample(pool, options.negatives) if len(pool) > options.negatives else pool
        if len(negs) < options.negatives:
            counts["padded"] += 1
            taken = set(negs)
            for _ in range(20 * options.negatives):  # bounded: a tiny corpus may not have enough texts
                if len(negs) == options.negatives:
                    break
                text = texts[rng.randrange(len(texts))]
                if text not in exclude and text not in taken:
                    negs.append(text)
                    taken.add(text)
        new = {k: v for k, v in obj.items() if k != "neg_scores"}
        new["neg"] = negs
        out.write(json.dumps(new, ensure_ascii=False) + "\n")
        counts["lines"] += 1

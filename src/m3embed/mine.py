"""Hard-negative mining with the model itself (FlagEmbedding's ``hn_mine``, done with m3embed's index).

For each training line: search the candidate corpus with the line's query, keep ranks
``[from, to)`` of the results (0-based, like FlagEmbedding's ``range_for_sampling``), drop documents
whose text is a positive of the line or the query itself, and sample ``negatives`` of the rest
(seeded). The line is written back with the new ``neg`` (and without ``neg_scores``, which described
the old negatives); every other field is kept.

Filters (sentence-transformers' ``mine_hard_negatives`` rules, all off by default) drop candidates that
are probably unlabelled positives, judged by the mining ``mode``'s score (fused with ``weights`` as in
:mod:`m3embed.search`), before sampling. The positive's score is the same model's, same mode: the
query against each of its positives, and with several positives the **lowest** (a candidate must stay
below every positive, as sentence-transformers does). Rules, applied in this order, each candidate
counted under the first rule that drops it:

- ``max_score`` S: drop candidates scoring above S;
- ``absolute_margin`` M: drop candidates scoring above ``positive − M``;
- ``relative_margin`` M: drop candidates scoring above ``(1 − M) × positive``.

Fill-up: without filters, a line with fewer than ``negatives`` candidates is filled up with random
corpus documents (not positives), as FlagEmbedding does, and counted as ``padded``. With any filter
set there is no fill-up (random documents would bypass the filters): the line keeps fewer negatives
and is counted as ``short`` (``no_negatives`` when none is left).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from m3embed.beir import parse_json_line, read_corpus, read_lines
from m3embed.distributed import ONE_PROCESS, DistInfo
from m3embed.index import IndexOptions, encode_corpus, index_folder
from m3embed.model import M3Model
from m3embed.scores import DEFAULT_WEIGHTS, check_modes, check_weights
from m3embed.search import Searcher, SearchOptions
from m3embed.teacher import options_pair_scores

logger = logging.getLogger(__name__)
FILTER_RULES = ("max_score", "absolute_margin", "relative_margin")  # the order rules are applied in


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
    weights: tuple[float, float, float] = field(default=DEFAULT_WEIGHTS)  # fusion of `mode` (search's)
    relative_margin: float | None = None  # drop candidates scoring above (1 - M) x the positive's score
    absolute_margin: float | None = None  # drop candidates scoring above the positive's score - M
    max_score: float | None = None  # drop candidates scoring above S
    write_scores: bool = False  # write pos_scores/neg_scores (the mode's scores) for KD training
    query_instruction_for_retrieval: str | None = None  # FlagEmbedding's: put before every query
    query_instruction_format: str | None = None  # "{instruction}{query}" template; None = the model family's

    def __post_init__(self) -> None:
        lo, hi = self.rank_range
        if not 0 <= lo < hi:
            raise ValueError(f"MineOptions.rank_range must be 0 <= from < to, got {self.rank_range}")
        if self.negatives < 1:
            raise ValueError(f"MineOptions.negatives must be >= 1, got {self.negatives}")
        check_modes([self.mode], "MineOptions.mode")
        weights = check_weights(self.weights, "MineOptions.weights")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"MineOptions.weights must be 3 non-negative numbers, not all 0, got {self.weights}"
            )
        object.__setattr__(self, "weights", weights)
        if self.relative_margin is not None and not 0 <= self.relative_margin < 1:
            raise ValueError(f"MineOptions.relative_margin must be in [0, 1), got {self.relative_margin}")
        if self.absolute_margin is not None and self.absolute_margin < 0:
            raise ValueError(f"MineOptions.absolute_margin must be >= 0, got {self.absolute_margin}")

    @property
    def filtering(self) -> bool:
        """Whether any rule drops candidates (and so no random fill-up happens)."""
        return any(x is not None for x in (self.relative_margin, self.absolute_margin, self.max_score))


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
    Returns counts: ``lines``, ``padded`` (lines filled up with random negatives: only without filters);
    with a filter set also ``dropped_<rule>`` per rule (:data:`FILTER_RULES`), ``short`` (lines left with
    fewer than ``negatives``) and ``no_negatives`` (lines left with none).
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
    if options.rank_range[0] >= n_docs:
        raise ValueError(
            f"MineOptions.rank_range starts at rank {options.rank_range[0]} but {corpus} has {n_docs} "
            f"documents, so no candidate ranks that low; give a range starting below {n_docs}"
        )
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
            weights=options.weights,
            query_instruction_for_retrieval=options.query_instruction_for_retrieval,
            query_instruction_format=options.query_instruction_format,
        )
        searcher = Searcher(index, model, search_options)
        # 3. Search and sample, batch by batch, into a temporary file renamed when complete.
        bar = tqdm(total=n_lines, desc="Mining negatives", unit="line", disable=not show_progress_bar)
        with bar:
            counts = _write_mined(searcher, train_path, out_path, texts, options, bar.update)
    logger.info("mined negatives: %s", mining_summary(counts))
    return counts


def mining_summary(counts: dict[str, int]) -> str:
    """One line of the mining counts, e.g. for the CLI: lines, padded, each rule's drops, short lines."""
    text = f"{counts['lines']} lines, {counts['padded']} padded with random documents"
    drops = [f"{counts[f'dropped_{rule}']} by {rule}" for rule in FILTER_RULES if f"dropped_{rule}" in counts]
    if drops:
        text += f"; candidates dropped: {', '.join(drops)}; {counts['short']} lines with fewer negatives"
        text += f" ({counts['no_negatives']} with none)"
    return text


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
    if options.filtering:
        counts.update({f"dropped_{rule}": 0 for rule in FILTER_RULES} | {"short": 0, "no_negatives": 0})
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
    pos_scores: list[list[float]] = []
    if options.filtering or options.write_scores:
        pos_scores = options_pair_scores(
            searcher.model, options, [o["query"] for o in batch], [o["pos"] for o in batch]
        )
    lo, hi = options.rank_range
    lines: list[tuple[dict[str, Any], list[float | None]]] = []
    for i, obj in enumerate(batch):
        exclude = set(obj["pos"]) | {obj["query"]}
        pool: dict[str, float] = {}  # text -> the mode's score; unique texts, rank order
        for doc_id, score in run[str(i)][lo:hi]:
            text = texts[row_of[doc_id]]
            if text not in exclude:
                pool.setdefault(text, score)
        if options.filtering:
            pool = _filter(pool, min(pos_scores[i]), options, counts)
        negs = _sample(pool, texts, exclude, options, rng, counts)
        new = {k: v for k, v in obj.items() if k != "neg_scores"}
        new["neg"] = negs
        lines.append((new, [pool.get(t) for t in negs]))
        counts["lines"] += 1
    if options.write_scores:
        _add_scores(searcher.model, lines, pos_scores, options)
    for new, _ in lines:
        out.write(json.dumps(new, ensure_ascii=False) + "\n")


def _filter(
    pool: dict[str, float], positive: float, options: MineOptions, counts: dict[str, int]
) -> dict[str, float]:
    """The candidates of ``pool`` no rule drops; each dropped one counted under the first rule that drops it."""
    rules = [
        ("max_score", options.max_score),
        ("absolute_margin", None if options.absolute_margin is None else positive - options.absolute_margin),
        (
            "relative_margin",
            None if options.relative_margin is None else (1 - options.relative_margin) * positive,
        ),
    ]
    thresholds = [(name, limit) for name, limit in rules if limit is not None]
    kept = {}
    for text, score in pool.items():
        rule = next((name for name, limit in thresholds if score > limit), None)
        if rule is None:
            kept[text] = score
        else:
            counts[f"dropped_{rule}"] += 1
    return kept


def _sample(
    pool: dict[str, float],
    texts: list[str],
    exclude: set[str],
    options: MineOptions,
    rng: random.Random,
    counts: dict[str, int],
) -> list[str]:
    """``negatives`` of the pool's texts (seeded); a short pool is filled up with random documents only
    when no filter is set, else kept short and counted."""
    candidates = list(pool)
    negs = rng.sample(candidates, options.negatives) if len(candidates) > options.negatives else candidates
    if len(negs) == options.negatives:
        return negs
    if options.filtering:
        counts["short"] += 1
        counts["no_negatives"] += not negs
        return negs
    counts["padded"] += 1
    taken = set(negs)
    for _ in range(20 * options.negatives):  # bounded: a tiny corpus may not have enough texts
        if len(negs) == options.negatives:
            break
        text = texts[rng.randrange(len(texts))]
        if text not in exclude and text not in taken:
            negs.append(text)
            taken.add(text)
    return negs


def _add_scores(
    model: M3Model,
    lines: list[tuple[dict[str, Any], list[float | None]]],
    pos_scores: list[list[float]],
    options: MineOptions,
) -> None:
    """``pos_scores`` and ``neg_scores`` into each line: the search's scores of the negatives, and the
    mode's pair scores for random fill-ups (which no search scored)."""
    missing = [(j, k) for j, (_, scores) in enumerate(lines) for k, s in enumerate(scores) if s is None]
    if missing:
        found = options_pair_scores(
            model,
            options,
            [lines[j][0]["query"] for j, _ in missing],
            [[lines[j][0]["neg"][k]] for j, k in missing],
        )
        for (j, k), (score,) in zip(missing, found):
            lines[j][1][k] = score
    for (new, scores), pos in zip(lines, pos_scores):
        new["pos_scores"] = pos
        new["neg_scores"] = [float(s) for s in scores]

"""Retrieval over an index folder: dense, sparse, ColBERT rerank and weighted hybrid fusion.

The modes, the outputs each one scores with and how they fuse are :mod:`m3embed.scores`'
(:data:`~m3embed.scores.MODES`, :data:`~m3embed.scores.MODE_OUTPUTS`, :func:`~m3embed.scores.fuse`,
:data:`~m3embed.scores.DEFAULT_WEIGHTS`). A :class:`Searcher` runs them in stages, one job each:

1. **first stages** rank the whole corpus by one output: ``dense`` exact top-k by inner product (faiss
   ``IndexFlatIP`` when installed, else a chunked NumPy matrix product, same results); ``sparse``
   lexical matching ``Σ_{t in q∩p} w_q(t)·w_p(t)`` for every document at once, one sparse matrix
   product of the queries' weights with the inverted index (only documents sharing a token with the
   query, score > 0, are returned). The ``dense`` and ``sparse`` modes are their first stage's top-k;
2. **candidates** of every other mode: the union of the first stages' top-N (``candidates`` = N, each
   first stage the index has);
3. **exact scores** of each candidate in every output the index has (dense, sparse, ColBERT MaxSim);
4. **fusion**: each mode's score from those (:func:`~m3embed.scores.fuse`, ``weights``);
5. **top-k** of each mode's scores.

Results are ``{query_id: [(doc_id, score), ...]}`` best first (ties broken by corpus order).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from m3embed.backbones import check_instruction_format
from m3embed.index import CorpusIndex, lexical_weights_to_csr, model_fingerprint, model_name
from m3embed.model import M3Model
from m3embed.scores import DEFAULT_WEIGHTS, MODE_OUTPUTS, MODES, check_modes, check_weights, fuse

if TYPE_CHECKING:
    import scipy.sparse as sp

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODE",
    "DEFAULT_WEIGHTS",
    "MODES",
    "EncodedQueries",
    "Run",
    "Searcher",
    "SearchOptions",
    "outputs_needed",
]

# Outputs that rank the whole corpus on their own; the modes named after them are that ranking.
FIRST_STAGES = ("dense", "sparse")
DEFAULT_MODE = "dense"  # the mode of Searcher.search and `m3embed search` when none is given
Run = dict[str, list[tuple[str, float]]]
Ranked = tuple[np.ndarray, np.ndarray]  # rows (n,) int64 and scores (n,) float32, best first


def outputs_needed(modes: Iterable[str]) -> set[str]:
    """The outputs an index must hold for a :class:`Searcher` to run ``modes``.

    Each mode's own outputs (:data:`~m3embed.scores.MODE_OUTPUTS`), plus dense vectors as the
    candidates of every mode that is not a first stage (``colbert`` alone reranks the dense top-N).
    """
    modes = list(modes)
    check_modes(modes)
    needed = {output for mode in modes for output in MODE_OUTPUTS[mode]}
    if any(mode not in FIRST_STAGES for mode in modes):
        needed.add("dense")
    return needed


@dataclass(frozen=True)
class SearchOptions:
    """Search depth, fusion weights and query encoding."""

    top_k: int = 100  # results returned per query
    candidates: int = 100  # N of the dense and sparse first stages feeding ColBERT rerank and fusion
    weights: tuple[float, float, float] = field(default=DEFAULT_WEIGHTS)  # dense, sparse, colbert
    query_max_length: int = 512  # query truncation, in tokens
    batch_size: int = 64  # queries per encoder forward pass
    use_faiss: bool = True  # faiss IndexFlatIP for dense search when installed (NumPy otherwise)
    query_instruction_for_retrieval: str | None = None  # FlagEmbedding's: put before every query
    query_instruction_format: str | None = None  # "{instruction}{query}" template; None = the model family's

    def __post_init__(self) -> None:
        for name in ("top_k", "candidates", "query_max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SearchOptions.{name} must be >= 1, got {getattr(self, name)}")
        weights = check_weights(self.weights, "SearchOptions.weights")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"SearchOptions.weights must be 3 non-negative numbers (dense, sparse, colbert), got {self.weights}"
            )
        object.__setattr__(self, "weights", weights)
        if self.query_instruction_format is not None:
            check_instruction_format(self.query_instruction_format, "SearchOptions.query_instruction_format")


@dataclass
class EncodedQueries:
    """Queries encoded once and searched in any number of modes.

    Shapes: dense (nq, D) float32 or None; sparse (nq, vocab) CSR or None; colbert nq arrays (tokens, C).
    """

    ids: list[str]
    dense: np.ndarray | None
    sparse: sp.csr_matrix | None
    colbert: list[np.ndarray] | None


class Searcher:
    """Search an index folder built by :func:`m3embed.index.encode_corpus` with the model that built it.

    >>> searcher = Searcher("index/", model)                     # doctest: +SKIP
    >>> run = searcher.search({"q1": "free strategy game"}, mode="colbert+sparse+dense")  # doctest: +SKIP
    """

    def __init__(
        self,
        index: CorpusIndex | str | os.PathLike,
        model: M3Model,
        options: SearchOptions | None = None,
    ) -> None:
        self.index = index if isinstance(index, CorpusIndex) else CorpusIndex(index)
        self.model = model
        self.options = options or SearchOptions()
        _check_same_model(self.index, model)

    @property
    def outputs(self) -> set[str]:
        """The outputs this index holds."""
        ix = self.index
        return {
            o
            for o, has in (("dense", ix.has_dense), ("sparse", ix.has_sparse), ("colbert", ix.has_colbert))
            if has
        }

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes this index and model support: their outputs are there, and so is a first stage."""
        have = self.outputs
        first_stage = bool(have.intersection(FIRST_STAGES))
        return tuple(
            m for m in MODES if have.issuperset(MODE_OUTPUTS[m]) and (m in FIRST_STAGES or first_stage)
        )

    # ------------------------------------------------------------------ public API
    def encode_queries(self, queries: Mapping[str, str] | Sequence[str]) -> EncodedQueries:
        """Encode queries (``{id: text}``, or a list whose ids are ``"0"``, ``"1"``, ...)."""
        if isinstance(queries, Mapping):
            ids, texts = list(queries), list(queries.values())
        else:
            texts = list(queries)
            ids = [str(i) for i in range(len(texts))]
        o, ix = self.options, self.index
        texts = self.model.with_instruction(
            texts, o.query_instruction_for_retrieval, o.query_instruction_format
        )
        out = self.model.encode(
            texts,
            batch_size=self.options.batch_size,
            max_length=self.options.query_max_length,
            return_dense=ix.has_dense,
            return_sparse=ix.has_sparse,
            return_colbert_vecs=ix.has_colbert,
            show_progress_bar=False,
        )
        sparse = None
        if ix.has_sparse:
            sparse = lexical_weights_to_csr(out["lexical_weights"], ix.manifest["vocab_size"])
        dense = out["dense_vecs"].astype(np.float32) if ix.has_dense else None
        return EncodedQueries(ids, dense, sparse, out["colbert_vecs"])

    def search(
        self,
        queries: Mapping[str, str] | Sequence[str] | EncodedQueries,
        mode: str = DEFAULT_MODE,
        top_k: int | None = None,
    ) -> Run:
        """Top-k documents of each query in one mode: ``{query_id: [(doc_id, score), ...]}``."""
        return self.search_modes(queries, [mode], top_k)[mode]

    def search_modes(
        self,
        queries: Mapping[str, str] | Sequence[str] | EncodedQueries,
        modes: Sequence[str] | None = None,
        top_k: int | None = None,
    ) -> dict[str, Run]:
        """Search in several modes with one query encoding and one candidate scoring: ``{mode: run}``."""
        modes = list(modes or self.modes)
        self._check_modes(modes)
        enc = queries if isinstance(queries, EncodedQueries) else self.encode_queries(queries)
        top_k = top_k or self.options.top_k
        ranked = {m: self._first_stage(m, enc, top_k) for m in modes if m in FIRST_STAGES}
        reranked = [m for m in modes if m not in FIRST_STAGES]
        if reranked:
            ranked.update(self._rerank(enc, reranked, top_k))
        return {m: self._to_run(enc, ranked[m]) for m in modes}

    def exact_scores(
        self, enc: EncodedQueries, q: int, rows: np.ndarray, modes: Sequence[str] = MODES
    ) -> dict[str, np.ndarray]:
        """Each mode's score of query ``q`` against documents ``rows`` (zeros for missing outputs).

        Shapes: rows (n,) -> {mode: (n,) float32}.
        """
        return fuse(self._output_scores(enc, q, rows), self.options.weights, modes)

    # ------------------------------------------------------------------ the stages
    def _check_modes(self, modes: Sequence[str]) -> None:
        check_modes(modes, "mode")
        unsupported = [m for m in modes if m not in self.modes]
        if unsupported:
            raise ValueError(
                f"mode {unsupported[0]!r} needs outputs this index does not have "
                f"(it supports: {', '.join(self.modes)})"
            )

    def _first_stage(self, output: str, enc: EncodedQueries, k: int) -> list[Ranked]:
        """1. The top-k of the whole corpus by one output, per query."""
        if output == "dense":
            return self._dense_topk(enc.dense, k)
        return self._sparse_topk(enc.sparse, k)

    @cached_property
    def _dense_topk(self) -> _DenseTopK:
        return _DenseTopK(self.index.dense, self.options.use_faiss)

    @cached_property
    def _sparse_topk(self) -> _SparseTopK:
        return _SparseTopK(self.index.sparse)

    def _candidates(self, enc: EncodedQueries) -> list[np.ndarray]:
        """2. Per query, the union of every first stage's top-N rows."""
        n = self.options.candidates
        stages = [self._first_stage(o, enc, n) for o in FIRST_STAGES if o in self.outputs]
        return [
            np.unique(np.concatenate([stage[q][0] for stage in stages])) if stages else np.zeros(0, np.int64)
            for q in range(len(enc.ids))
        ]

    def _output_scores(self, enc: EncodedQueries, q: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        """3. Query ``q``'s exact score against ``rows`` in each output (zeros where it is missing).

        Shapes: rows (n,) -> {output: (n,) float32}.
        """
        n = len(rows)
        dense = self.index.dense[rows] @ enc.dense[q] if enc.dense is not None else np.zeros(n, np.float32)
        sparse = np.zeros(n, np.float32)
        if enc.sparse is not None:
            sparse = np.asarray((self.index.sparse[rows] @ enc.sparse[q].T).todense()).ravel()
        colbert = np.zeros(n, np.float32)
        if enc.colbert is not None:
            colbert = self._colbert_scores(enc.colbert[q], rows)
        return {"dense": dense, "sparse": sparse, "colbert": colbert}

    def _rerank(self, enc: EncodedQueries, modes: Sequence[str], k: int) -> dict[str, list[Ranked]]:
        """2-5. The candidates scored exactly, fused per mode (4.) and cut to the top-k (5.)."""
        out: dict[str, list[Ranked]] = {m: [] for m in modes}
        for q, rows in enumerate(self._candidates(enc)):
            fused = self.exact_scores(enc, q, rows, modes)
            for mode in modes:
                out[mode].append(_top_k(rows, fused[mode], k))
        return out

    def _colbert_scores(self, q_vecs: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """MaxSim of one query against several documents, packed (one matrix product).

        Shapes: q_vecs (n_q, C), rows (n,) -> (n,) float32.
        """
        vecs, offsets = self.index.colbert_block(rows.tolist())  # (T, C), (n + 1,)
        scores = np.zeros(len(rows), dtype=np.float32)
        lengths = np.diff(offsets)
        nonempty = lengths > 0
        if len(q_vecs) == 0 or not nonempty.any():
            return scores
        sim = np.asarray(q_vecs, dtype=np.float32) @ vecs.T  # (n_q, T)
        best = np.maximum.reduceat(sim, offsets[:-1][nonempty], axis=1)  # (n_q, n nonempty)
        scores[nonempty] = best.sum(0) / len(q_vecs)
        return scores

    def _to_run(self, enc: EncodedQueries, ranked: list[Ranked]) -> Run:
        ids = self.index.ids
        return {
            qid: [(ids[r], float(s)) for r, s in zip(rows.tolist(), scores.tolist())]
            for qid, (rows, scores) in zip(enc.ids, ranked)
        }


def _check_same_model(index: CorpusIndex, model: M3Model) -> None:
    """ValueError unless ``model`` is the model that built ``index`` (same fingerprint)."""
    fingerprint = model_fingerprint(model)
    if fingerprint != index.fingerprint:
        built_by = index.manifest["model"]["name"] or "an unnamed model"
        raise ValueError(
            f"{index.path}: index was built by {built_by} (fingerprint {index.fingerprint}) "
            f"but the searching model is {model_name(model) or 'an unnamed model'} (fingerprint "
            f"{fingerprint}); re-encode the corpus with this model (`m3embed encode`)"
        )


class _DenseTopK:
    """Exact inner-product top-k over the dense vectors: faiss ``IndexFlatIP``, or NumPy without faiss.

    Which one is decided once, here: faiss when asked for and installed.
    """

    def __init__(self, vectors: np.ndarray, use_faiss: bool) -> None:
        self.vectors = vectors  # (N, D) float32
        self.faiss = _faiss_flat_ip(vectors) if use_faiss else None

    def __call__(self, q: np.ndarray, k: int) -> list[Ranked]:
        """Shapes: q (nq, D) -> nq rankings of min(k, N) rows."""
        k = min(k, len(self.vectors))
        if k == 0:
            return [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in range(len(q))]
        if self.faiss is not None:
            scores, rows = self.faiss.search(np.ascontiguousarray(q, dtype=np.float32), k)
            return [_sorted(r[r >= 0], s[r >= 0]) for r, s in zip(rows, scores)]
        all_rows = np.arange(len(self.vectors))
        out = []
        for start in range(0, len(q), 256):
            block = q[start : start + 256] @ self.vectors.T  # (b, N)
            out.extend(_top_k(all_rows, scores, k) for scores in block)
        return out


def _faiss_flat_ip(vectors: np.ndarray) -> Any:
    """A faiss ``IndexFlatIP`` holding ``vectors``, or None (logged) when faiss is not installed."""
    try:
        import faiss
    except ImportError:
        logger.info("faiss is not installed: dense search uses exact NumPy scoring")
        return None
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors))
    return index


class _SparseTopK:
    """Lexical-matching top-k over the whole corpus through an inverted index (token -> documents)."""

    def __init__(self, matrix: sp.csr_matrix) -> None:
        self.inverted = matrix.T.tocsr()  # (vocab, N)

    def __call__(self, q: sp.csr_matrix, k: int) -> list[Ranked]:
        """Shapes: q (nq, vocab) CSR -> nq rankings of at most k rows, each with a score > 0."""
        out = []
        for start in range(0, q.shape[0], 256):
            block = (q[start : start + 256] @ self.inverted).tocsr()  # (b, N), only co-occurring pairs
            for i in range(block.shape[0]):
                lo, hi = block.indptr[i], block.indptr[i + 1]
                rows, scores = block.indices[lo:hi], block.data[lo:hi]
                keep = scores > 0
                out.append(_top_k(rows[keep], scores[keep], k))
        return out


def _top_k(rows: np.ndarray, scores: np.ndarray, k: int) -> Ranked:
    """5. The k best of ``rows`` by ``scores``, best first (all of them when there are at most k)."""
    if len(rows) > k:
        top = np.argpartition(-scores, k - 1)[:k]
        rows, scores = rows[top], scores[top]
    return _sorted(rows, scores)


def _sorted(rows: np.ndarray, scores: np.ndarray) -> Ranked:
    """Rows and scores, best first; equal scores in corpus order."""
    order = np.lexsort((rows, -scores))
    return rows[order].astype(np.int64), scores[order].astype(np.float32)


# ---------------------------------------------------------------------- output
def write_trec(run: Run, path: str | os.PathLike, run_name: str = "m3embed") -> None:
    """Write a TREC run file: ``query_id Q0 doc_id rank score run_name`` (rank from 1)."""
    with open(path, "w", encoding="utf-8") as f:
        for qid, hits in run.items():
            for rank, (doc_id, score) in enumerate(hits, start=1):
                f.write(f"{qid} Q0 {doc_id} {rank} {score:.6f} {run_name}\n")


def write_jsonl(run: Run, path: str | os.PathLike) -> None:
    """Write one line per query: ``{"query_id", "hits": [{"doc_id", "score", "rank"}]}``."""
    with open(path, "w", encoding="utf-8") as f:
        for qid, hits in run.items():
            items = [{"doc_id": d, "score": s, "rank": r} for r, (d, s) in enumerate(hits, start=1)]
            f.write(json.dumps({"query_id": qid, "hits": items}, ensure_ascii=False) + "\n")


def read_trec(path: str | os.PathLike) -> Run:
    """Read a TREC run file back into ``{query_id: [(doc_id, score), ...]}`` (file order)."""
    run: Run = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if len(parts) != 6:
            raise ValueError(
                f"{path}, line {lineno}: expected 6 fields 'qid Q0 docid rank score run', got {len(parts)}"
            )
        run.setdefault(parts[0], []).append((parts[2], float(parts[4])))
    return run

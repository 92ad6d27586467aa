"""Retrieval over an index folder: dense, sparse, ColBERT rerank and weighted hybrid fusion.

Modes (FlagEmbedding's ``compute_score`` names) and how each is computed:

- ``dense``: exact top-k by inner product, with ``faiss`` ``IndexFlatIP`` when installed, else a
  chunked NumPy matrix product (same results);
- ``sparse``: lexical matching ``Σ_{t in q∩p} w_q(t)·w_p(t)`` for every document at once, as one sparse
  matrix product of the queries' weights with the inverted index (the transposed document matrix);
  only documents sharing a token with the query (score > 0) are returned;
- ``colbert``, ``sparse+dense``, ``colbert+sparse+dense``: the candidates are the union of the dense
  top-N and the sparse top-N (``candidates`` = N, each first stage the index has); each candidate is
  then scored exactly in dense, sparse and ColBERT and ranked by the mode's score. The fusions are
  FlagEmbedding's weighted means with ``weights = (w_dense, w_sparse, w_colbert)``:
  ``sparse+dense = (w_s·s + w_d·d) / (w_s + w_d)`` and
  ``colbert+sparse+dense = (w_c·c + w_s·s + w_d·d) / (w_c + w_s + w_d)``.
  The default weights ``(0.4, 0.2, 0.4)`` are those FlagEmbedding's README recommends for BGE-M3.

Results are ``{query_id: [(doc_id, score), ...]}`` best first (ties broken by corpus order).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from m3embed.index import CorpusIndex, lexical_weights_to_csr, model_fingerprint, model_name
from m3embed.model import M3Model

logger = logging.getLogger(__name__)

MODES = ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense")
DEFAULT_WEIGHTS = (0.4, 0.2, 0.4)  # dense, sparse, colbert: FlagEmbedding's recommendation for BGE-M3
Run = dict[str, list[tuple[str, float]]]


@dataclass(frozen=True)
class SearchOptions:
    """Search depth, fusion weights and query encoding."""

    top_k: int = 100  # results returned per query
    candidates: int = 100  # N of the dense and sparse first stages feeding ColBERT rerank and fusion
    weights: tuple[float, float, float] = field(default=DEFAULT_WEIGHTS)  # dense, sparse, colbert
    query_max_length: int = 512  # query truncation, in tokens
    batch_size: int = 64  # queries per encoder forward pass
    use_faiss: bool = True  # faiss IndexFlatIP for dense search when installed (NumPy otherwise)

    def __post_init__(self) -> None:
        for name in ("top_k", "candidates", "query_max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SearchOptions.{name} must be >= 1, got {getattr(self, name)}")
        if len(self.weights) != 3 or any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(
                f"SearchOptions.weights must be 3 non-negative numbers (dense, sparse, colbert), got {self.weights}"
            )
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))


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
        fingerprint = model_fingerprint(model)
        if fingerprint != self.index.fingerprint:
            built_by = self.index.manifest["model"]["name"] or "an unnamed model"
            raise ValueError(
                f"{self.index.path}: index was built by {built_by} (fingerprint {self.index.fingerprint}) "
                f"but the searching model is {model_name(model) or 'an unnamed model'} (fingerprint "
                f"{fingerprint}); re-encode the corpus with this model (`m3embed encode`)"
            )
        self._faiss = None
        self._inverted: sp.csr_matrix | None = None

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes this index and model support."""
        ix = self.index
        first_stage = ix.has_dense or ix.has_sparse
        can = {
            "dense": ix.has_dense,
            "sparse": ix.has_sparse,
            "colbert": ix.has_colbert and first_stage,
            "sparse+dense": ix.has_dense and ix.has_sparse,
            "colbert+sparse+dense": ix.has_dense and ix.has_sparse and ix.has_colbert,
        }
        return tuple(m for m in MODES if can[m])

    # ------------------------------------------------------------------ public API
    def encode_queries(self, queries: Mapping[str, str] | Sequence[str]) -> EncodedQueries:
        """Encode queries (``{id: text}``, or a list whose ids are ``"0"``, ``"1"``, ...)."""
        if isinstance(queries, Mapping):
            ids, texts = list(queries), list(queries.values())
        else:
            texts = list(queries)
            ids = [str(i) for i in range(len(texts))]
        ix = self.index
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
        mode: str = "dense",
        top_k: int | None = None,
    ) -> Run:
        """Top-k documents of each query in one mode: ``{query_id: [(doc_id, score), ...]}``."""
        self._check_mode(mode)
        enc = queries if isinstance(queries, EncodedQueries) else self.encode_queries(queries)
        top_k = top_k or self.options.top_k
        if mode == "dense":
            rows_scores = self._dense_topk(enc.dense, top_k)
        elif mode == "sparse":
            rows_scores = self._sparse_topk(enc.sparse, top_k)
        else:
            rows_scores = self._fused_topk(enc, [mode], top_k)[mode]
        return self._to_run(enc, rows_scores)

    def _to_run(self, enc: EncodedQueries, rows_scores: list[tuple[np.ndarray, np.ndarray]]) -> Run:
        ids = self.index.ids
        return {
            qid: [(ids[r], float(s)) for r, s in zip(rows.tolist(), scores.tolist())]
            for qid, (rows, scores) in zip(enc.ids, rows_scores)
        }

    def search_modes(
        self,
        queries: Mapping[str, str] | Sequence[str],
        modes: Sequence[str] | None = None,
        top_k: int | None = None,
    ) -> dict[str, Run]:
        """Search in several modes with one query encoding and one candidate scoring: ``{mode: run}``."""
        modes = list(modes or self.modes)
        for mode in modes:
            self._check_mode(mode)
        enc = self.encode_queries(queries)
        top_k = top_k or self.options.top_k
        fused = [m for m in modes if m not in ("dense", "sparse")]
        fused_runs = self._fused_topk(enc, fused, top_k) if fused else {}
        return {
            m: self._to_run(enc, fused_runs[m]) if m in fused_runs else self.search(enc, m, top_k)
            for m in modes
        }

    def exact_scores(self, enc: EncodedQueries, q: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Every mode's score of query ``q`` against documents ``rows`` (zeros for missing outputs).

        Shapes: rows (n,) -> {mode: (n,) float32}.
        """
        n = len(rows)
        dense = self.index.dense[rows] @ enc.dense[q] if enc.dense is not None else np.zeros(n, np.float32)
        sparse = np.zeros(n, np.float32)
        if enc.sparse is not None:
            sparse = np.asarray((self.index.sparse[rows] @ enc.sparse[q].T).todense()).ravel()
        colbert = np.zeros(n, np.float32)
        if enc.colbert is not None:
            colbert = self._colbert_scores(enc.colbert[q], rows)
        w_d, w_s, w_c = self.options.weights
        return {
            "dense": dense,
            "sparse": sparse,
            "colbert": colbert,
            "sparse+dense": (w_s * sparse + w_d * dense) / (w_s + w_d),
            "colbert+sparse+dense": (w_c * colbert + w_s * sparse + w_d * dense) / (w_c + w_s + w_d),
        }

    # ------------------------------------------------------------------ the modes
    def _check_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if mode not in self.modes:
            raise ValueError(
                f"mode {mode!r} needs outputs this index does not have (it supports: {', '.join(self.modes)})"
            )

    def _dense_topk(self, q: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        k = min(k, len(self.index))
        if k == 0:
            return [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in range(len(q))]
        index = self._faiss_index()
        if index is not None:
            scores, rows = index.search(np.ascontiguousarray(q, dtype=np.float32), k)
            return [_sorted(r[r >= 0], s[r >= 0]) for r, s in zip(rows, scores)]
        out = []
        for start in range(0, len(q), 256):
            block = q[start : start + 256] @ self.index.dense.T  # (b, N)
            for scores in block:
                rows = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
                out.append(_sorted(rows, scores[rows]))
        return out

    def _faiss_index(self) -> Any:
        if not self.options.use_faiss:
            return None
        if self._faiss is None:
            try:
                import faiss
            except ImportError:
                logger.info("faiss is not installed: dense search uses exact NumPy scoring")
                self.options = SearchOptions(**{**self.options.__dict__, "use_faiss": False})
                return None
            self._faiss = faiss.IndexFlatIP(self.index.dense.shape[1])
            self._faiss.add(np.ascontiguousarray(self.index.dense))
        return self._faiss

    def _sparse_topk(self, q: sp.csr_matrix, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._inverted is None:
            self._inverted = self.index.sparse.T.tocsr()  # (vocab, N): token -> documents
        out = []
        for start in range(0, q.shape[0], 256):
            block = (q[start : start + 256] @ self._inverted).tocsr()  # (b, N), only co-occurring pairs
            for i in range(block.shape[0]):
                lo, hi = block.indptr[i], block.indptr[i + 1]
                rows, scores = block.indices[lo:hi], block.data[lo:hi]
                keep = scores > 0
                rows, scores = rows[keep], scores[keep]
                if len(rows) > k:
                    top = np.argpartition(-scores, k - 1)[:k]
                    rows, scores = rows[top], scores[top]
                out.append(_sorted(rows, scores))
        return out

    def _fused_topk(
        self, enc: EncodedQueries, modes: Sequence[str], k: int
    ) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
        """Rerank the union of the dense and sparse top-N by exact scores, for several modes at once."""
        n = self.options.candidates
        dense = self._dense_topk(enc.dense, n) if enc.dense is not None else None
        sparse = self._sparse_topk(enc.sparse, n) if enc.sparse is not None else None
        out: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {m: [] for m in modes}
        for q in range(len(enc.ids)):
            parts = [stage[q][0] for stage in (dense, sparse) if stage is not None]
            rows = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
            exact = self.exact_scores(enc, q, rows)
            for mode in modes:
                scores, top_rows = exact[mode], rows
                if len(rows) > k:
                    top = np.argpartition(-scores, k - 1)[:k]
                    top_rows, scores = rows[top], scores[top]
                out[mode].append(_sorted(top_rows, scores))
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


def _sorted(rows: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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

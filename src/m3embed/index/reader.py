"""Reading a finished index folder for search (:class:`CorpusIndex`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from m3embed.index.manifest import read_manifest

if TYPE_CHECKING:
    import scipy.sparse as sp


class CorpusIndex:
    """A finished index folder, loaded for search.

    Dense vectors and lexical weights are loaded into memory (as float32 / CSR); ColBERT vectors stay
    memory-mapped per shard and are read only for the candidates being reranked.
    """

    def __init__(self, index_dir: str | os.PathLike) -> None:
        self.path = Path(index_dir)
        self.manifest = read_manifest(self.path)
        if not self.manifest["complete"]:
            raise ValueError(f"{self.path}: the index is unfinished; run `m3embed encode` again to resume it")
        opts = self.manifest["options"]
        shards = [self.path / s["name"] for s in self.manifest["shards"]]
        self.ids: list[str] = [i for s in shards for i in json.loads((s / "ids.json").read_text())]
        self.id_to_row = {doc_id: row for row, doc_id in enumerate(self.ids)}
        n_cols = self.manifest["vocab_size"]

        self.dense: np.ndarray | None = None  # (N, D) float32
        if opts["dense"]:
            self.dense = np.concatenate([np.load(s / "dense.npy") for s in shards]).astype(np.float32)
        self.sparse: sp.csr_matrix | None = None  # (N, vocab) float32
        if opts["sparse"]:
            import scipy.sparse as sp

            parts = [sp.load_npz(s / "sparse.npz") for s in shards]
            self.sparse = (
                sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, n_cols), dtype=np.float32)
            )
        self._colbert: list[np.ndarray] = []
        self._colbert_shard = np.zeros(0, dtype=np.int64)
        self._colbert_offsets = np.zeros((0, 2), dtype=np.int64)
        if opts["colbert"]:
            shard_of, spans = [], []
            for k, s in enumerate(shards):
                self._colbert.append(np.load(s / "colbert.npy", mmap_mode="r"))
                offsets = np.load(s / "colbert_offsets.npy")
                shard_of.append(np.full(len(offsets) - 1, k, dtype=np.int64))
                spans.append(np.stack([offsets[:-1], offsets[1:]], axis=1))
            if shards:
                self._colbert_shard = np.concatenate(shard_of)
                self._colbert_offsets = np.concatenate(spans)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_dense(self) -> bool:
        return self.dense is not None

    @property
    def has_sparse(self) -> bool:
        return self.sparse is not None

    @property
    def has_colbert(self) -> bool:
        return bool(self.manifest["options"]["colbert"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["model"]["fingerprint"]

    def colbert_vecs(self, row: int) -> np.ndarray:
        """The ColBERT vectors of document ``row``. Shapes: -> (tokens, C) float32."""
        start, stop = self._colbert_offsets[row]
        return np.asarray(self._colbert[self._colbert_shard[row]][start:stop], dtype=np.float32)

    def colbert_block(self, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """ColBERT vectors of several documents packed together, with offsets.

        Shapes: len(rows) = n -> vectors (T, C) float32, offsets (n + 1,) int64.
        """
        parts = [self.colbert_vecs(r) for r in rows]
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(p) for p in parts])
        dim = self._colbert[0].shape[1] if self._colbert else 0
        vecs = np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)
        return vecs, offsets

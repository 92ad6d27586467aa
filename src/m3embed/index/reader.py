"""Reading a finished index folder for search (:class:`CorpusIndex`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from m3embed.index.manifest import MANIFEST, read_manifest

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

    def recorded_model(self) -> str:
        """The model that built the index, as recorded in its manifest: the folder to load for search.

        An index records the folder as an absolute path; older ones hold it as typed
        (``runs/x/checkpoint-18``), which is looked for relative to the working directory, then to the
        index folder's parent. A name no folder matches that can only be a Hub name (``owner/name``)
        is returned as is. Anything else raises FileNotFoundError naming the index, the folders tried
        and ``--model``.
        """
        name = self.manifest["model"]["name"]
        manifest = self.path / MANIFEST
        if not name:
            raise ValueError(f"{manifest} records no model (it was built in memory); pass --model PATH")
        path = Path(name).expanduser()
        tried = [path] if path.is_absolute() else [Path.cwd() / path, self.path.resolve().parent / path]
        for folder in tried:
            if folder.is_dir():
                return str(folder)
        if not path.is_absolute() and _hub_name_like(name):
            return name
        where = " or ".join(str(t) for t in tried)
        raise FileNotFoundError(
            f"the model recorded in {manifest}, {name}, is not found (looked for {where}); pass --model PATH"
        )

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


def _hub_name_like(name: str) -> bool:
    """``owner/name`` or ``name``: what :func:`m3embed.loading.resolve_model_path` would ask the Hub for."""
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1 and "\\" not in name

"""One shard at a time: the pass that checks the corpus and hashes each shard's documents, and the
writing of one shard's files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from m3embed.beir import Document
from m3embed.index.manifest import SHARD_RECORD
from m3embed.index.options import IndexOptions
from m3embed.model import M3Model

# scipy (the `search` extra) is imported where it is used, so that the CLI can read IndexOptions'
# defaults for its --help, and `m3embed train` runs, without it.
if TYPE_CHECKING:
    import scipy.sparse as sp


@dataclass(frozen=True)
class CorpusScan:
    """What the pass over the corpus before encoding found; it read and checked every document."""

    documents: int
    title_only: int  # documents with an empty text, encoded from their title
    shard_hashes: tuple[str, ...]  # per shard: sha256 of its documents' ids and texts, in corpus order


def scan_corpus(docs: Iterable[Document], shard_size: int) -> CorpusScan:
    """Read every document once (a corpus file is checked line by line) and hash each shard's worth.

    The hashes let a later run reuse the shards whose documents did not change. Documents given as
    objects are checked for an empty id or text and duplicate ids (a corpus file is checked by
    :func:`~m3embed.beir.read_corpus`).
    """
    hashes: list[str] = []
    seen: set[str] = set()
    n = title_only = 0
    h = hashlib.sha256()
    for doc in docs:
        if not doc.id or not doc.text.strip():
            field = "id" if not doc.id else "text"
            raise ValueError(f"document {n + 1} (id {doc.id!r}): empty {field}")
        if doc.id in seen:
            raise ValueError(f"document {n + 1}: duplicate document id {doc.id!r}")
        seen.add(doc.id)
        h.update(json.dumps([doc.id, doc.text]).encode())
        h.update(b"\n")
        n += 1
        title_only += doc.title_only
        if n % shard_size == 0:
            hashes.append(h.hexdigest())
            h = hashlib.sha256()
    if n % shard_size:
        hashes.append(h.hexdigest())
    return CorpusScan(documents=n, title_only=title_only, shard_hashes=tuple(hashes))


def write_shard(
    model: M3Model,
    docs: list[Document],
    path: Path,
    digest: str,
    options: IndexOptions,
    n_cols: int,
    show_progress_bar: bool,
) -> dict[str, Any]:
    """Encode one shard into ``path`` (via ``path.tmp`` and a rename); return its manifest record.

    ``digest`` is the hash of its documents; the record is also written into the folder, last.
    """
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    out = model.encode(
        [d.text for d in docs],
        batch_size=options.batch_size,
        max_length=options.max_length,
        return_dense=options.dense,
        return_sparse=options.sparse,
        return_colbert_vecs=options.colbert,
        show_progress_bar=show_progress_bar and len(docs) > options.batch_size and _on_a_terminal(),
    )
    (tmp / "ids.json").write_text(json.dumps([d.id for d in docs]))
    if options.dense:
        np.save(tmp / "dense.npy", out["dense_vecs"].astype(options.dtype))
    if options.sparse:
        import scipy.sparse as sp

        sp.save_npz(tmp / "sparse.npz", lexical_weights_to_csr(out["lexical_weights"], n_cols))
    n_vectors = 0
    if options.colbert:
        vecs = out["colbert_vecs"]
        offsets = np.zeros(len(vecs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(v) for v in vecs])
        n_vectors = int(offsets[-1])
        np.save(tmp / "colbert.npy", np.concatenate(vecs).astype(options.dtype))
        np.save(tmp / "colbert_offsets.npy", offsets)
    record = {
        "name": path.name,
        "documents": len(docs),
        "colbert_vectors": n_vectors,
        "title_only": sum(d.title_only for d in docs),
        "sha256": digest,
    }
    (tmp / SHARD_RECORD).write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)
    return record


def lexical_weights_to_csr(weights: Sequence[dict[str, float]], n_cols: int) -> sp.csr_matrix:
    """FlagEmbedding's lexical weights (``{str(token_id): weight}`` per text) as a CSR matrix.

    Shapes: n dicts -> (n, n_cols) float32.
    """
    import scipy.sparse as sp

    indptr = np.zeros(len(weights) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(w) for w in weights])
    indices = np.fromiter((int(t) for w in weights for t in w), dtype=np.int64, count=int(indptr[-1]))
    data = np.fromiter((v for w in weights for v in w.values()), dtype=np.float32, count=int(indptr[-1]))
    if indices.size and indices.max() >= n_cols:
        raise ValueError(f"token id {indices.max()} >= sparse matrix width {n_cols}")
    matrix = sp.csr_matrix((data, indices, indptr), shape=(len(weights), n_cols))
    matrix.sort_indices()
    return matrix


def _on_a_terminal() -> bool:
    """The bar within a shard nests under the corpus bar: on a terminal it redraws in place, but
    written to a file each of its updates would be a line of its own, so there it is left out."""
    return sys.stderr.isatty()

"""Corpus encoding to an on-disk index folder: sharded, streamed, resumable.

Layout of an index folder::

    manifest.json                 model (name + fingerprint + config), options, counts, finished shards
    shard-00000/ids.json          document ids of the shard, in corpus order
    shard-00000/dense.npy         (n, D) float16 or float32
    shard-00000/sparse.npz        (n, vocab) scipy.sparse CSR, float32 lexical weights
    shard-00000/colbert.npy       (tokens, C) all ColBERT vectors of the shard, packed
    shard-00000/colbert_offsets.npy  (n + 1,) int64: document i owns rows offsets[i]:offsets[i+1]
    shard-00000/shard.json        the shard's manifest record (documents, vectors, hash of its documents)
    shard-00001/...

Before anything is written the whole corpus is read once: every line is checked (a bad line fails in
seconds, not after hours of encoding) and each shard's documents are hashed. The manifest keeps the
hash of every finished shard, so a rerun after a corpus fix encodes only the shards whose documents
changed.

Shard ``k`` always holds documents ``[k·shard_size, (k+1)·shard_size)`` of the corpus, so a run that
was interrupted resumes from its last finished shard: a shard is written to ``shard-0000k.tmp``,
renamed when complete, and only then recorded in the manifest. A finished shard folder carries its own
record (``shard.json``), so a shard finished after the last manifest write is kept too; anything else
is redone. The corpus is read as a stream (one shard in memory); within a shard ``M3Model.encode``
sorts the texts by length so batches carry little padding.

Several processes (``torchrun ... -m m3embed encode``) share one index: rank 0 prepares the folder,
every process encodes its turn of the shards left to do and writes them itself, and rank 0 writes the
one manifest when all are done. Resuming reads the shard records, so it does not matter which process
died, nor how many processes the next run has.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
from tqdm.auto import tqdm

from m3embed.beir import Document, read_corpus
from m3embed.distributed import ONE_PROCESS, DistInfo, gather_objects, on_main, raise_if_any
from m3embed.model import M3Model

# scipy (the `search` extra) is imported where it is used, so that the CLI can read IndexOptions'
# defaults for its --help, and `m3embed train` runs, without it.
if TYPE_CHECKING:
    import scipy.sparse as sp

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARD_RECORD = "shard.json"  # in every finished shard folder: its entry of the manifest's "shards"
FORMAT_VERSION = 1
Dtype = Literal["float32", "float16"]
DTYPES: tuple[str, ...] = get_args(Dtype)  # storage types of dense and ColBERT vectors


@dataclass(frozen=True)
class IndexOptions:
    """How a corpus is encoded; saved in the manifest (a resumed run must use the same options)."""

    max_length: int = 512  # passage truncation, in tokens
    batch_size: int = 32  # texts per encoder forward pass
    shard_size: int = 10_000  # documents per shard (the unit of resuming; one shard is held in memory)
    dtype: Dtype = "float32"  # storage type of dense and ColBERT vectors
    dense: bool = True  # store dense vectors
    sparse: bool = True  # store lexical weights (ignored, with a log line, if the model has no sparse head)
    colbert: bool = True  # store ColBERT vectors (ignored, with a log line, if the model has no ColBERT head)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"IndexOptions.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("max_length", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"IndexOptions.{name} must be >= 1, got {getattr(self, name)}")
        if not (self.dense or self.sparse or self.colbert):
            raise ValueError("IndexOptions: at least one of dense, sparse, colbert must be True")

    def for_model(self, model: M3Model) -> IndexOptions:
        """These options with the outputs the model cannot produce turned off."""
        sparse = self.sparse and model.sparse_linear is not None
        colbert = self.colbert and model.colbert_linear is not None
        if self.sparse and not sparse:
            logger.info("model has no sparse head: the index has no lexical weights")
        if self.colbert and not colbert:
            logger.info("model has no ColBERT head: the index has no ColBERT vectors")
        return IndexOptions(**{**asdict(self), "sparse": sparse, "colbert": colbert})


def model_fingerprint(model: M3Model) -> str:
    """A short hash of the model's configuration and of a sample of every weight tensor.

    Cheap (a few hundred values per tensor) yet different for any two differently trained models;
    used to refuse searching an index with a model that did not build it. Weights M3Model never uses
    (the Hugging Face pooler) are left out.
    """
    h = hashlib.sha256()
    h.update(json.dumps(asdict(model.config), sort_keys=True).encode())
    for name, param in sorted(model.state_dict().items()):
        if ".pooler." in f".{name}":
            continue  # HF's pooler is unused by M3Model and freshly random when the checkpoint lacks it
        flat = param.detach().reshape(-1)
        sample = torch.cat([flat[:256], flat[-256:]]).float().cpu().numpy()
        h.update(name.encode())
        h.update(str(tuple(param.shape)).encode())
        h.update(sample.tobytes())
    return h.hexdigest()[:16]


def model_name(model: M3Model) -> str:
    """The path or Hub name the model was loaded from (empty for models built in memory)."""
    return str(getattr(model.backbone.config, "_name_or_path", "") or "")


def vocab_size(model: M3Model) -> int:
    """Number of sparse matrix columns: every token id the tokenizer or the embeddings can produce."""
    return max(len(model.tokenizer), int(getattr(model.backbone.config, "vocab_size", 0) or 0))


# ---------------------------------------------------------------------- writing
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


def encode_corpus(
    model: M3Model,
    corpus: str | os.PathLike | Iterable[Document],
    out_dir: str | os.PathLike,
    options: IndexOptions | None = None,
    *,
    resume: bool = True,
    overwrite: bool = False,
    show_progress_bar: bool = True,
    ranks: DistInfo = ONE_PROCESS,
) -> Path:
    """Encode a corpus into the index folder ``out_dir`` and return its path.

    ``corpus`` is a corpus file (see :func:`m3embed.beir.read_corpus`) or an iterable of
    :class:`~m3embed.beir.Document` (read twice; a one-pass iterator is first turned into a list).
    The whole corpus is read and checked before anything is written, so a bad line or an empty corpus
    fails in seconds, not after hours of encoding.

    With ``resume`` (default) an existing index of the same model, options and corpus file keeps every
    finished shard whose documents are unchanged (compared by a hash of their ids and texts) and
    encodes the rest; a finished index of an unchanged corpus is returned as is. ``overwrite`` deletes
    an existing index first. An index of another model, other options or another corpus file is an
    error (nothing is deleted unless ``overwrite``). The manifest's ``last_run`` says how many
    documents this call encoded and reused (see :func:`index_summary`).

    ``ranks`` (:func:`m3embed.distributed.init_from_env`'s answer under ``torchrun``): every process
    calls this with the same arguments and a folder they all reach; the shards to encode are dealt out
    in turn, and every process returns once rank 0 has written the finished manifest.
    """
    started = time.perf_counter()
    options = (options or IndexOptions()).for_model(model)
    out = Path(out_dir)
    documents = _reiterable(corpus)
    scan = scan_corpus(documents(), options.shard_size)  # every line checked before any encoding
    if scan.documents == 0:
        where = f"{corpus}: the corpus file" if isinstance(corpus, str | os.PathLike) else "the corpus"
        raise ValueError(f"{where} has no documents; an index needs at least one")
    shards = {f"shard-{k:05d}": digest for k, digest in enumerate(scan.shard_hashes)}  # name -> hash
    new = _new_manifest(model, options, corpus, scan)
    manifest, kept = _prepare_index(out, new, shards, resume, overwrite, ranks)  # complete: False if not
    reused = manifest["counts"]["documents"]
    own: list[dict[str, Any]] = []  # records of the shards this process encodes
    if len(kept) == len(shards) and manifest["complete"]:
        logger.info("%s is already complete (%d documents)", out, reused)
    else:
        if kept:
            logger.info("reusing %d finished shards (%d documents) of %s", len(kept), reused, out)
        todo = [name for name in shards if name not in kept][ranks.rank :: ranks.world_size]  # dealt out
        own = _encode_shards(
            model, documents(), out, manifest, options, shards, set(todo), ranks, show_progress_bar
        )
    per_rank = gather_objects(own, ranks)  # in a process group: waits for every rank's last shard
    manifest = on_main(lambda: _finish(out, manifest, per_rank, reused, started), ranks)
    if manifest["last_run"]["encoded"]:
        logger.info("encoded %d documents into %s", manifest["counts"]["documents"], out)
    return out


def _prepare_index(
    out: Path,
    new: dict[str, Any],
    shards: dict[str, str],
    resume: bool,
    overwrite: bool,
    ranks: DistInfo,
) -> tuple[dict[str, Any], set[str]]:
    """Rank 0 readies the folder (:func:`_prepare_folder`, :func:`_keep_unchanged_shards`); every rank
    gets the manifest to continue and the names of the shards kept.

    In a process group every rank then checks that it sees the manifest rank 0 wrote (the same
    folder) and that its model and corpus are rank 0's, so no rank writes shards another cannot use.
    """

    def prepare() -> tuple[dict[str, Any], set[str], dict[str, str]]:
        manifest = _prepare_folder(out, new, resume, overwrite)
        return manifest, _keep_unchanged_shards(out, manifest, shards), shards

    manifest, kept, main_shards = on_main(prepare, ranks)
    if ranks.enabled:
        problem = None
        if not (out / MANIFEST).is_file():
            problem = (
                f"rank {ranks.rank} does not see {out / MANIFEST}, which rank 0 wrote: every process must "
                "reach the index folder (on several machines: a shared filesystem; for eval and mine "
                "pass --index-dir on one)"
            )
        elif new["model"]["fingerprint"] != manifest["model"]["fingerprint"]:
            problem = f"rank {ranks.rank} loaded another model than rank 0 ({new['model']['fingerprint']})"
        elif shards != main_shards:
            problem = f"rank {ranks.rank} reads other documents from the corpus than rank 0"
        raise_if_any(problem, ranks)
    return manifest, kept


def _finish(
    out: Path, manifest: dict[str, Any], per_rank: list[list[dict[str, Any]]], reused: int, started: float
) -> dict[str, Any]:
    """Rank 0's last step: record every rank's shards (``per_rank``) in the manifest and mark it complete."""
    for rank, records in enumerate(per_rank):
        missing = [r["name"] for r in records if not (out / r["name"] / SHARD_RECORD).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{out / missing[0]}: rank {rank} wrote this shard but rank 0 does not see it; every "
                "process must write to the same folder (on several machines: a shared filesystem)"
            )
        _add_shards(manifest, records)
    n_shards = -(-manifest["corpus"]["documents"] // manifest["options"]["shard_size"])
    assert len(manifest["shards"]) == n_shards, (len(manifest["shards"]), n_shards)
    manifest["complete"] = True
    manifest["last_run"] = _last_run([sum(r["documents"] for r in rs) for rs in per_rank], reused, started)
    _write_manifest(out, manifest)
    return manifest


def _new_manifest(model: M3Model, options: IndexOptions, corpus: Any, scan: CorpusScan) -> dict[str, Any]:
    """The manifest of an index of ``corpus`` by ``model`` with no shard finished yet."""
    return {
        "format_version": FORMAT_VERSION,
        "model": {
            "name": model_name(model),
            "fingerprint": model_fingerprint(model),
            "config": asdict(model.config),
        },
        "options": asdict(options),
        "corpus": {**_corpus_info(corpus), "documents": scan.documents},
        "vocab_size": vocab_size(model),
        "shards": [],
        "counts": {"documents": 0, "colbert_vectors": 0, "title_only": 0},
        "complete": False,
    }


def _prepare_folder(out: Path, manifest: dict[str, Any], resume: bool, overwrite: bool) -> dict[str, Any]:
    """Make ``out`` ready to write: emptied (``overwrite``) or kept for resuming; return the manifest to use.

    An existing index is resumed (its manifest returned, checked against ``manifest``), deleted with
    ``overwrite``, or refused; a non-empty folder that is no index is refused unless ``overwrite``.
    """
    if (out / MANIFEST).exists():
        if overwrite:
            shutil.rmtree(out)
        elif not resume:
            raise FileExistsError(
                f"{out}: an index already exists; pass overwrite=True (--overwrite) to replace it"
            )
        else:
            manifest = _check_resumable(out, manifest)
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out}: directory exists, is not empty and has no {MANIFEST}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return manifest


def _encode_shards(
    model: M3Model,
    docs: Iterator[Document],
    out: Path,
    manifest: dict[str, Any],
    options: IndexOptions,
    shards: dict[str, str],
    todo: set[str],
    ranks: DistInfo,
    show_progress_bar: bool,
) -> list[dict[str, Any]]:
    """Encode the shards named in ``todo``; return their records.

    ``docs`` is the whole corpus and ``shards`` maps every shard's name to the hash of its documents,
    in corpus order. One process records each shard in the manifest as it finishes; in a process group
    rank 0 records them all at the end. The bar (rank 0's) counts the documents already in the index
    and its own.
    """
    n, size = manifest["corpus"]["documents"], options.shard_size
    reused = manifest["counts"]["documents"]
    show_progress_bar = show_progress_bar and ranks.is_main
    bar = tqdm(
        total=reused + sum(min(size, n - k * size) for k, name in enumerate(shards) if name in todo),
        initial=reused,
        desc="Encoding corpus",
        unit="doc",
        disable=not show_progress_bar,
    )
    records: list[dict[str, Any]] = []
    for name, digest in shards.items():
        if len(records) == len(todo):
            break
        chunk = list(islice(docs, size))
        if name not in todo:
            continue
        records.append(
            _write_shard(model, chunk, out / name, digest, options, manifest["vocab_size"], show_progress_bar)
        )
        if not ranks.enabled:
            _add_shards(manifest, records[-1:])
            _write_manifest(out, manifest)
        bar.update(len(chunk))
    bar.close()
    return records


def _add_shards(manifest: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Record finished shards in ``manifest`` (a shard recorded again replaces its old record)."""
    by_name = {s["name"]: s for s in [*manifest["shards"], *records]}
    manifest["shards"] = [by_name[name] for name in sorted(by_name)]
    manifest["counts"] = _counts(manifest["shards"])


def _reiterable(corpus: str | os.PathLike | Iterable[Document]) -> Callable[[], Iterator[Document]]:
    """A function returning a fresh iterator over the corpus each call (the corpus is read twice)."""
    if isinstance(corpus, str | os.PathLike):
        path = Path(corpus)
        return lambda: read_corpus(path)
    docs = list(corpus) if isinstance(corpus, Iterator) else corpus
    return lambda: iter(docs)


def _corpus_info(corpus: Any) -> dict[str, Any]:
    if not isinstance(corpus, str | os.PathLike):
        return {"path": None}
    path = Path(corpus)
    return {"path": str(path.resolve()), "bytes": path.stat().st_size}


def _counts(shards: list[dict[str, Any]]) -> dict[str, int]:
    return {key: sum(s.get(key, 0) for s in shards) for key in ("documents", "colbert_vectors", "title_only")}


def _last_run(encoded_by_rank: list[int], reused: int, started: float) -> dict[str, Any]:
    seconds = round(time.perf_counter() - started, 2)
    run = {"encoded": sum(encoded_by_rank), "reused": reused, "seconds": seconds}
    if len(encoded_by_rank) > 1:
        run["encoded_by_rank"] = encoded_by_rank
    return run


def _check_resumable(out: Path, new: dict[str, Any]) -> dict[str, Any]:
    """The existing manifest (with the new corpus facts), if this run may reuse its shards; else an error.

    The corpus must be the same file; its content may have changed (a fixed line): which shards are
    still valid is decided per shard by :func:`_keep_unchanged_shards`.
    """
    old = read_manifest(out)
    problems = []
    if old["model"]["fingerprint"] != new["model"]["fingerprint"]:
        problems.append(
            f"model fingerprint {old['model']['fingerprint']} ({old['model']['name'] or 'unnamed'}) "
            f"!= {new['model']['fingerprint']} ({new['model']['name'] or 'unnamed'})"
        )
    if old["options"] != new["options"]:
        problems.append(f"options {old['options']} != {new['options']}")
    if old["corpus"].get("path") != new["corpus"].get("path"):
        problems.append(f"corpus file {old['corpus'].get('path')} != {new['corpus'].get('path')}")
    if problems:
        raise ValueError(
            f"{out}: cannot resume, the existing index was built differently: "
            + "; ".join(problems)
            + ". Pass overwrite=True (--overwrite) to rebuild it."
        )
    return {**old, "corpus": new["corpus"]}


def _keep_unchanged_shards(out: Path, manifest: dict[str, Any], wanted: dict[str, str]) -> set[str]:
    """Keep in ``manifest`` every finished shard that is in ``wanted`` with the same hash; drop the rest
    from the manifest and from disk.

    ``wanted`` maps shard name -> hash of the documents the corpus now puts in that shard. Finished
    shards are the manifest's and those whose folder has a record but that the manifest does not list
    yet (written by a process of a run that stopped before its manifest was). Returns the names of
    the shards kept. The manifest is written before any folder is removed, so it never lists a shard
    that is gone.
    """
    finished = manifest["shards"] + _unlisted_shards(out, manifest)
    kept = [s for s in finished if s.get("sha256") is not None and wanted.get(s["name"]) == s["sha256"]]
    changed = sorted(s["name"] for s in finished if s not in kept)
    if changed:
        logger.info(
            "%d finished shards of %s hold documents that changed since (first: %s); encoding them again",
            len(changed),
            out,
            changed[0],
        )
    if changed or len(kept) != len(wanted):
        manifest["complete"] = False
    manifest["shards"] = sorted(kept, key=lambda s: s["name"])
    manifest["counts"] = _counts(kept)
    _write_manifest(out, manifest)
    names = {s["name"] for s in kept}
    for path in out.glob("shard-*"):
        if path.name not in names:
            logger.info("removing %s shard %s", "changed" if path.name in changed else "unfinished", path)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return names


def _unlisted_shards(out: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of the finished shard folders of ``out`` that ``manifest`` does not list."""
    listed = {s["name"] for s in manifest["shards"]}
    found = []
    for path in sorted(out.glob("shard-*")):
        if path.name in listed or path.suffix == ".tmp" or not (path / SHARD_RECORD).is_file():
            continue
        with contextlib.suppress(ValueError):  # unreadable: treated as unfinished, hence removed
            record = json.loads((path / SHARD_RECORD).read_text())
            if isinstance(record, dict) and record.get("name") == path.name:
                found.append(record)
    return found


def _write_shard(
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
        show_progress_bar=show_progress_bar and len(docs) > options.batch_size,  # progress within the shard
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


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)


def read_manifest(index_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; is {index_dir} an index folder made by `m3embed encode`?"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {manifest.get('format_version')}, expected {FORMAT_VERSION}"
        )
    return manifest


def index_summary(index_dir: str | os.PathLike) -> str:
    """One line about an index folder and the run that last wrote it (documents, shards, size, time).

    E.g. ``runs/index: 40 documents (12 encoded, 28 reused) in 3 shards, 1.2 MiB, 3.4 s; 2 documents
    had no text; encoded from their title``; after several processes ``(40 encoded by 2 processes:
    20 + 20)``.
    """
    path = Path(index_dir)
    manifest = read_manifest(path)
    counts, run = manifest["counts"], manifest.get("last_run", {})
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    line = f"{path}: {counts['documents']} documents"
    by_rank = run.get("encoded_by_rank")
    if by_rank:
        reused = f", {run['reused']} reused" if run.get("reused") else ""
        line += f" ({run['encoded']} encoded by {len(by_rank)} processes: {' + '.join(map(str, by_rank))}{reused})"
    elif run.get("reused"):
        line += f" ({run['encoded']} encoded, {run['reused']} reused)"
    n_shards = len(manifest["shards"])
    line += f" in {n_shards} shard{'s' if n_shards > 1 else ''}, {_human_bytes(size)}"
    if "seconds" in run:
        line += f", {run['seconds']:.1f} s"
    if counts.get("title_only"):
        n = counts["title_only"]
        line += f"; {n} document{'s' if n > 1 else ''} had no text; encoded from {'their' if n > 1 else 'its'} title"
    return line


@contextlib.contextmanager
def index_folder(
    index_dir: str | os.PathLike | None, prefix: str, ranks: DistInfo = ONE_PROCESS
) -> Iterator[Path]:
    """``index_dir``, or else a temporary folder deleted at the end of the ``with`` block.

    In a process group the temporary folder is rank 0's and every rank gets its path: on one machine
    they share it; ranks on other machines need an ``index_dir`` they all reach (encoding says so).
    """
    if index_dir is not None:
        yield Path(index_dir)
        return
    with contextlib.ExitStack() as stack:
        tmp = on_main(lambda: stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)), ranks)
        yield Path(tmp) / "index"


def _human_bytes(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB")
    k = 0
    while n >= 1024 and k < len(units) - 1:
        n, k = n / 1024, k + 1
    return f"{n:.0f} B" if k == 0 else f"{n:.1f} {units[k]}"


# ---------------------------------------------------------------------- reading
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

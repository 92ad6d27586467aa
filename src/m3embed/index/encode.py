"""``encode_corpus``: a corpus into an index folder, its shards dealt out to the processes of a job;
and :func:`index_folder`, the folder it writes to."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from m3embed.beir import Document, read_corpus
from m3embed.distributed import ONE_PROCESS, DistInfo, gather_objects, on_main, raise_if_any
from m3embed.index.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    SHARD_RECORD,
    add_shards,
    last_run,
    model_fingerprint,
    model_name,
    vocab_size,
    write_manifest,
)
from m3embed.index.options import IndexOptions
from m3embed.index.resume import keep_unchanged_shards, prepare_folder
from m3embed.index.shards import CorpusScan, scan_corpus, write_shard
from m3embed.model import M3Model

logger = logging.getLogger(__package__)  # "m3embed.index", the one logger of the index modules


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
    """Rank 0 readies the folder (:func:`prepare_folder`, :func:`keep_unchanged_shards`); every rank
    gets the manifest to continue and the names of the shards kept.

    In a process group every rank then checks that it sees the manifest rank 0 wrote (the same
    folder) and that its model and corpus are rank 0's, so no rank writes shards another cannot use.
    """

    def prepare() -> tuple[dict[str, Any], set[str], dict[str, str]]:
        manifest = prepare_folder(out, new, resume, overwrite)
        return manifest, keep_unchanged_shards(out, manifest, shards), shards

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
        add_shards(manifest, records)
    n_shards = -(-manifest["corpus"]["documents"] // manifest["options"]["shard_size"])
    assert len(manifest["shards"]) == n_shards, (len(manifest["shards"]), n_shards)
    manifest["complete"] = True
    manifest["last_run"] = last_run([sum(r["documents"] for r in rs) for rs in per_rank], reused, started)
    write_manifest(out, manifest)
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
            write_shard(model, chunk, out / name, digest, options, manifest["vocab_size"], show_progress_bar)
        )
        if not ranks.enabled:
            add_shards(manifest, records[-1:])
            write_manifest(out, manifest)
        bar.update(len(chunk))
    bar.close()
    return records


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

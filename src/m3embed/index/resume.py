"""What a new run does with what is already in its index folder: empty it, refuse it, or keep the
finished shards whose documents did not change."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from m3embed.index.manifest import MANIFEST, SHARD_RECORD, counts, read_manifest, write_manifest

logger = logging.getLogger(__package__)  # "m3embed.index", the one logger of the index modules


def prepare_folder(out: Path, manifest: dict[str, Any], resume: bool, overwrite: bool) -> dict[str, Any]:
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


def _check_resumable(out: Path, new: dict[str, Any]) -> dict[str, Any]:
    """The existing manifest (with the new corpus facts), if this run may reuse its shards; else an error.

    The corpus must be the same file; its content may have changed (a fixed line): which shards are
    still valid is decided per shard by :func:`keep_unchanged_shards`.
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


def keep_unchanged_shards(out: Path, manifest: dict[str, Any], wanted: dict[str, str]) -> set[str]:
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
    manifest["counts"] = counts(kept)
    write_manifest(out, manifest)
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

"""An index folder's ``manifest.json``: the model it records (name, fingerprint), reading and writing
it, the shard records it lists, and the one-line summary of the run that last wrote it."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from m3embed.model import M3Model

MANIFEST = "manifest.json"
SHARD_RECORD = "shard.json"  # in every finished shard folder: its entry of the manifest's "shards"
FORMAT_VERSION = 1


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
    """The folder the model was loaded from, as an absolute path, or the Hub name it was loaded by
    (empty for models built in memory).

    Absolute because the index records it: ``m3embed search`` run from another folder than
    ``m3embed encode`` must still find the model (a path as typed, ``runs/x/checkpoint-18``, would be
    looked for relative to wherever search runs).
    """
    name = str(getattr(model.backbone.config, "_name_or_path", "") or "")
    folder = Path(name).expanduser()
    return str(folder.resolve()) if name and folder.is_dir() else name


def vocab_size(model: M3Model) -> int:
    """Number of sparse matrix columns: every token id the tokenizer or the embeddings can produce."""
    return max(len(model.tokenizer), int(getattr(model.backbone.config, "vocab_size", 0) or 0))


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


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)


def add_shards(manifest: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Record finished shards in ``manifest`` (a shard recorded again replaces its old record)."""
    by_name = {s["name"]: s for s in [*manifest["shards"], *records]}
    manifest["shards"] = [by_name[name] for name in sorted(by_name)]
    manifest["counts"] = counts(manifest["shards"])


def counts(shards: list[dict[str, Any]]) -> dict[str, int]:
    return {key: sum(s.get(key, 0) for s in shards) for key in ("documents", "colbert_vectors", "title_only")}


def last_run(encoded_by_rank: list[int], reused: int, started: float) -> dict[str, Any]:
    seconds = round(time.perf_counter() - started, 2)
    run = {"encoded": sum(encoded_by_rank), "reused": reused, "seconds": seconds}
    if len(encoded_by_rank) > 1:
        run["encoded_by_rank"] = encoded_by_rank
    return run


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


def _human_bytes(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB")
    k = 0
    while n >= 1024 and k < len(units) - 1:
        n, k = n / 1024, k + 1
    return f"{n:.0f} B" if k == 0 else f"{n:.1f} {units[k]}"

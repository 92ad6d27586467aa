"""A JSONL training file (gzip if it ends in .gz) handled in fixed chunks of lines, for jobs that
rewrite it resumably: each chunk is written to its own part file, a rerun keeps the parts whose names
(hashes) still match, and the parts are joined into the output through a temporary file."""

from __future__ import annotations

import gzip
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from m3embed.data.line import BOM, parse_line, where

logger = logging.getLogger(__name__)


def read_raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, bytes)`` of a file (gzip if it ends in .gz), 1-based, newline kept; a UTF-8
    byte-order mark dropped."""
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            yield lineno, raw[len(BOM) :] if lineno == 1 and raw.startswith(BOM) else raw


def line_chunks(path: Path, size: int) -> Iterator[tuple[int, list[tuple[int, bytes]]]]:
    """``(k, lines)`` for chunk k = lines ``[k·size, (k+1)·size)`` of the file."""
    chunk: list[tuple[int, bytes]] = []
    for lineno, raw in read_raw_lines(path):
        chunk.append((lineno, raw))
        if len(chunk) == size:
            yield (lineno - 1) // size, chunk
            chunk = []
    if chunk:
        yield (chunk[0][0] - 1) // size, chunk


def check_line(raw: bytes, path: Path, lineno: int) -> dict[str, Any] | None:
    """The line's example (None for a blank line); ValueError naming file, line and field if bad."""
    if not raw.strip():
        return None
    example, problem = parse_line(raw.rstrip(b"\r\n"))
    if problem is not None:
        field_name, message = problem
        raise ValueError(f"{where(path, lineno, field_name)}: {message}")
    return example


def prepare_parts(parts: Path, names: list[str]) -> set[str]:
    """The finished parts of this file that are still valid; every other file in ``parts`` removed."""
    parts.mkdir(parents=True, exist_ok=True)
    kept = set()
    for path in parts.iterdir():
        if path.name in names:
            kept.add(path.name)
        else:
            logger.info("removing %s (unfinished, or its lines or teacher changed)", path)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if kept:
        logger.info("reusing %d finished chunks of %s", len(kept), parts)
    return kept


def join_parts(parts: Path, names: list[str], output: Path) -> None:
    """Concatenate the parts into ``output`` (through a temporary file renamed; gzip if it ends in .gz),
    then remove them."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    try:
        gz = output.suffix == ".gz"  # mtime 0: the same lines give the same bytes
        with gzip.GzipFile(partial, "wb", mtime=0) if gz else open(partial, "wb") as out:
            for name in names:
                with open(parts / name, "rb") as part:
                    shutil.copyfileobj(part, out)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    shutil.rmtree(parts)

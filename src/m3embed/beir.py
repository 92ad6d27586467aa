"""Readers for BEIR folders and plain corpora: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``.

Every reader names the file, the line number and the field when a line is wrong, and never skips a
line silently. Files ending in ``.gz`` are read transparently.

Corpus formats (chosen by the file name):
- ``*.jsonl`` / ``*.json`` (optionally ``.gz``): one object a line with ``_id`` (BEIR; ``id`` also
  accepted) and ``text``, optional ``title``; the document text is ``"{title} {text}"`` when a title
  is present, and the title alone when ``text`` is empty (the usual BEIR convention);
- anything else: plain text, one document a line, the id is the 1-based line number (blank lines are
  skipped, they are not documents).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


@dataclass(frozen=True)
class Document:
    """One corpus entry: its id and the text the model encodes (title and body joined)."""

    id: str
    text: str
    title_only: bool = False  # the line's text was empty: ``text`` is its title (counted in summaries)


@dataclass(frozen=True)
class Query:
    """One query: id, text and language (``None`` when the file has no ``lang`` field)."""

    id: str
    text: str
    lang: str | None = None


def open_text(path: str | os.PathLike) -> IO[str]:
    """Open a text file for reading (``.gz`` decompressed), with a clear error if it is missing.

    Prefer :func:`read_lines`, which names the line and byte of a non-UTF-8 byte.
    """
    if Path(path).suffix == ".gz":
        return io.TextIOWrapper(_open_bytes(path), encoding="utf-8")
    return open(_existing(path), encoding="utf-8")


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        what = "a directory, not a file" if path.is_dir() else "not found"
        raise FileNotFoundError(f"{path}: {what}")
    return path


def _open_bytes(path: str | os.PathLike) -> IO[bytes]:
    path = _existing(path)
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # type: ignore[return-value]


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Stream ``(line number, line)`` of a UTF-8 text file (``.gz`` decompressed), 1-based.

    Lines keep their ``"\n"`` (``"\r\n"`` becomes ``"\n"``). A byte sequence that is not UTF-8 is a
    ``ValueError`` naming the file, the line and the byte offset in the (decompressed) file, instead of
    a bare codec error from somewhere in the file.
    """
    path = Path(path)
    offset = 0
    with _open_bytes(path) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}, line {lineno}, byte offset {offset + err.start}: not UTF-8 "
                    f"(byte 0x{raw[err.start]:02x}); convert the file to UTF-8, e.g. with iconv"
                ) from None
            offset += len(raw)
            yield lineno, line[:-2] + "\n" if line.endswith("\r\n") else line


def _is_jsonl(path: Path) -> bool:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return bool(suffixes) and suffixes[-1] in (".jsonl", ".json")


def parse_json_line(line: str, path: Path, lineno: int) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _string_field(
    obj: dict[str, Any], names: tuple[str, ...], path: Path, lineno: int, hint: str = ""
) -> str:
    """The first present field of ``names`` as a non-empty string (ids may be numbers in some corpora)."""
    for name in names:
        if name in obj:
            value = obj[name]
            if isinstance(value, int | float) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"{path}, line {lineno}: field {name!r} must be a non-empty string, got {value!r:.60}"
                    + hint
                )
            return value
    alternatives = " or ".join(repr(n) for n in names)
    raise ValueError(f"{path}, line {lineno}: missing field {alternatives} (keys present: {sorted(obj)})")


def read_corpus(path: str | os.PathLike) -> Iterator[Document]:
    """Stream the documents of a corpus file in file order (constant memory).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming file, line and field for
    a line without an id or a text (an empty text is allowed when the line has a title: the title is
    encoded), with a duplicate id, or with bytes that are not UTF-8.
    """
    path = Path(path)
    seen: set[str] = set()
    if not _is_jsonl(path):
        for lineno, line in read_lines(path):
            text = line.rstrip("\n")
            if text.strip():
                yield Document(str(lineno), text)
        return
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        obj = parse_json_line(line, path, lineno)
        doc_id = _string_field(obj, ("_id", "id"), path, lineno)
        title = obj.get("title") or ""
        if not isinstance(title, str):
            raise ValueError(f"{path}, line {lineno}: field 'title' must be a string, got {title!r:.60}")
        text = obj.get("text")
        title_only = isinstance(text, str) and not text.strip() and bool(title.strip())
        if not title_only:
            text = _string_field(obj, ("text",), path, lineno, hint=" and there is no 'title' to use instead")
        if doc_id in seen:
            raise ValueError(f"{path}, line {lineno}: duplicate document id {doc_id!r}")
        seen.add(doc_id)
        if title_only:
            yield Document(doc_id, title.strip(), title_only=True)
        else:
            yield Document(doc_id, f"{title.strip()} {text}" if title.strip() else text)


def read_queries(path: str | os.PathLike) -> dict[str, Query]:
    """Read a BEIR ``queries.jsonl`` (``_id``, ``text``, optional ``lang``) or a TSV ``id<TAB>text`` file.

    Duplicate query ids are an error naming both lines.
    """
    path = Path(path)
    queries: dict[str, Query] = {}
    first_line: dict[str, int] = {}
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        if _is_jsonl(path):
            obj = parse_json_line(line, path, lineno)
            qid = _string_field(obj, ("_id", "id"), path, lineno)
            text = _string_field(obj, ("text",), path, lineno)
            lang = obj.get("lang")
            lang = str(lang) if lang is not None else None
        else:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
                raise ValueError(
                    f"{path}, line {lineno}: expected 'query_id<TAB>text', got {line.strip()!r:.60}"
                )
            qid, text, lang = parts[0], parts[1], (parts[2] if len(parts) > 2 else None)
        if qid in queries:
            raise ValueError(
                f"{path}, line {lineno}: duplicate query id {qid!r} (first seen on line {first_line[qid]})"
            )
        queries[qid] = Query(qid, text, lang)
        first_line[qid] = lineno
    return queries


def read_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Read a BEIR qrels TSV (``query-id  corpus-id  score``, header optional) or a TREC qrels file.

    Returns ``{query_id: {doc_id: relevance}}``.
    """
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    for lineno, line in read_lines(path):
        row = next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE), [])
        if not row or not "".join(row).strip():
            continue
        if len(row) == 1:  # TREC qrels: "qid 0 docid rel" separated by spaces
            row = row[0].split()
            row = [row[0], row[2], row[3]] if len(row) == 4 else row
        if len(row) == 4:
            row = [row[0], row[2], row[3]]
        if len(row) != 3:
            raise ValueError(f"{path}, line {lineno}: expected 'query-id<TAB>corpus-id<TAB>score', got {row}")
        try:
            score = int(float(row[2]))
        except ValueError:
            if lineno == 1:  # the BEIR header line
                continue
            raise ValueError(f"{path}, line {lineno}: score {row[2]!r} is not a number") from None
        qrels.setdefault(row[0], {})[row[1]] = score
    return qrels


@dataclass(frozen=True)
class BeirFolder:
    """Paths of a BEIR folder's files for one split."""

    corpus: Path
    queries: Path
    qrels: Path

    @classmethod
    def locate(cls, folder: str | os.PathLike, split: str = "test") -> BeirFolder:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: BEIR folder not found")

        def find(*candidates: str) -> Path:
            for name in candidates:
                if (folder / name).is_file():
                    return folder / name
            raise FileNotFoundError(f"{folder}: none of {', '.join(candidates)} exists")

        return cls(
            corpus=find("corpus.jsonl", "corpus.jsonl.gz"),
            queries=find("queries.jsonl", "queries.jsonl.gz"),
            qrels=find(f"qrels/{split}.tsv", f"qrels/{split}.tsv.gz"),
        )

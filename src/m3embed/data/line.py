"""One line of a training file (FlagEmbedding's JSON format): decoded and checked field by field."""

from __future__ import annotations

import json
from os import PathLike
from typing import Any

BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, dropped from a file's first line


def where(path: str | PathLike, lineno: int, field: str | None = None) -> str:
    """``"<path>, line N"`` plus ``", field 'name'"`` when a field is named: how errors locate a line."""
    return f"{path}, line {lineno}" + (f", field {field!r}" if field else "")


def parse_line(body: bytes) -> tuple[dict[str, Any] | None, tuple[str | None, str] | None]:
    """Decode and check one line; returns ``(example, None)`` or ``(None, (field, message))``."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, (
            None,
            f"not valid UTF-8 (byte {body[e.start]:#04x} at byte {e.start} of the line); "
            "re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`",
        )
    try:
        example = json.loads(text)
    except json.JSONDecodeError as e:
        return None, (
            None,
            f"malformed JSON ({e.msg} at column {e.colno}); each line must be one complete JSON object",
        )
    if not isinstance(example, dict):
        return None, (None, f"expected a JSON object, found {type(example).__name__}")
    query = example.get("query")
    if not isinstance(query, str) or not query.strip():
        found = "missing" if "query" not in example else f"{query!r:.60}"
        return None, ("query", f"expected a non-empty string, found {found}")
    pos = example.get("pos")
    if not isinstance(pos, list) or not pos:
        found = "missing" if "pos" not in example else f"{pos!r:.60}"
        return None, ("pos", f"expected a non-empty list of strings (the relevant passages), found {found}")
    problem = _check_texts("pos", pos)
    if problem:
        return None, problem
    neg = example.get("neg", [])
    if neg is None:
        neg = []
    if not isinstance(neg, list):
        return None, ("neg", f"expected a list of strings, found {type(neg).__name__} {neg!r:.60}")
    problem = _check_texts("neg", neg)
    if problem:
        return None, problem
    for key, texts in (("pos_scores", pos), ("neg_scores", neg)):
        scores = example.get(key)
        if scores is None:
            continue
        if not isinstance(scores, list) or any(
            isinstance(s, bool) or not isinstance(s, int | float) for s in scores
        ):
            return None, (key, f"expected a list of numbers, found {scores!r:.60}")
        if len(scores) != len(texts):
            return None, (
                key,
                f"has {len(scores)} scores but {key[:3]!r} has {len(texts)} passages; give one score per passage",
            )
    for key in ("prompt", "type"):
        if key in example and example[key] is not None and not isinstance(example[key], str):
            return None, (key, f"expected a string, found {type(example[key]).__name__} {example[key]!r:.60}")
    return example, None


def _check_texts(field: str, texts: list[Any]) -> tuple[str, str] | None:
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            return field, f"item {i} is {type(t).__name__} ({t!r:.40}), expected a string"
        if not t.strip():
            return field, f"item {i} is an empty string; every passage needs text"
    return None

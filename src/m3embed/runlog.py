"""The run log's format: ``train_log.jsonl``, one JSON object a line, written by training and read by
reporting (``m3embed.report``) and by a resumed run.

Entries are steps (``{"step": k, "loss": ..., ...}``), evaluations (``{"step": k, "eval_ndcg@10":
...}``), resume markers (``{"resumed_from": ..., "resumed_at_step": k}``) and a final ``summary``. The
file is only ever appended to; :func:`read_log` reads it as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

LOG_FILE = "train_log.jsonl"


def append_entry(path: str | os.PathLike, entry: Mapping[str, Any]) -> None:
    """One entry as one line at the end of the log."""
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of a ``train_log.jsonl`` as one uninterrupted run: at each resume marker, what the
    interrupted process logged after the resumed step (and any earlier summary) is left out. A last
    line without its newline (a running or killed process writing it) is left out too."""
    entries: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                if not line.endswith("\n"):
                    break
                raise ValueError(f"{path}, line {number}: not a JSON object ({err.msg})") from None
            if "resumed_at_step" in entry:
                at = entry["resumed_at_step"]
                entries = [e for e in entries if "summary" not in e and e.get("step", 0) <= at]
            entries.append(entry)
    return entries

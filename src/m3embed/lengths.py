"""The truncation lengths of ``m3embed encode | search | eval | mine``: one set per model.

A length the user gives as a flag wins; else the model's own, the ``query_max_length`` and
``passage_max_length`` it was trained with (``train_config.json``, which ``m3embed train`` writes into
every checkpoint); else the command's default. So a checkpoint is encoded, searched, evaluated and
mined with the lengths it learned, without a flag, and every command says which lengths it used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from m3embed.checkpoint import TRAIN_CONFIG

KEYS = ("query_max_length", "passage_max_length")  # the fields of train_config.json's "train" section
_TEXTS = {"query_max_length": "queries", "passage_max_length": "passages"}


def trained_lengths(model: str | os.PathLike) -> tuple[dict[str, int], Path | None]:
    """The lengths the model folder ``model`` was trained with, and the file they come from.

    ``({}, None)`` when there is no ``train_config.json`` (a model not written by ``m3embed train``, or
    a Hub name).
    """
    path = Path(model).expanduser() / TRAIN_CONFIG
    if not path.is_file():
        return {}, None
    try:
        train = json.loads(path.read_text()).get("train", {})
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{path}: not a train_config.json written by m3embed train ({err})") from None
    return {key: train[key] for key in KEYS if isinstance(train.get(key), int)}, path


def resolve_lengths(
    model: str | os.PathLike,
    given: Mapping[str, int | None],
    defaults: Mapping[str, int],
    flags: Mapping[str, str],
) -> tuple[dict[str, int], str]:
    """Each length named in ``defaults`` (keys of :data:`KEYS`): ``given`` (a flag's value, None when
    the flag was not given), else the model's :func:`trained_lengths`, else the default.

    Returns the lengths and one line that says them and where each came from, e.g.
    ``lengths: queries 24, passages 72 tokens (from runs/x/checkpoint-6/train_config.json)``.
    ``flags`` names the flag of each key, for that line.
    """
    trained, config = trained_lengths(model)
    lengths: dict[str, int] = {}
    sources: dict[str, str] = {}
    for key, default in defaults.items():
        if given.get(key) is not None:
            lengths[key], sources[key] = int(given[key]), flags[key]  # type: ignore[arg-type]
        elif key in trained:
            lengths[key], sources[key] = trained[key], f"from {config}"
        else:
            no_config = "" if config else f"; {model} has no {TRAIN_CONFIG}"
            lengths[key], sources[key] = default, f"default{no_config}"
    return lengths, describe(lengths, sources)


def describe(lengths: Mapping[str, int], sources: Mapping[str, str]) -> str:
    """``lengths: queries 16 tokens (--query-max-length), passages 72 tokens (from ...)``: lengths of
    the same source share their parenthesis."""
    groups: list[tuple[str, list[str]]] = []
    for key, n in lengths.items():
        text = f"{_TEXTS[key]} {n}"
        if groups and groups[-1][0] == sources[key]:
            groups[-1][1].append(text)
        else:
            groups.append((sources[key], [text]))
    return "lengths: " + ", ".join(f"{', '.join(texts)} tokens ({source})" for source, texts in groups)

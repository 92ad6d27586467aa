"""The data layer's config and its error type."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

TRAIN_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")


class DataError(ValueError):
    """Training data that cannot be used as it is: says which file, line and field, and what to do.

    ``path``, ``line`` (1-based) and ``field`` repeat what the message names, for programs and tests;
    each is None where it does not apply (a whole-file problem has no line).
    """

    def __init__(
        self, message: str, *, path: str | None = None, line: int | None = None, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        self.field = field


@dataclass(frozen=True)
class DataConfig:
    """Where the training examples come from and how groups and batches are drawn from them.

    Tokenisation lengths (``query_max_length``, ``passage_max_length``) belong to the trainer's config.
    """

    # One path or several: a .jsonl / .jsonl.gz / .json file, or a folder of them (each file = one
    # dataset; a batch never mixes datasets). Normalised to a tuple of str.
    train_data: tuple[str, ...] | str = ()
    train_group_size: int = 8  # passages per query: 1 positive + (G-1) negatives (FlagEmbedding's default)
    query_instruction: str | None = None  # prefix for every query whose line has no "prompt" field
    skip_bad_lines: bool = False  # skip and count malformed lines instead of raising DataError
    seed: int = 42  # one seed for shuffling and group sampling; same seed + epoch -> same batches
    batch_size: int = 8  # queries per batch per rank (the global batch is batch_size * world size)
    # FlagEmbedding-style length grouping: {min_estimated_tokens: batch_size}. An example whose
    # longest passage is estimated at >= key tokens uses that key's batch size (the largest such
    # key); examples below every key use batch_size. None = one batch size for everything.
    length_buckets: Mapping[int, int] | None = None
    drop_last: bool = True  # drop each epoch's incomplete last batch of a dataset/bucket
    # Where the plain copy of a gzipped file goes (random access into gzip is not cheap);
    # None = the system's temporary folder. The copy is deleted with the dataset.
    tmp_dir: str | None = None

    def __post_init__(self) -> None:
        paths = self.train_data
        if isinstance(paths, str | Path):
            paths = (str(paths),)
        elif isinstance(paths, Sequence):
            paths = tuple(str(p) for p in paths)
        else:
            raise ValueError(
                f"DataConfig.train_data must be a path or a list of paths, got {type(paths).__name__} ({paths!r:.60})"
            )
        object.__setattr__(self, "train_data", paths)
        for p in paths:
            if not p:
                raise ValueError("DataConfig.train_data contains an empty path; give a file or folder path")
        _check_int("train_group_size", self.train_group_size, minimum=1)
        _check_int("batch_size", self.batch_size, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        if self.query_instruction is not None and not isinstance(self.query_instruction, str):
            raise ValueError(
                f"DataConfig.query_instruction must be a str or None, got {type(self.query_instruction).__name__} "
                f"({self.query_instruction!r:.60})"
            )
        for name in ("skip_bad_lines", "drop_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DataConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.length_buckets is not None:
            object.__setattr__(self, "length_buckets", normalize_length_buckets(self.length_buckets))
        if self.tmp_dir is not None and not isinstance(self.tmp_dir, str | Path):
            raise ValueError(f"DataConfig.tmp_dir must be a folder path or None, got {self.tmp_dir!r}")

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (JSON/YAML-ready) to save next to a checkpoint."""
        out = asdict(self)
        out["train_data"] = list(self.train_data)
        if self.length_buckets is not None:
            out["length_buckets"] = {int(k): int(v) for k, v in self.length_buckets.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo in a config file is not silent)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"DataConfig got unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**dict(data))


def normalize_length_buckets(buckets: Mapping[Any, Any]) -> dict[int, int]:
    """Check ``{min_tokens: batch_size}`` and return it with int keys sorted ascending.

    Keys may be strings of integers (JSON/YAML object keys are strings).
    """
    if not isinstance(buckets, Mapping) or not buckets:
        raise ValueError(
            f"length_buckets must be a non-empty mapping {{min_tokens: batch_size}}, e.g. {{0: 64, 128: 32}}, "
            f"got {buckets!r:.80}"
        )
    out: dict[int, int] = {}
    for key, value in buckets.items():
        try:
            k = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"length_buckets key {key!r} is not an integer token count") from None
        if k < 0 or isinstance(key, bool) or (isinstance(key, float) and not key.is_integer()):
            raise ValueError(f"length_buckets key {key!r} must be an integer >= 0")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"length_buckets[{key!r}] (a batch size) must be an integer >= 1, got {value!r}")
        out[k] = value
    return dict(sorted(out.items()))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"DataConfig.{name} must be an integer >= {minimum}, got {value!r}")

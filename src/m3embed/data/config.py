"""The data layer's config and its error type."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from m3embed.backbones import check_instruction_format
from m3embed.settings import AT_LEAST_1, NON_NEGATIVE, build, check_fields, setting

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

    train_data: tuple[str, ...] | str = setting(
        (),
        "training .jsonl/.jsonl.gz file(s) or folder(s) of them, FlagEmbedding format; each file is one "
        "dataset (a batch never mixes datasets)",
        metavar="PATH",
    )
    train_group_size: int = setting(
        8,
        "passages per query: 1 positive + G-1 negatives (FlagEmbedding's default)",
        flag="--group-size",
        metavar="G",
        bounds=AT_LEAST_1,
    )
    query_instruction: str | None = setting(
        None,
        "instruction for queries whose line has no 'prompt', in --query-instruction-format",
        flag=("--query-instruction", "--query-instruction-for-retrieval"),
        metavar="TEXT",
    )
    query_instruction_format: str | None = setting(
        None,
        "template of instruction (the line's 'prompt' or --query-instruction) and query, FlagEmbedding's "
        "query_instruction_format, e.g. $'Instruct: {}\\nQuery: {}'; unset = the model family's: that one "
        "for decoder-only LLMs, '{}{}' (a prefix) for encoders",
        metavar="FORMAT",
    )
    skip_bad_lines: bool = setting(
        False, "skip and count malformed lines instead of stopping with the line number"
    )
    seed: int = setting(
        42,
        "seed of batch shuffling and group sampling (same seed + epoch = same batches)",
        flag="--data-seed",
        bounds=NON_NEGATIVE,
    )
    batch_size: int = setting(
        8, "queries per step per process (global batch = B x processes)", metavar="B", bounds=AT_LEAST_1
    )
    length_buckets: Mapping[int, int] | None = setting(
        None,
        "FlagEmbedding-style length grouping, MIN_TOKENS=BATCH_SIZE pairs (e.g. 0=64 128=32): an example "
        "whose longest passage is estimated at >= MIN_TOKENS uses the batch size of the largest such "
        "MIN_TOKENS, shorter ones --batch-size; unset = one batch size for everything",
        metavar="MIN_TOKENS=BATCH_SIZE",
    )
    drop_last: bool = setting(True, "drop each epoch's incomplete last batch of a dataset/length bucket")
    tmp_dir: str | Path | None = setting(
        None,
        "folder for the plain copy of a gzipped training file (random access into gzip is not cheap), "
        "deleted with the dataset; unset = the system's temporary folder",
        metavar="DIR",
    )

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
        if self.length_buckets is not None:
            object.__setattr__(self, "length_buckets", normalize_length_buckets(self.length_buckets))
        check_fields(self)
        if self.query_instruction_format is not None:
            check_instruction_format(self.query_instruction_format, "DataConfig.query_instruction_format")

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
        return build(cls, data, "DataConfig.from_dict", "data")


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

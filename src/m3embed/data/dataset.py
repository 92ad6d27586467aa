"""TrainDataset: FlagEmbedding's training JSON lines, validated up front, read by index.

Storage choice (why it looks like this):

* Plain files are never loaded: validation streams each file once and keeps the byte offset of every
  valid line (a NumPy int64 array), and ``__getitem__`` seeks to the offset and parses that one line.
* Gzipped files cannot be seeked cheaply, so the validation pass streams the decompressed lines into
  a plain temporary copy (valid lines only) and indexes that copy. The copy lives in
  ``DataConfig.tmp_dir`` (default: the system's temporary folder) and is deleted when the dataset is
  garbage collected or the process exits. Holding the raw lines in memory was the alternative; the
  real training file is 141 MB uncompressed and every rank (and every data-loader worker after a
  spawn) would hold its own copy, while the temporary file is shared through the page cache.

Per line the dataset keeps about 20 bytes: the offset (8), an estimated passage length (4) and a
64-bit hash of each positive text (8 per positive), which the batch sampler uses to keep a positive
passage from appearing twice in one batch and to group by length, without re-reading the files.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import tempfile
import weakref
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from m3embed.data.config import TRAIN_SUFFIXES, DataConfig, DataError
from m3embed.data.line import BOM, parse_line, where

logger = logging.getLogger(__name__)

_MAX_REASONS_LOGGED = 3
_SKIP_HINT = "Fix the line, or set skip_bad_lines=True (CLI: --skip-bad-lines) to skip and count bad lines."


@dataclass
class _File:
    """One training file (= one dataset) as indexed by the validation pass."""

    name: str  # the dataset name batches carry (the file name; the full path when names collide)
    path: Path  # the file the user gave
    read_path: Path  # where lines are read from: ``path`` itself, or the plain copy of a .gz
    offsets: np.ndarray  # (n,) int64 byte offset of each valid line in read_path
    start: int  # global index of the file's first example
    skipped: int  # bad lines skipped (only with skip_bad_lines)


class TrainDataset:
    """Maps a global index to one raw training example; files are concatenated in order.

    Built from a :class:`DataConfig`; the constructor validates every line of every file (streaming)
    and raises :class:`DataError` naming file, line and field before training can start, or, with
    ``skip_bad_lines``, skips bad lines and reports their count (logged, and in :attr:`skipped`).

    ``dataset[i]`` is the line's JSON object with ``"neg"`` defaulted to ``[]`` and ``"dataset"``
    (the file's name) added; ``pos_scores``/``neg_scores``/``prompt``/``type`` are there when the line
    has them. Blank lines are ignored and are not counted as bad.
    """

    def __init__(self, config: DataConfig) -> None:
        if not config.train_data:
            raise DataError("DataConfig.train_data is empty; give a training .jsonl file or a folder of them")
        self.config = config
        paths = _list_files(config.train_data)
        names = _dataset_names(paths)
        self._files: list[_File] = []
        # array.array, not lists: 8 (or 4) bytes per line while indexing, not a Python int each.
        pos_hashes, pos_counts, lengths = array("q"), array("q"), array("i")
        start = 0
        for path, name in zip(paths, names):
            file = _index_file(path, name, start, config, pos_hashes, pos_counts, lengths)
            self._files.append(file)
            start += len(file.offsets)
            if file.read_path != file.path:
                # The temporary copy dies with the dataset (and at exit); forked workers never delete it.
                weakref.finalize(self, _remove_copy, str(file.read_path), os.getpid())
        self._starts = np.array([f.start for f in self._files] + [start], dtype=np.int64)
        self.pos_ptr = np.zeros(len(pos_counts) + 1, dtype=np.int64)  # CSR pointers into pos_hashes
        np.cumsum(np.frombuffer(pos_counts, dtype=np.int64), out=self.pos_ptr[1:])
        self.pos_hashes = np.frombuffer(pos_hashes, dtype=np.int64)  # (total positives,)
        self.lengths = np.frombuffer(lengths, dtype=np.int32)  # (N,) estimated tokens of the longest passage
        self._handles: dict[int, IO[bytes]] = {}
        self._pid = os.getpid()
        if self.num_skipped and len(self._files) > 1:  # each file's count was warned about as it was read
            logger.warning("skipped %d bad training lines in total: %s", self.num_skipped, self.skipped)
        logger.info(
            "training data: %d examples in %d file(s): %s",
            len(self),
            len(self._files),
            ", ".join(f"{f.name} ({len(f.offsets)})" for f in self._files),
        )

    # ------------------------------------------------------------------ sizes and layout
    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def names(self) -> list[str]:
        """Dataset (file) names in index order."""
        return [f.name for f in self._files]

    @property
    def file_ranges(self) -> list[tuple[int, int]]:
        """``(start, stop)`` global index range of each file, in the order of :attr:`names`."""
        return [(int(self._starts[i]), int(self._starts[i + 1])) for i in range(len(self._files))]

    @property
    def skipped(self) -> dict[str, int]:
        """Bad lines skipped per dataset name (all zero unless ``skip_bad_lines``)."""
        return {f.name: f.skipped for f in self._files}

    @property
    def num_skipped(self) -> int:
        """Total bad lines skipped."""
        return sum(f.skipped for f in self._files)

    def file_index(self, idx: int) -> int:
        """Which file (position in :attr:`names`) holds global example ``idx``."""
        return int(np.searchsorted(self._starts, self._check_index(idx), side="right")) - 1

    def positive_hashes(self, idx: int) -> np.ndarray:
        """64-bit hashes of example ``idx``'s positive texts (the same text always has the same hash)."""
        return self.pos_hashes[self.pos_ptr[idx] : self.pos_ptr[idx + 1]]

    # ------------------------------------------------------------------ random access
    def __getitem__(self, idx: int) -> dict[str, Any]:
        idx = self._check_index(idx)
        k = self.file_index(idx)
        file = self._files[k]
        raw = self._read_line(k, int(file.offsets[idx - file.start]))
        example = json.loads(raw)
        example.setdefault("neg", [])
        for key in ("pos_scores", "neg_scores"):
            if example.get(key) is None:
                example.pop(key, None)
        example["dataset"] = file.name
        return example

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def _check_index(self, idx: int) -> int:
        n = len(self)
        if isinstance(idx, bool) or not isinstance(idx, int | np.integer):
            raise TypeError(f"TrainDataset index must be an int, got {type(idx).__name__}")
        idx = int(idx)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"index {idx} out of range for a TrainDataset of {n} examples")
        return idx

    def _read_line(self, k: int, offset: int) -> bytes:
        if os.getpid() != self._pid:  # a forked data-loader worker must not share the parent's file offsets
            self._handles = {}
            self._pid = os.getpid()
        handle = self._handles.get(k)
        if handle is None:
            handle = self._handles[k] = open(self._files[k].read_path, "rb")  # noqa: SIM115 (kept open)
        handle.seek(offset)
        return handle.readline()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}  # file handles do not pickle; each process opens its own
        return state

    def close(self) -> None:
        """Close open file handles (they reopen on the next access)."""
        for handle in self._handles.values():
            handle.close()
        self._handles = {}

    def __repr__(self) -> str:
        return f"TrainDataset({len(self)} examples, files={self.names})"


# ---------------------------------------------------------------------- validation and indexing
def text_hash(text: str) -> int:
    """A process-independent 64-bit hash of a text (Python's ``hash`` is salted per process)."""
    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True
    )


def estimate_tokens(text: str) -> int:
    """A tokenizer-free length estimate: UTF-8 bytes / 4 (about right for English subwords and CJK)."""
    return (len(text.encode("utf-8")) + 3) // 4


def _list_files(paths: tuple[str, ...]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(c for c in p.iterdir() if c.is_file() and c.name.endswith(TRAIN_SUFFIXES))
            if not found:
                raise DataError(
                    f"training data folder {p} has no {'/'.join(TRAIN_SUFFIXES)} files; "
                    "put the JSON lines files directly in it (sub-folders are not searched)",
                    path=str(p),
                )
            files.extend(found)
        elif p.is_file():
            if not p.name.endswith(TRAIN_SUFFIXES):
                raise DataError(
                    f"training data file {p} does not end in {', '.join(TRAIN_SUFFIXES)}; "
                    "rename it (a .gz ending means gzip-compressed)",
                    path=str(p),
                )
            files.append(p)
        else:
            raise DataError(
                f"training data path {p} does not exist; give a .jsonl file or a folder", path=str(p)
            )
    return files


def _dataset_names(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    return [p.name if names.count(p.name) == 1 else str(p) for p in paths]


def _index_file(
    path: Path,
    name: str,
    start: int,
    config: DataConfig,
    pos_hashes: array,
    pos_counts: array,
    lengths: array,
) -> _File:
    """Stream one file: validate each line, record offsets, hashes and lengths of the valid ones.

    A gzip file is decompressed once into a temporary copy (of its valid lines), so examples can be
    read back by byte offset.
    """
    gz = path.name.endswith(".gz")
    copy: IO[bytes] | None = None
    if gz:
        copy = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed below, deleted by a finalizer)
            "wb", prefix="m3embed-", suffix=".jsonl", dir=config.tmp_dir, delete=False
        )
    read_path = Path(copy.name) if copy is not None else path
    offsets = array("q")
    skips = _Skips(path)
    no_neg = 0
    try:
        for offset, example in _valid_lines(path, config, copy, skips):
            offsets.append(offset)
            pos, neg = example["pos"], example.get("neg") or []
            no_neg += not neg
            pos_hashes.extend(text_hash(t) for t in pos)
            pos_counts.append(len(pos))
            lengths.append(max(estimate_tokens(t) for t in (*pos, *neg)))
    except BaseException:
        if copy is not None:
            copy.close()
            _remove_copy(str(read_path), os.getpid())
        raise
    if copy is not None:
        copy.close()
    skips.report()
    _check_indexed(path, len(offsets), skips.count, no_neg, config)
    return _File(name, path, read_path, np.frombuffer(offsets, dtype=np.int64), start, skips.count)


class _Skips:
    """Bad lines skipped under ``skip_bad_lines``: how many, and the first few reasons for the log."""

    def __init__(self, path: Path) -> None:
        self.path, self.count, self.lines, self.reasons = path, 0, 0, []

    def add(self, line_no: int, field: str | None, message: str) -> None:
        self.count += 1
        if len(self.reasons) < _MAX_REASONS_LOGGED:
            self.reasons.append(f"line {line_no}" + (f" ({field})" if field else "") + f": {message}")

    def report(self) -> None:
        if self.count:
            logger.warning(
                "%s: skipped %d bad line(s) of %d (skip_bad_lines=True); first: %s",
                self.path,
                self.count,
                self.lines,
                "; ".join(self.reasons),
            )


def _valid_lines(
    path: Path, config: DataConfig, copy: IO[bytes] | None, skips: _Skips
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(byte offset in the file read back later, example) of each valid line; a bad line raises a
    DataError naming file, line and field, or is counted in ``skips`` under ``skip_bad_lines``.

    Without ``copy`` the offsets are the file's own; with it (gzip) each valid line is written to the
    copy and the offset is the copy's.
    """
    position = 0  # byte offset of the current line in the file read back
    with gzip.open(path, "rb") if copy is not None else open(path, "rb") as f:
        for line_no, raw in enumerate(_lines(f, path), start=1):
            skips.lines = line_no
            body, size = raw, len(raw)
            if line_no == 1 and body.startswith(BOM):
                body = body[len(BOM) :]
                if copy is None:
                    position += len(BOM)
                    size -= len(BOM)
            if line_no == 1 and body.lstrip().startswith(b"["):
                raise DataError(
                    f"{path}, line 1: the file is a JSON array; m3embed reads JSON lines (one object a "
                    "line). Convert it, e.g. `jq -c '.[]' in.json > out.jsonl`",
                    path=str(path),
                    line=1,
                )
            example, problem = parse_line(body) if body.strip() else (None, None)
            if problem is not None:
                field, message = problem
                if not config.skip_bad_lines:
                    raise DataError(
                        f"{where(path, line_no, field)}: {message}. {_SKIP_HINT}",
                        path=str(path),
                        line=line_no,
                        field=field,
                    )
                skips.add(line_no, field, message)
            if example is None:  # a blank or a skipped line
                position += 0 if copy is not None else size
                continue
            if copy is not None:
                line = body if body.endswith(b"\n") else body + b"\n"
                copy.write(line)
                yield position, example
                position += len(line)
            else:
                yield position, example
                position += size


def _check_indexed(path: Path, valid: int, skipped: int, no_neg: int, config: DataConfig) -> None:
    """A file must leave at least one example, and lines without negatives need others to draw from."""
    if not valid:
        raise DataError(
            f"{path} has no valid training lines"
            + (f" ({skipped} bad lines skipped)" if skipped else "")
            + '; each line must be a JSON object like {"query": "...", "pos": ["..."], "neg": ["..."]}',
            path=str(path),
        )
    if no_neg and valid < 2 and config.train_group_size > 1:
        raise DataError(
            f"{path}: a line has no 'neg' passages and the file has no other example whose positives could "
            f"serve as negatives (train_group_size={config.train_group_size}); add negatives to the line, "
            "add more lines to the file, or set train_group_size=1",
            path=str(path),
            field="neg",
        )
    if no_neg:
        logger.info("%s: %d line(s) without 'neg' draw negatives from other lines' positives", path, no_neg)


def _lines(f: IO[bytes], path: Path) -> Iterator[bytes]:
    """Lines of a binary stream; a damaged gzip stream becomes a DataError naming the file."""
    line_no = 0
    try:
        for line_no, raw in enumerate(f, start=1):  # noqa: B007 (line_no used in the error)
            yield raw
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(
            f"{path}: cannot decompress after line {line_no} ({type(e).__name__}: {e}); "
            "the file is not gzip or is truncated: re-download or re-compress it",
            path=str(path),
            line=line_no + 1,
        ) from None


def _remove_copy(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # only the process that made the copy deletes it
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

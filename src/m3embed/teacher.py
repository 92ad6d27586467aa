"""Teacher scores for knowledge distillation: a training file written back with ``pos_scores`` and
``neg_scores`` (one float per passage), the scores FlagEmbedding's ``kd_loss_type`` losses learn from.

The teacher is an :class:`~m3embed.model.M3Model` (its ``compute_score`` in one mode or a weighted
fusion, the weights meaning what they mean in :mod:`m3embed.search`) or a sentence-transformers
``CrossEncoder`` (``predict`` on (query, passage) pairs); :func:`load_teacher` tells their folders apart.

:func:`score_training_file` is resumable the way :func:`m3embed.index.encode_corpus` is:

1. the whole file is read and checked first (the data layer's own line checks), so a bad line fails
   in seconds; each chunk of ``chunk_lines`` lines gets a hash of its bytes and of the teacher and
   options that score it;
2. each chunk is scored and written to ``<output>.parts/part-<k>-<hash>.jsonl`` through a temporary
   file renamed when complete. A rerun reuses every part whose name (hence input and teacher) is
   unchanged and removes the others; chunks are fixed line ranges, so a resumed run scores each chunk
   exactly as an uninterrupted run would (byte-identical output);
3. the parts are joined into a temporary file next to ``output``, renamed over it, and removed.

Under ``torchrun`` (``ranks``) the chunks left to do are dealt out in turn, each rank writes its own
parts, and rank 0 joins them when all are done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from m3embed.backbones import check_instruction_format
from m3embed.checkpoint import write_atomic
from m3embed.data.chunked import check_line, join_parts, line_chunks, prepare_parts, read_raw_lines
from m3embed.distributed import ONE_PROCESS, DistInfo, gather_objects, on_main
from m3embed.index import model_fingerprint
from m3embed.model import M3Model
from m3embed.scores import DEFAULT_WEIGHTS, check_modes, check_weights, encoded_pair_scores

logger = logging.getLogger(__name__)

DEFAULT_TEACHER_MODE = "colbert+sparse+dense"  # the fused score: BGE-M3's strongest single score
# Pairs encoded per call while scoring: enough for full batches after length sorting, few enough that
# one call's ColBERT vectors stay small whatever the chunk size.
PAIRS_PER_CALL_BATCHES = 4
PairScorer = Callable[[list[str], list[list[str]]], list[list[float]]]  # queries, passages -> scores


@dataclass(frozen=True)
class ScoreOptions:
    """How a teacher scores a training file. ``mode``, ``weights`` and the max lengths are the
    M3Model teacher's; a cross-encoder uses ``batch_size`` only (its max length is set at loading)."""

    mode: str = DEFAULT_TEACHER_MODE  # which of compute_score's scores becomes the teacher score
    weights: tuple[float, float, float] = field(default=DEFAULT_WEIGHTS)  # dense, sparse, colbert
    batch_size: int = 32  # texts (or pairs) per forward pass
    query_max_length: int = 512
    passage_max_length: int = 512
    chunk_lines: int = 1000  # lines per part file: the unit of resuming and of sharing out work
    overwrite_scores: bool = False  # rescore lines that already have pos_scores and neg_scores
    query_instruction_for_retrieval: str | None = None  # FlagEmbedding's: put before every query
    query_instruction_format: str | None = None  # "{instruction}{query}" template; None = the model family's

    def __post_init__(self) -> None:
        check_modes([self.mode], "ScoreOptions.mode")
        if self.query_instruction_format is not None:
            check_instruction_format(self.query_instruction_format, "ScoreOptions.query_instruction_format")
        weights = check_weights(self.weights, "ScoreOptions.weights")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"ScoreOptions.weights must be 3 non-negative numbers, not all 0, got {self.weights}"
            )
        object.__setattr__(self, "weights", weights)
        for name in ("batch_size", "query_max_length", "passage_max_length", "chunk_lines"):
            if getattr(self, name) < 1:
                raise ValueError(f"ScoreOptions.{name} must be >= 1, got {getattr(self, name)}")


# ---------------------------------------------------------------------- pair scores
def options_pair_scores(
    model: M3Model, options: Any, queries: Sequence[str], passages: Sequence[Sequence[str]]
) -> list[list[float]]:
    """:func:`m3_pair_scores` with the mode, weights, batch size, lengths and query instruction of
    ``options`` (a :class:`ScoreOptions` or :class:`~m3embed.mine.MineOptions`: both carry those
    fields). The queries are scored as the model reads them, instruction included, as a search does."""
    return m3_pair_scores(
        model,
        model.with_instruction(
            queries, options.query_instruction_for_retrieval, options.query_instruction_format
        ),
        passages,
        options.mode,
        options.weights,
        batch_size=options.batch_size,
        query_max_length=options.query_max_length,
        passage_max_length=options.passage_max_length,
    )


def m3_pair_scores(
    model: M3Model,
    queries: Sequence[str],
    passages: Sequence[Sequence[str]],
    mode: str,
    weights: Sequence[float],
    *,
    batch_size: int = 32,
    query_max_length: int = 512,
    passage_max_length: int = 512,
) -> list[list[float]]:
    """Query i against each of ``passages[i]``: ``M3Model.compute_score``'s ``mode`` score.

    Each distinct query and passage is encoded once (``compute_score`` encodes every pair's texts).
    Shapes: n queries, n lists of passages -> n lists of floats, one per passage.
    """
    pairs = [(q, p) for q, ps in zip(queries, passages, strict=True) for p in ps]
    if not pairs:
        return [[] for _ in queries]
    enc_q = _encode_unique(model, [q for q, _ in pairs], batch_size, query_max_length)
    enc_p = _encode_unique(model, [p for _, p in pairs], batch_size, passage_max_length)
    flat = encoded_pair_scores(enc_q, enc_p, weights)[mode]
    out, start = [], 0
    for ps in passages:
        out.append([float(s) for s in flat[start : start + len(ps)]])
        start += len(ps)
    return out


def _encode_unique(model: M3Model, texts: list[str], batch_size: int, max_length: int) -> dict[str, Any]:
    """``model.encode`` of ``texts`` with each distinct text encoded once, in ``texts``' order."""
    unique = list(dict.fromkeys(texts))
    where = {t: i for i, t in enumerate(unique)}
    rows = [where[t] for t in texts]
    out = model.encode(
        unique,
        batch_size=batch_size,
        max_length=max_length,
        return_dense=True,
        return_sparse=model.sparse_linear is not None,
        return_colbert_vecs=model.colbert_linear is not None,
        show_progress_bar=False,
    )
    return {
        "dense_vecs": out["dense_vecs"][rows],
        "lexical_weights": None
        if out["lexical_weights"] is None
        else [out["lexical_weights"][r] for r in rows],
        "colbert_vecs": None if out["colbert_vecs"] is None else [out["colbert_vecs"][r] for r in rows],
    }


def teacher_scorer(teacher: Any, options: ScoreOptions) -> tuple[PairScorer, str]:
    """The pair-scoring function of ``teacher`` and a hash of what determines its scores."""
    if isinstance(teacher, M3Model):
        key = json.dumps({"m3": model_fingerprint(teacher), **asdict(options)}, sort_keys=True)

        def score_m3(queries: list[str], passages: list[list[str]]) -> list[list[float]]:
            return options_pair_scores(teacher, options, queries, passages)

        return score_m3, _sha(key)
    if _is_cross_encoder(teacher):
        if options.query_instruction_for_retrieval is not None:
            raise ValueError(
                "a query instruction (--query-instruction) is for an embedding-model teacher; a "
                "CrossEncoder scores the (query, passage) pairs as they are"
            )
        settings = {"max_length": teacher.max_length, "batch_size": options.batch_size}
        key = json.dumps({"cross_encoder": _weights_fingerprint(teacher.model), **settings}, sort_keys=True)

        def score_ce(queries: list[str], passages: list[list[str]]) -> list[list[float]]:
            pairs = [(q, p) for q, ps in zip(queries, passages, strict=True) for p in ps]
            flat = (
                teacher.predict(pairs, batch_size=options.batch_size, show_progress_bar=False)
                if pairs
                else []
            )
            flat = np.asarray(flat, dtype=np.float64).reshape(-1).tolist()
            out, start = [], 0
            for ps in passages:
                out.append(flat[start : start + len(ps)])
                start += len(ps)
            return out

        return score_ce, _sha(key)
    raise TypeError(
        f"teacher must be an M3Model or a sentence-transformers CrossEncoder, got {type(teacher).__name__}"
    )


def _is_cross_encoder(obj: Any) -> bool:
    try:
        from sentence_transformers import CrossEncoder
    except ImportError:
        return False
    return isinstance(obj, CrossEncoder)


def _weights_fingerprint(module: Any) -> str:
    """A short hash of a torch module's config and a sample of each weight (as model_fingerprint does)."""
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    h.update((config.to_json_string() if hasattr(config, "to_json_string") else "").encode())
    for name, param in sorted(module.state_dict().items()):
        flat = param.detach().reshape(-1)
        h.update(name.encode() + str(tuple(param.shape)).encode())
        h.update(
            np.concatenate([flat[:256].float().cpu().numpy(), flat[-256:].float().cpu().numpy()]).tobytes()
        )
    return h.hexdigest()[:16]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------- loading
def is_cross_encoder_folder(folder: str | os.PathLike) -> bool:
    """True for a cross-encoder folder: ``config.json`` whose architectures end with
    ``ForSequenceClassification``, or which carries sentence-transformers' CrossEncoder settings."""
    config = _read_config(Path(folder))
    if config is None:
        return False
    archs = config.get("architectures") or []
    return "sentence_transformers" in config or any(
        str(a).endswith("ForSequenceClassification") for a in archs
    )


def _read_config(folder: Path) -> dict[str, Any] | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def load_teacher(
    path: str | os.PathLike,
    *,
    device: str | None = None,
    max_length: int | None = None,
    pooling: str | None = None,
) -> Any:
    """An :class:`M3Model` or a sentence-transformers ``CrossEncoder``, by what the folder holds.

    A cross-encoder folder (:func:`is_cross_encoder_folder`) loads as a ``CrossEncoder`` (``max_length``
    caps its pair length); any other model folder (``config.json``: an encoder, BGE-M3 layout or not)
    as an M3Model, with ``pooling`` over its saved pooling when given. A folder that is neither is a one-line ``ValueError``.
    """
    folder = Path(path).expanduser()
    if folder.is_dir() and is_cross_encoder_folder(folder):
        try:
            from sentence_transformers import CrossEncoder
        except ImportError:
            raise ValueError(
                f"{folder} is a cross-encoder folder; loading it needs sentence-transformers "
                "(pip install sentence-transformers)"
            ) from None
        return CrossEncoder(str(folder), device=device, max_length=max_length)
    if folder.is_dir() and _read_config(folder) is None:
        raise ValueError(
            f"{folder}: not a teacher folder; expected a cross-encoder (config.json with a "
            "*ForSequenceClassification architecture) or an encoder in BGE-M3 layout (config.json, "
            "tokenizer and weights, optionally colbert_linear.pt and sparse_linear.pt)"
        )
    return M3Model.from_pretrained(path, device=device, **({"pooling": pooling} if pooling else {}))


# ---------------------------------------------------------------------- the training file
def score_training_file(
    teacher: Any,
    train_path: str | os.PathLike,
    output: str | os.PathLike,
    options: ScoreOptions | None = None,
    *,
    show_progress_bar: bool = False,
    ranks: DistInfo = ONE_PROCESS,
    on_chunk: Callable[[int], object] | None = None,
) -> dict[str, int]:
    """Write ``output``: ``train_path`` line for line, with ``pos_scores`` and ``neg_scores`` added.

    Lines that already have both keep them (byte for byte) unless ``options.overwrite_scores``; blank
    lines stay. A bad line (the training data's own checks, including score counts that do not match
    ``pos``/``neg``) is a ``ValueError`` naming file, line and field, raised before anything is scored.
    ``on_chunk(k)`` is called after chunk ``k``'s part is written (progress, tests). Returns counts:
    ``{"lines", "scored", "kept", "chunks", "reused_chunks"}``.
    """
    options = options or ScoreOptions()
    train_path, output = Path(train_path), Path(output)
    if output.resolve() == train_path.resolve():
        raise ValueError(f"{output}: output would overwrite the training file; choose another path")
    scorer, key = teacher_scorer(teacher, options)
    # 1. Check every line and hash each chunk (with what scores it).
    digests, counts = _scan(train_path, options.chunk_lines, key, options.overwrite_scores)
    if not counts["lines"]:
        raise ValueError(f"{train_path}: the training file has no lines")
    parts = output.with_name(output.name + ".parts")
    names = [f"part-{k:05d}-{digest[:16]}.jsonl" for k, digest in enumerate(digests)]
    done = on_main(lambda: prepare_parts(parts, names), ranks)
    todo = [k for k, name in enumerate(names) if name not in done][ranks.rank :: ranks.world_size]
    # 2. Score this rank's chunks, each into its part file.
    physical = counts.pop("physical")
    reused = sum(
        min(options.chunk_lines, physical - k * options.chunk_lines) for k, n in enumerate(names) if n in done
    )
    show = show_progress_bar and ranks.is_main
    with tqdm(total=physical, initial=reused, desc="Teacher scores", unit="line", disable=not show) as bar:
        for k, lines in line_chunks(train_path, options.chunk_lines):
            if k in todo:
                write_atomic(parts / names[k], _score_chunk(lines, train_path, scorer, options))
                bar.update(len(lines))
                if on_chunk is not None:
                    on_chunk(k)
    gather_objects(None, ranks)  # waits for every rank's last part
    # 3. Join the parts into the output.
    on_main(lambda: join_parts(parts, names, output), ranks)
    counts.update(chunks=len(names), reused_chunks=len(done))
    logger.info(
        "teacher scores: %d lines (%d scored, %d kept with their scores; %d of %d chunks reused) -> %s",
        counts["lines"], counts["scored"], counts["kept"], len(done), len(names), output,
    )  # fmt: skip
    return counts


def _needs_scores(example: dict[str, Any], overwrite: bool) -> bool:
    return overwrite or example.get("pos_scores") is None or example.get("neg_scores") is None


def _scan(path: Path, chunk_lines: int, key: str, overwrite: bool) -> tuple[list[str], dict[str, int]]:
    """Every line checked; the hash of each chunk's bytes and of ``key``; line counts."""
    digests: list[str] = []
    counts = {"lines": 0, "scored": 0, "kept": 0, "physical": 0}
    h = hashlib.sha256()
    for lineno, raw in read_raw_lines(path):
        if (lineno - 1) % chunk_lines == 0:
            if lineno > 1:
                digests.append(h.hexdigest())
            h = hashlib.sha256(key.encode())
        h.update(raw)
        counts["physical"] = lineno
        example = check_line(raw, path, lineno)
        if example is not None:
            counts["lines"] += 1
            counts["scored" if _needs_scores(example, overwrite) else "kept"] += 1
    if counts["physical"]:
        digests.append(h.hexdigest())
    return digests, counts


def _score_chunk(
    lines: list[tuple[int, bytes]], path: Path, scorer: PairScorer, options: ScoreOptions
) -> bytes:
    """The output bytes of one chunk: lines to score rewritten with their scores, the others as they were."""
    examples = [check_line(raw, path, lineno) for lineno, raw in lines]
    todo = [
        i for i, ex in enumerate(examples) if ex is not None and _needs_scores(ex, options.overwrite_scores)
    ]
    scores: dict[int, list[float]] = {}
    per_call = PAIRS_PER_CALL_BATCHES * options.batch_size
    group: list[int] = []
    for n, i in enumerate(todo, start=1):
        group.append(i)
        if n == len(todo) or sum(len(_passages(examples[j])) for j in group) >= per_call:
            found = scorer([examples[j]["query"] for j in group], [_passages(examples[j]) for j in group])
            scores.update(zip(group, found))
            group = []
    out = []
    for i, ((_, raw), example) in enumerate(zip(lines, examples)):
        if i not in scores:
            out.append(raw.rstrip(b"\r\n") + b"\n")
            continue
        n_pos = len(example["pos"])
        new = {**example, "pos_scores": scores[i][:n_pos], "neg_scores": scores[i][n_pos:]}
        out.append((json.dumps(new, ensure_ascii=False) + "\n").encode("utf-8"))
    return b"".join(out)


def _passages(example: dict[str, Any]) -> list[str]:
    return list(example["pos"]) + list(example.get("neg") or [])

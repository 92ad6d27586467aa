"""Groups and batches: from example indices to the texts (and teacher scores) of one training step.

No tokenisation here: the training step tokenises ``TrainBatch`` texts with the model's tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from m3embed.backbones import PREFIX_INSTRUCTION_FORMAT, format_query
from m3embed.data.dataset import TrainDataset, text_hash

logger = logging.getLogger(__name__)

_warned_mixed_scores: set[str] = set()
# The raw teacher score of a hard label's negatives: after the softmax their probability is 0 (in fp32).
HARD_LABEL_SCORE = -1.0e4


@dataclass
class TrainBatch:
    """The texts of one step. ``B = len(queries)`` queries, ``B*G`` passages.

    Shapes: passages laid out ``[q0: pos, neg1..neg(G-1), q1: pos, ...]`` so the target of query
    ``i`` is passage ``i*G``; ``teacher_scores`` is (B, G) float32 aligned with that layout, or None
    when any example of the batch lacks ``pos_scores``/``neg_scores``.
    """

    queries: list[str]
    passages: list[str]
    group_size: int
    teacher_scores: torch.Tensor | None
    dataset: str  # name of the file every example came from
    indices: list[int] = field(default_factory=list)  # dataset indices, for logging and debugging

    def __post_init__(self) -> None:
        assert len(self.passages) == len(self.queries) * self.group_size, "passages must be B*G"
        if self.teacher_scores is not None:
            assert tuple(self.teacher_scores.shape) == (len(self.queries), self.group_size)


@dataclass(frozen=True)
class Group:
    """One query's group: the query text, ``G`` passages (positive first) and aligned teacher scores."""

    query: str
    passages: list[str]
    teacher_scores: list[float] | None


def build_group(
    dataset: TrainDataset,
    idx: int,
    group_size: int,
    seed: int,
    epoch: int,
    query_instruction: str | None = None,
    instruction_format: str = PREFIX_INSTRUCTION_FORMAT,
) -> Group:
    """Draw example ``idx``'s group; the draw depends only on ``(seed, epoch, idx)``.

    * Query: ``instruction_format.format(instruction, query)`` where ``instruction`` is the line's
      ``prompt`` when it has a non-empty one, else ``query_instruction``; the query alone when there is
      neither. (FlagEmbedding uses ``prompt`` only when an instruction is configured; here a line's own
      prompt always applies.)
    * Positive: one of ``pos``, uniformly.
    * Negatives: ``G-1`` of ``neg`` without replacement when there are enough; when there are too
      few, FlagEmbedding's rule: ``neg`` repeated ``ceil((G-1)/len(neg))`` times, then sampled
      without replacement (so each negative appears about equally often).
    * Empty ``neg``: negatives are positives of other examples of the same file (distinct examples
      when the file has enough, never a text equal to one of this example's positives when it can be
      avoided); such a group has no teacher scores.
    * Teacher scores: ``pos_scores``/``neg_scores`` of the chosen passages, when the line has both.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
    rng = np.random.default_rng([seed, epoch, idx])
    example = dataset[idx]
    prefix = example.get("prompt") or query_instruction or ""
    pos, neg = example["pos"], example["neg"]
    pos_idx = int(rng.integers(len(pos)))
    passages = [pos[pos_idx]]
    need = group_size - 1
    pos_scores, neg_scores = example.get("pos_scores"), example.get("neg_scores")
    scores: list[float] | None = None
    if need == 0:
        scores = [float(pos_scores[pos_idx])] if pos_scores is not None else None
    elif neg:
        pool = np.arange(len(neg))
        if len(neg) < need:
            pool = np.tile(pool, -(-need // len(neg)))  # ceil division
        neg_idx = rng.choice(pool, size=need, replace=False)
        passages.extend(neg[int(i)] for i in neg_idx)
        if pos_scores is not None and neg_scores is not None:
            scores = [float(pos_scores[pos_idx])] + [float(neg_scores[int(i)]) for i in neg_idx]
    else:
        passages.extend(_negatives_from_other_positives(dataset, idx, need, rng))
    query = format_query(example["query"], prefix, instruction_format)
    return Group(query=query, passages=passages, teacher_scores=scores)


def build_batch(
    dataset: TrainDataset,
    indices: Sequence[int],
    group_size: int,
    seed: int,
    epoch: int,
    query_instruction: str | None = None,
    instruction_format: str = PREFIX_INSTRUCTION_FORMAT,
) -> TrainBatch:
    """Collate the groups of ``indices`` (one batch from :class:`SameDatasetBatchSampler`).

    Deterministic given ``(seed, epoch, indices)``, so a resumed run rebuilds identical batches.
    All indices must come from one file. Shapes: ``B = len(indices)`` queries, ``B*G`` passages,
    teacher scores (B, G), or None when no group has scores (a group without them among scored ones
    gets a hard label: raw scores ``[0, HARD_LABEL_SCORE, ...]``).
    """
    if len(indices) == 0:
        raise ValueError("build_batch needs at least one index")
    files = {dataset.file_index(int(i)) for i in indices}
    if len(files) > 1:
        names = sorted(dataset.names[k] for k in files)
        raise ValueError(f"a batch must come from one dataset file, got indices from {names}")
    name = dataset.names[files.pop()]
    groups = [
        build_group(dataset, int(i), group_size, seed, epoch, query_instruction, instruction_format)
        for i in indices
    ]
    with_scores = [g.teacher_scores is not None for g in groups]
    teacher: torch.Tensor | None = None
    if any(with_scores):
        # A group without scores in a batch with some (a line without them, or without 'neg', e.g. one
        # whose mined negatives were all filtered out) learns its hard label: all the teacher's
        # probability on its positive, which makes its m3_kd_loss term its plain contrastive loss.
        hard_label = [0.0] + [HARD_LABEL_SCORE] * (group_size - 1)
        rows = [g.teacher_scores if g.teacher_scores is not None else hard_label for g in groups]
        teacher = torch.tensor(rows, dtype=torch.float32)  # (B, G)
        if not all(with_scores) and name not in _warned_mixed_scores:
            _warned_mixed_scores.add(name)
            logger.info(
                "%s: some examples have no pos_scores/neg_scores (or no 'neg'); in batches with scored "
                "ones their teacher is their own positive (probability 1)",
                name,
            )
    return TrainBatch(
        queries=[g.query for g in groups],
        passages=[p for g in groups for p in g.passages],
        group_size=group_size,
        teacher_scores=teacher,
        dataset=name,
        indices=[int(i) for i in indices],
    )


def _negatives_from_other_positives(
    dataset: TrainDataset, idx: int, need: int, rng: np.random.Generator
) -> list[str]:
    """``need`` positives of other examples of idx's file, avoiding texts equal to idx's positives."""
    start, stop = dataset.file_ranges[dataset.file_index(idx)]
    others = stop - start - 1
    assert others >= 1, "TrainDataset rejects a file whose only line has no negatives"
    own = set(dataset.positive_hashes(idx).tolist())
    # Twice what is needed so a few collisions with own positives can be replaced without re-drawing.
    draw = rng.choice(others, size=min(others, 2 * need), replace=False)
    out: list[str] = []
    fallback: list[str] = []
    for j in draw:
        other = start + int(j) + (int(j) >= idx - start)  # skip idx itself
        pos = dataset[other]["pos"]
        text = pos[int(rng.integers(len(pos)))]
        (fallback if text_hash(text) in own else out).append(text)
        if len(out) == need:
            return out
    # Too few distinct others: reuse what was drawn (with replacement), clean texts first.
    pool = out or fallback
    while len(out) < need:
        out.append(pool[int(rng.integers(len(pool)))])
    return out

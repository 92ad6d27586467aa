"""The BGE-M3 unified fine-tuning objective as pure functions of scores (docs/design.md, "Objective").

Every constant of the objective is a named field of :class:`LossConfig`; none is written inline.
The loss sees whole-batch representations and knows nothing about how they were computed, so the
memory strategies (``m3embed.memory``) can all share it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

from m3embed import scores as S
from m3embed.reps import M3Reps
from m3embed.settings import AT_LEAST_1, POSITIVE, check_fields, setting


@dataclass(frozen=True)
class LossConfig:
    """Weights and switches of the objective; defaults are FlagEmbedding's BGE-M3 values."""

    temperature: float = setting(0.02, "scores are divided by this before softmax", bounds=POSITIVE)
    heads: Literal["auto", "all", "dense"] = setting(
        "auto",
        "all: dense + sparse + ColBERT (BGE-M3); dense: dense-only InfoNCE, no sparse/ColBERT heads; "
        "auto: the model's family (all for encoders, dense for decoder-only LLMs)",
    )
    # Ensemble score S_e = w_d·S_d + w_s·S_s + w_c·S_c (FlagEmbedding's ensemble_score).
    ensemble_dense_weight: float = setting(1.0, "w_d of the ensemble score", metavar="W")
    ensemble_sparse_weight: float = setting(0.3, "w_s of the ensemble score", metavar="W")
    ensemble_colbert_weight: float = setting(1.0, "w_c of the ensemble score", metavar="W")
    # L = (w_d·CE(S_d) + w_e·CE(S_e) + w_s·CE(S_s) + w_c·CE(S_c)) / contrastive_normalizer
    dense_loss_weight: float = setting(1.0, "weight of the dense InfoNCE loss", metavar="W")
    ensemble_loss_weight: float = setting(1.0, "weight of the ensemble InfoNCE loss", metavar="W")
    sparse_loss_weight: float = setting(0.1, "weight of the sparse InfoNCE loss", metavar="W")
    colbert_loss_weight: float = setting(1.0, "weight of the ColBERT InfoNCE loss", metavar="W")
    contrastive_normalizer: float = setting(
        4.0, "the weighted InfoNCE losses are divided by this", metavar="X", bounds=POSITIVE
    )
    # Self-knowledge distillation with the detached ensemble as teacher:
    # L = (L + (w_d·SCE(T,S_d) + w_s·SCE(T,S_s) + w_c·SCE(T,S_c)) / distill_normalizer) / final_normalizer
    self_distill: bool = setting(True, "self-knowledge distillation from the ensemble score")
    self_distill_start_step: int = setting(
        -1, "distillation applies when step > this step (FlagEmbedding's rule)", metavar="STEP"
    )
    distill_dense_weight: float = setting(1.0, "weight of the dense output's distillation loss", metavar="W")
    distill_sparse_weight: float = setting(
        0.1, "weight of the sparse output's distillation loss", metavar="W"
    )
    distill_colbert_weight: float = setting(
        1.0, "weight of the ColBERT output's distillation loss", metavar="W"
    )
    distill_normalizer: float = setting(
        3.0, "the weighted distillation losses are divided by this", metavar="X", bounds=POSITIVE
    )
    final_normalizer: float = setting(
        2.0, "InfoNCE + distillation is divided by this", metavar="X", bounds=POSITIVE
    )
    kd_loss_type: Literal["kl_div", "m3_kd_loss"] = setting(
        "m3_kd_loss",
        "loss for teacher scores (pos_scores/neg_scores in the data): FlagEmbedding's two variants",
    )
    score_block_elements: int = setting(
        S.DEFAULT_BLOCK_ELEMENTS,
        "elements of one MaxSim similarity / sparse pooling block on the loss side (its memory; see m3embed.scores)",
        metavar="N",
        bounds=AT_LEAST_1,
    )

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class LossOutput:
    """The scalar to backpropagate and every named part of it (detached), for logging.

    ``unscaled`` is the loss to report when ``loss`` is not it: under fp16 loss scaling ``loss`` is
    ``scale · L`` (what is backpropagated) and ``unscaled`` is ``L``.
    """

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    unscaled: torch.Tensor | None = None

    def detached(self) -> LossOutput:
        """The same values cut from the graph (what a step returns once it has backpropagated)."""
        return replace(self, loss=self.loss.detach())

    def as_floats(self) -> dict[str, float]:
        loss = self.loss if self.unscaled is None else self.unscaled
        return {"loss": float(loss.detach()), **{k: float(v) for k, v in self.parts.items()}}


@dataclass
class BatchScores:
    """Temperature-scaled query × passage scores of one batch. Shapes: each (Bq, Bp) or None.

    Every score is a function of one query and one passage, so the columns of a block of passages
    can be computed on their own and concatenated (what score-level gradient caching relies on).
    """

    dense: torch.Tensor
    sparse: torch.Tensor | None = None
    colbert: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: t for name, t in vars(self).items() if t is not None}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> BatchScores:
        """A copy with ``fn`` applied to every score matrix that is present."""
        return replace(self, **{name: fn(t) for name, t in self.tensors().items()})

    @staticmethod
    def cat(blocks: Sequence[BatchScores], dim: int = 1) -> BatchScores:
        """Blocks of columns (``dim=1``) or of rows (``dim=0``) joined into one."""
        names = blocks[0].tensors()
        return replace(
            blocks[0], **{name: torch.cat([getattr(b, name) for b in blocks], dim) for name in names}
        )


def batch_scores(q: M3Reps, p: M3Reps, config: LossConfig) -> BatchScores:
    """Scores of every query against every passage of the batch, divided by the temperature."""
    tau = config.temperature
    dense = S.dense_scores(q.dense, p.dense) / tau
    no_heads = q.token_weights is None or q.colbert is None
    if config.heads == "dense" or (config.heads == "auto" and no_heads):
        return BatchScores(dense)
    if no_heads:
        raise ValueError(
            "LossConfig.heads='all' needs a model with sparse and ColBERT heads; use heads='dense'"
        )
    sparse = S.sparse_scores(
        q.input_ids, q.token_weights, p.input_ids, p.token_weights, config.score_block_elements
    )
    colbert = S.colbert_scores(
        q.colbert, q.colbert_mask, p.colbert, p.colbert_mask, config.score_block_elements
    )
    return BatchScores(dense, sparse / tau, colbert / tau)


def target_columns(n_queries: int, group_size: int, device: torch.device) -> torch.Tensor:
    """Column of each query's positive in ``[q0: pos, negs.., q1: pos, ...]`` layout. Shape: (Bq,)."""
    return torch.arange(n_queries, device=device) * group_size


def soft_cross_entropy(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """-mean_rows Σ teacher·log_softmax(student) (FlagEmbedding's ``kl_div`` distill loss)."""
    return -(teacher * F.log_softmax(student, dim=-1)).sum(-1).mean()


def local_scores(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each query's scores against its own group. Shapes: (Bq, Bp) -> (Bq, G)."""
    n = scores.shape[0]
    cols = target_columns(n, group_size, scores.device)[:, None] + torch.arange(
        group_size, device=scores.device
    )
    return scores.gather(1, cols)


def m3_kd_loss(teacher: torch.Tensor, scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """FlagEmbedding's ``m3_kd_loss``: one CE per group position weighted by the teacher probability,
    with the positions already used masked out of later softmaxes.

    Shapes: teacher (Bq, G) probabilities, scores (Bq, Bp) -> scalar.
    """
    labels = target_columns(scores.shape[0], group_size, scores.device)
    mask = torch.zeros_like(scores)
    loss = scores.new_zeros(())
    for i in range(group_size):
        ce = F.cross_entropy(scores + mask, labels + i, reduction="none")  # (Bq,)
        loss = loss + (teacher[:, i] * ce).mean()
        mask = mask.scatter(1, (labels + i)[:, None], torch.finfo(scores.dtype).min)
    return loss


def contrastive_loss(
    scores: torch.Tensor, group_size: int, config: LossConfig, teacher: torch.Tensor | None
) -> torch.Tensor:
    """InfoNCE over in-batch + hard negatives, or its teacher-distilled variant.

    Shapes: scores (Bq, Bp), teacher (Bq, G) probabilities or None -> scalar.
    """
    return contrastive_and_kd(scores, group_size, config, teacher)[0]


def contrastive_and_kd(
    scores: torch.Tensor, group_size: int, config: LossConfig, teacher: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`contrastive_loss` and the part of it that learns from the teacher (None without one):
    all of it with ``m3_kd_loss``, the soft cross-entropy without the hard-label term with ``kl_div``."""
    if teacher is None:
        return F.cross_entropy(scores, target_columns(scores.shape[0], group_size, scores.device)), None
    if config.kd_loss_type == "kl_div":
        kd = soft_cross_entropy(teacher, local_scores(scores, group_size))
        targets = target_columns(scores.shape[0], group_size, scores.device)
        return kd + F.cross_entropy(scores, targets), kd
    kd = m3_kd_loss(teacher, scores, group_size)
    return kd, kd


def m3_loss(
    scores: BatchScores,
    group_size: int,
    config: LossConfig,
    step: int = 0,
    teacher_scores: torch.Tensor | None = None,
    dense_loss: torch.Tensor | None = None,
) -> LossOutput:
    """The unified fine-tuning loss of BGE-M3 from a batch's scores.

    ``dense_loss``, when given, replaces the dense contrastive term (FlagEmbedding-style cross-device
    training computes it over the global batch while everything else stays in-batch).

    With ``teacher_scores`` each contrastive term is its :func:`contrastive_loss` with the teacher, and
    the parts gain ``kd``: the teacher's share of the loss (:func:`contrastive_and_kd`), for the log.

    Shapes: every score (Bq, Bq·G); teacher_scores (Bq, G) raw teacher scores or None.
    """
    c = config
    teacher = None if teacher_scores is None else torch.softmax(teacher_scores.to(scores.dense), dim=-1)

    # (1) dense-only objective
    if dense_loss is None:
        dense, kd_dense = contrastive_and_kd(scores.dense, group_size, c, teacher)
    else:  # the global dense term; the logged teacher share is this rank's, outside the graph
        dense, kd_dense = dense_loss, None
        if teacher is not None:
            kd_dense = contrastive_and_kd(scores.dense.detach(), group_size, c, teacher)[1]
    if scores.sparse is None:  # heads='dense', or 'auto' on a model without the sparse and ColBERT heads
        kd = {} if kd_dense is None else {"kd": kd_dense.detach()}
        return LossOutput(dense, {"dense": dense.detach(), **kd})

    # (2) contrastive loss of each output and of their ensemble
    ensemble_scores = (
        c.ensemble_dense_weight * scores.dense
        + c.ensemble_sparse_weight * scores.sparse
        + c.ensemble_colbert_weight * scores.colbert
    )
    sparse, kd_sparse = contrastive_and_kd(scores.sparse, group_size, c, teacher)
    colbert, kd_colbert = contrastive_and_kd(scores.colbert, group_size, c, teacher)
    ensemble, kd_ensemble = contrastive_and_kd(ensemble_scores, group_size, c, teacher)
    loss = (
        c.dense_loss_weight * dense
        + c.ensemble_loss_weight * ensemble
        + c.sparse_loss_weight * sparse
        + c.colbert_loss_weight * colbert
    ) / c.contrastive_normalizer
    parts = {"dense": dense, "sparse": sparse, "colbert": colbert, "ensemble": ensemble}
    if teacher is not None:  # the teacher's share of the loss, weighted as the contrastive terms are
        parts["kd"] = (
            c.dense_loss_weight * kd_dense
            + c.ensemble_loss_weight * kd_ensemble
            + c.sparse_loss_weight * kd_sparse
            + c.colbert_loss_weight * kd_colbert
        ) / c.contrastive_normalizer

    # (3) self-knowledge distillation: the ensemble teaches each output
    if c.self_distill and step > c.self_distill_start_step:
        target = torch.softmax(ensemble_scores.detach(), dim=-1)
        distill = {
            "distill_dense": soft_cross_entropy(target, scores.dense),
            "distill_sparse": soft_cross_entropy(target, scores.sparse),
            "distill_colbert": soft_cross_entropy(target, scores.colbert),
        }
        distill_sum = (
            c.distill_dense_weight * distill["distill_dense"]
            + c.distill_sparse_weight * distill["distill_sparse"]
            + c.distill_colbert_weight * distill["distill_colbert"]
        ) / c.distill_normalizer
        loss = (loss + distill_sum) / c.final_normalizer
        parts.update(distill)
    return LossOutput(loss, {k: v.detach() for k, v in parts.items()})


@dataclass(frozen=True)
class M3Objective:
    """The BGE-M3 objective of one batch, split the way the memory strategies need it.

    ``scores(queries, passages)`` gives the score columns of any block of passages against the
    queries; ``loss(scores)`` is the objective on the whole batch's score matrices. ``share`` maps this
    process's queries to the queries the passages are scored against: the identity here, every rank's
    queries under :class:`m3embed.distributed.CrossDeviceGather`.

    Shapes: teacher_scores (Bq, G) raw teacher scores or None.
    """

    config: LossConfig
    group_size: int
    step: int = 0
    teacher_scores: torch.Tensor | None = None

    def share(self, queries: M3Reps) -> M3Reps:
        """Queries in at least fp32 (converted once here, not per scored block)."""
        return queries.at_least_fp32()

    def scores(self, queries: M3Reps, passages: M3Reps) -> BatchScores:
        """Shapes: queries as returned by :meth:`share`, passages (b, ...) -> each score (Bq, b)."""
        return batch_scores(queries, passages.at_least_fp32(), self.config)

    def loss(self, scores: BatchScores) -> LossOutput:
        return m3_loss(scores, self.group_size, self.config, self.step, self.teacher_scores)

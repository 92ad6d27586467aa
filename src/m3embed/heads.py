"""Starting weights for the sparse and ColBERT heads a model comes without (docs/training.md, "Heads").

A BERT or XLM-RoBERTa without BGE-M3's head files gets two ``nn.Linear`` heads with random weights:
the sparse head then weights tokens by noise and the ColBERT head projects the token vectors onto
random directions. Both start where the encoder already is instead:

- ColBERT: the identity when the ColBERT size equals the hidden size (the head starts as the encoder's
  own token vectors), else a random semi-orthogonal projection, which keeps inner products close;
- sparse: ``relu(w·h_t + b)`` fitted by ridge regression on the encoder's token states ``h_t`` of a
  sample of the training texts to ``sqrt(idf(t) / Z)``: BM25's inverse document frequency of the
  token over the sample's documents, so a query and a passage score ``Σ idf(t) / Z`` over the tokens
  they share. ``Z`` is the mean over the sampled queries of ``Σ idf`` over their distinct tokens, so a
  query matched against itself scores about 1, the scale of a dense cosine (the two are fused).

Everything is deterministic under the seed: the sample is drawn with it and the encoder runs in eval
mode (no dropout).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from m3embed.model import eval_mode

logger = logging.getLogger(__name__)

HEAD_NAMES = ("sparse", "colbert")


@dataclass(frozen=True)
class SparseFit:
    """What the sparse head was fitted on, for the log."""

    texts: int  # texts whose document frequencies were counted
    fitted_tokens: int  # token states the regression saw
    idf_scale: float  # Z
    r2: float  # share of the target's variance the fitted head explains


def init_colbert_head(head: nn.Linear) -> None:
    """Identity when square (ColBERT = the encoder's token vectors), else semi-orthogonal; bias 0."""
    with torch.no_grad():
        if head.out_features == head.in_features:
            nn.init.eye_(head.weight)
        else:
            nn.init.orthogonal_(head.weight)
        nn.init.zeros_(head.bias)


def bm25_idf(doc_freq: np.ndarray, n_docs: int) -> np.ndarray:
    """BM25's (Lucene's) inverse document frequency ``log(1 + (N - df + 0.5) / (df + 0.5))``."""
    return np.log1p((n_docs - doc_freq + 0.5) / (doc_freq + 0.5))


@torch.no_grad()
def fit_sparse_head(
    model,
    queries: Sequence[str],
    documents: Sequence[str],
    *,
    max_length: int,
    fit_documents: int = 256,
    batch_size: int = 32,
    ridge: float = 1e-3,
) -> SparseFit:
    """Fit ``model.sparse_linear`` so that its weight of token t is about ``sqrt(idf(t) / Z)``.

    ``documents`` give the document frequencies (tokenised only); the first ``fit_documents`` of them
    are encoded and their token states are the regression's inputs. ``ridge`` is relative to the mean
    diagonal of ``HᵀH``. Special and padding positions are left out, as the model zeroes them.
    """
    vocab_size = len(model.tokenizer)
    special = set(model.special_ids.tolist())
    doc_freq = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(documents), 256):
        for ids in _token_ids(model, documents[start : start + 256], max_length, special):
            doc_freq[np.unique(ids)] += 1
    idf = bm25_idf(doc_freq, len(documents))
    query_sums = [idf[np.unique(ids)].sum() for ids in _token_ids(model, queries, max_length, special)]
    scale = float(np.mean(query_sums)) if query_sums else 1.0
    target = torch.from_numpy(np.sqrt(idf / max(scale, 1e-12)))  # (vocab,) float64

    gram, moment, sum_yy = _token_state_moments(
        model, documents[:fit_documents], target, max_length, batch_size
    )
    n, sum_y = float(gram[-1, -1]), float(moment[-1])  # the ones column counts the tokens and sums y
    if n == 0:
        raise ValueError("fit_sparse_head: the sample has no token to fit (empty texts?)")
    hidden = gram.shape[0] - 1
    penalty = ridge * float(gram.diagonal()[:hidden].mean())
    regulariser = torch.diag(torch.tensor([penalty] * hidden + [0.0], dtype=torch.float64))
    solution = torch.linalg.solve(gram + regulariser, moment)  # (H + 1,)
    residual = float(solution @ gram @ solution - 2 * solution @ moment) + sum_yy
    variance = sum_yy - sum_y**2 / n
    head = model.sparse_linear
    head.weight.copy_(solution[:hidden].to(head.weight)[None])
    head.bias.copy_(solution[hidden:].to(head.bias))
    return SparseFit(len(documents), int(n), scale, 1.0 - residual / max(variance, 1e-12))


def _token_state_moments(
    model, texts: Sequence[str], target: torch.Tensor, max_length: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The regression's sums over the non-special tokens of ``texts``: ``XᵀX`` and ``Xᵀy`` with
    ``X = [token state, 1]`` (float64, ``(H+1, H+1)`` and ``(H+1,)``), and ``Σ y²``; ``y`` is
    ``target`` at each token's id. The encoder runs in eval mode (no dropout)."""
    hidden = model.backbone.config.hidden_size
    gram = torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64)
    moment = torch.zeros(hidden + 1, dtype=torch.float64)
    sum_yy = 0.0
    with eval_mode(model):
        for start in range(0, len(texts), batch_size):
            batch = model.tokenize(list(texts[start : start + batch_size]), max_length)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            states = model.backbone(**batch).last_hidden_state  # (b, L, H)
            keep = batch["attention_mask"].bool() & ~torch.isin(batch["input_ids"], model.special_ids)
            x = states[keep].double().cpu()  # (n_b, H)
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
            y = target[batch["input_ids"][keep].cpu()]
            gram += x.T @ x
            moment += x.T @ y
            sum_yy += float((y * y).sum())
    return gram, moment, sum_yy


def _token_ids(model, texts: Sequence[str], max_length: int, special: set[int]) -> list[np.ndarray]:
    """Each text's token ids without special tokens (truncated to ``max_length`` with them)."""
    encoded = model.tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)
    return [np.array([t for t in ids if t not in special], dtype=np.int64) for ids in encoded["input_ids"]]


def sample_training_texts(dataset, count: int, seed: int) -> tuple[list[str], list[str]]:
    """Queries and passages (positives and negatives) of ``count`` training lines drawn with ``seed``."""
    rows = random.Random(seed).sample(range(len(dataset)), min(count, len(dataset)))
    queries, passages = [], []
    for row in rows:
        example = dataset[row]
        queries.append(example["query"])
        passages.extend(example["pos"] + example["neg"])
    return queries, passages


def init_new_heads(model, dataset, seed: int, max_length: int, sample_lines: int = 2048) -> list[str]:
    """Start every head in ``model.new_heads`` from the encoder (module docstring); returns a log line each."""
    lines = []
    if "colbert" in model.new_heads and model.colbert_linear is not None:
        init_colbert_head(model.colbert_linear)
        square = model.colbert_linear.out_features == model.colbert_linear.in_features
        lines.append(f"colbert head: {'identity' if square else 'semi-orthogonal projection'}")
    if "sparse" in model.new_heads and model.sparse_linear is not None:
        queries, passages = sample_training_texts(dataset, sample_lines, seed)
        random.Random(seed).shuffle(passages)
        fit = fit_sparse_head(model, queries, passages, max_length=max_length)
        lines.append(
            f"sparse head: fitted to sqrt(idf / {fit.idf_scale:.1f}) of {fit.texts} training passages "
            f"({fit.fitted_tokens} token states, R² {fit.r2:.2f})"
        )
    return lines

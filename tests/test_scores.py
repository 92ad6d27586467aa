"""Batch scores equal the naive formulas of docs/design.md, "Model", values and gradients."""

import numpy as np
import pytest
import torch

from m3embed import scores as S

VOCAB = 50


def naive_sparse(q_ids, q_w, p_ids, p_w):
    """FlagEmbedding's training formula: scatter into (B, L, vocab), max over L, dot products."""

    def pooled(ids, w):
        full = torch.zeros(ids.shape[0], ids.shape[1], VOCAB, dtype=w.dtype)
        full = torch.scatter(full, -1, ids[..., None], w[..., None])
        return full.max(dim=1).values

    return pooled(q_ids, q_w) @ pooled(p_ids, p_w).T


def naive_colbert(q, q_mask, p, p_mask):
    """Loop over pairs: (1/n_q) Σ_i max_j over valid tokens only."""
    out = torch.zeros(q.shape[0], p.shape[0], dtype=q.dtype)
    for a in range(q.shape[0]):
        qa = q[a][q_mask[a].bool()]
        for b in range(p.shape[0]):
            pb = p[b][p_mask[b].bool()]
            out[a, b] = (qa @ pb.T).max(dim=1).values.sum() / qa.shape[0]
    return out


def ragged_mask(n, length, gen):
    lengths = torch.randint(1, length + 1, (n,), generator=gen)
    lengths[0] = length
    return torch.arange(length)[None] < lengths[:, None]


@pytest.mark.parametrize("block", [S.DEFAULT_BLOCK_ELEMENTS, 7])
def test_sparse_scores_equal_naive_values_and_gradients(block):
    gen = torch.Generator().manual_seed(0)
    q_ids = torch.randint(0, VOCAB, (5, 6), generator=gen)
    p_ids = torch.randint(0, VOCAB, (9, 11), generator=gen)
    q_ids[0, :3] = 7  # a token repeated inside one text: the max counts, not the sum
    # strictly positive, distinct weights so the max is unique (its subgradient is then unambiguous)
    q_mask, p_mask = ragged_mask(5, 6, gen), ragged_mask(9, 11, gen)
    q_w = (torch.rand(5, 6, generator=gen) + 0.1) * q_mask
    p_w = (torch.rand(9, 11, generator=gen) + 0.1) * p_mask
    q_w.requires_grad_(True)
    p_w.requires_grad_(True)

    got = S.sparse_scores(q_ids, q_w, p_ids, p_w, block_elements=block)
    want = naive_sparse(q_ids, q_w, p_ids, p_w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    upstream = torch.randn(got.shape, generator=gen)
    g_got = torch.autograd.grad((got * upstream).sum(), (q_w, p_w))
    g_want = torch.autograd.grad((want * upstream).sum(), (q_w, p_w))
    # At masked positions the weight is exactly 0 and ties with "absent" (also 0): any subgradient is
    # valid there, and the model's mask multiplies it away. Compare where weights are real.
    for a, b, mask in zip(g_got, g_want, (q_mask, p_mask)):
        torch.testing.assert_close(a * mask, b * mask, rtol=1e-5, atol=1e-6)


def test_sparse_scores_hand_computed():
    q_ids = torch.tensor([[1, 2, 2, 0]])
    q_w = torch.tensor([[0.5, 0.2, 0.4, 0.0]])
    p_ids = torch.tensor([[2, 3, 1], [4, 4, 4]])
    p_w = torch.tensor([[1.0, 9.0, 2.0], [1.0, 1.0, 1.0]])
    # q: {1: .5, 2: .4}; p0: {2: 1, 3: 9, 1: 2} -> .5*2 + .4*1 = 1.4; p1 shares nothing -> 0
    torch.testing.assert_close(S.sparse_scores(q_ids, q_w, p_ids, p_w), torch.tensor([[1.4, 0.0]]))


# Lq·Lp = 45 similarities per pair: one block of everything; 1 query × 1 passage; 3 queries × 1 passage
# (a ragged last query block); all 4 queries × 2 passages (a ragged last passage block).
# dim 16 > Lp = 9: backward gathers C-long rows, so its blocks are cut smaller than forward's.
@pytest.mark.parametrize("block", [S.DEFAULT_BLOCK_ELEMENTS, 50, 135, 360])
@pytest.mark.parametrize("dim", [8, 16])
def test_colbert_scores_equal_naive_with_padding_and_negative_similarities(block, dim):
    gen = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(4, 5, dim, generator=gen), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(7, 9, dim, generator=gen), dim=-1)
    q_mask, p_mask = ragged_mask(4, 5, gen), ragged_mask(7, 9, gen)
    # one passage whose every similarity with query 0 is negative: padding must not turn that into 0
    # (slightly different tokens: exact ties would let either of two equal tokens take the gradient)
    p[3] = torch.nn.functional.normalize(-q[0, 0] + 0.05 * torch.randn(9, dim, generator=gen), dim=-1)
    q[0] = q[0, :1].expand_as(q[0])
    q = (q * q_mask[..., None]).requires_grad_(True)
    p = (p * p_mask[..., None]).requires_grad_(True)

    got = S.colbert_scores(q, q_mask, p, p_mask, block_elements=block)
    want = naive_colbert(q, q_mask, p, p_mask)
    assert got[0, 3] < 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    upstream = torch.randn(got.shape, generator=gen)
    g_got = torch.autograd.grad((got * upstream).sum(), (q, p))
    g_want = torch.autograd.grad((want * upstream).sum(), (q, p))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_colbert_adds_into_a_leafs_allocated_grad_in_place():
    """The score-level cache's queries: a leaf with ``.grad`` allocated, scored against passage blocks
    one after another, gets the same accumulated gradient as one backward through all the passages,
    in the storage allocated first. (That no second query-sized tensor is made is a memory property,
    measured by benchmarks/score_block.py, not asserted here.)"""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(6, 5, 8, generator=gen, dtype=torch.float64)
    p = torch.randn(10, 7, 8, generator=gen, dtype=torch.float64)
    q_mask, p_mask = ragged_mask(6, 5, gen), ragged_mask(10, 7, gen)
    upstream = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    q_ref = q.clone().requires_grad_(True)
    (S.colbert_scores(q_ref, q_mask, p, p_mask) * upstream).sum().backward()

    leaf = q.clone().requires_grad_(True)
    leaf.grad = torch.zeros_like(leaf)
    storage = leaf.grad.data_ptr()
    for cols in (slice(0, 4), slice(4, 10)):
        block = S.colbert_scores(leaf, q_mask, p[cols], p_mask[cols], block_elements=50)
        (block * upstream[:, cols]).sum().backward()
    assert leaf.grad.data_ptr() == storage
    torch.testing.assert_close(leaf.grad, q_ref.grad, rtol=1e-12, atol=1e-12)


def test_colbert_pair_score_and_lexical_matching():
    q = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    p = np.array([[0.6, 0.8], [1.0, 0.0]], dtype=np.float32)
    assert S.colbert_pair_score(q, p) == pytest.approx((1.0 + 0.8) / 2)
    assert S.lexical_matching_score({"1": 0.5, "2": 0.25}, {"2": 4.0, "3": 1.0}) == pytest.approx(1.0)


def test_fusion_is_the_weighted_mean():
    d, s, c = np.array([1.0]), np.array([2.0]), np.array([4.0])
    out = S.fuse({"dense": d, "sparse": s, "colbert": c}, S.DEFAULT_WEIGHTS)
    assert out["sparse+dense"][0] == pytest.approx((0.2 * 2 + 0.4 * 1) / 0.6)
    assert out["colbert+sparse+dense"][0] == pytest.approx(0.4 * 1 + 0.2 * 2 + 0.4 * 4)

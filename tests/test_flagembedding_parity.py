"""Same directory, same numbers as FlagEmbedding 1.4.2 (runs only when the `peers` extra is installed)."""

import numpy as np
import pytest
import torch

from m3embed import M3Model
from m3embed.losses import LossConfig
from m3embed.memory import MemoryConfig
from m3embed.step import train_step
from m3embed.testing import sample_texts, tiny_model

try:
    from m3embed.peers import load_flagembedding_m3, load_flagembedding_m3_finetune

    FE_M3 = load_flagembedding_m3()
except ImportError as err:  # pragma: no cover - depends on the environment
    pytest.skip(f"FlagEmbedding not importable: {err}", allow_module_level=True)

TEXTS = sample_texts(7, seed=11, min_words=1, max_words=40)


@pytest.fixture
def saved(tmp_path, xlmr_model):
    xlmr_model.save_pretrained(tmp_path / "m3")
    return tmp_path / "m3"


def flag_model(directory):
    return FE_M3.M3Embedder(str(directory), use_fp16=False, devices="cpu", normalize_embeddings=True)


def test_encode_equals_flagembedding(saved):
    ours = M3Model.from_pretrained(saved).encode(
        TEXTS, batch_size=3, return_dense=True, return_sparse=True, return_colbert_vecs=True
    )
    theirs = flag_model(saved).encode(
        TEXTS, batch_size=3, return_dense=True, return_sparse=True, return_colbert_vecs=True
    )
    np.testing.assert_allclose(ours["dense_vecs"], theirs["dense_vecs"], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours["lexical_weights"], theirs["lexical_weights"], strict=True):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in a], [float(b[k]) for k in a], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours["colbert_vecs"], theirs["colbert_vecs"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_compute_score_equals_flagembedding(saved):
    pairs = list(zip(TEXTS[:3], TEXTS[3:6]))
    weights = [0.4, 0.2, 0.4]
    ours = M3Model.from_pretrained(saved).compute_score(pairs, weights_for_different_modes=weights)
    # batch_size=1: FlagEmbedding's batched colbert score lets zero padding win the max
    theirs = flag_model(saved).compute_score(pairs, batch_size=1, weights_for_different_modes=weights)
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_directory_saved_by_flagembedding_loads(tmp_path, saved):
    finetune = load_flagembedding_m3_finetune()
    base = finetune.EncoderOnlyEmbedderM3Runner.get_model(str(saved), colbert_dim=-1)
    fe_model = finetune.EncoderOnlyEmbedderM3Model(base, tokenizer=M3Model.from_pretrained(saved).tokenizer)
    fe_model.save(str(tmp_path / "fe"))
    M3Model.from_pretrained(saved).tokenizer.save_pretrained(tmp_path / "fe")
    a = M3Model.from_pretrained(saved).encode(TEXTS, return_sparse=True, return_colbert_vecs=True)
    b = M3Model.from_pretrained(tmp_path / "fe").encode(TEXTS, return_sparse=True, return_colbert_vecs=True)
    np.testing.assert_allclose(a["dense_vecs"], b["dense_vecs"], rtol=0, atol=0)
    for x, y in zip(a["colbert_vecs"], b["colbert_vecs"]):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kd", [None, "m3_kd_loss", "kl_div"])
def test_training_loss_and_gradients_equal_flagembedding(xlmr_tokenizer, kd):
    """FlagEmbedding's unified fine-tuning loss on the same weights and inputs (equal lengths, no dropout:
    its ColBERT max lets padding win, ours masks it, so padded batches legitimately differ).

    In float64, as the 2-process tests: in float32 the two implementations sum the word-embedding
    gradient's rows in another order, and how far that moves a sum depends on the CPU's kernels (AMD
    AVX-512 missed atol=1e-6 by 2.6e-6 in 2 of 7,552 elements). In float64 that noise is ~1e-15, so a
    real difference still shows at the same tolerance."""
    finetune = load_flagembedding_m3_finetune()
    model = tiny_model(tokenizer=xlmr_tokenizer, dropout=0.0).double()
    model.train()
    gen = torch.Generator().manual_seed(0)
    n_q, group = 3, 2
    low = 4  # no special ids inside the texts
    q = torch.randint(low, len(xlmr_tokenizer), (n_q, 7), generator=gen)
    p = torch.randint(low, len(xlmr_tokenizer), (n_q * group, 12), generator=gen)
    q[:, 0], p[:, 0], q[:, -1], p[:, -1] = 0, 0, 2, 2  # <s> ... </s>
    q_batch = {"input_ids": q, "attention_mask": torch.ones_like(q)}
    p_batch = {"input_ids": p, "attention_mask": torch.ones_like(p)}
    scores = torch.randn(n_q, group, generator=gen, dtype=torch.float64) if kd else None

    fe = finetune.EncoderOnlyEmbedderM3Model(
        {
            "model": model.backbone,
            "colbert_linear": model.colbert_linear,
            "sparse_linear": model.sparse_linear,
        },
        tokenizer=xlmr_tokenizer,
        temperature=0.02,
        normalize_embeddings=True,
        unified_finetuning=True,
        use_self_distill=True,
        self_distill_start_step=-1,
        kd_loss_type=kd or "m3_kd_loss",
    )
    fe.train()
    fe_loss = fe(q_batch, p_batch, teacher_scores=None if scores is None else scores.flatten().tolist()).loss
    fe_loss.backward()
    fe_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    ours = train_step(
        model,
        q_batch,
        p_batch,
        group,
        memory=MemoryConfig("cache", sub_batch_size=2),
        loss=LossConfig(kd_loss_type=kd or "m3_kd_loss"),
        teacher_scores=scores,
    )
    assert ours["loss"] == pytest.approx(float(fe_loss.detach()), rel=1e-5)
    for name, param in model.named_parameters():
        assert_grad_close(name, param.grad, fe_grads[name])


def assert_grad_close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """``assert_close`` at rtol 1e-4, atol 1e-6, with the parameter's name and gradient scale added to
    torch's own report (mismatched elements, greatest absolute difference and where)."""
    scale = float(want.abs().max()) if want.numel() else 0.0

    def message(report: str) -> str:
        return f"gradient of {name} ({got.dtype}, {want.numel()} elements, max |grad| {scale:.3g}):\n{report}"

    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=message)

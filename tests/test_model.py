"""M3Model: outputs equal the formulas of docs/design.md, "Model", BGE-M3 layout round trips, bad input."""

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from m3embed import M3Config, M3Model
from m3embed.testing import sample_texts, tiny_model, wide_vocab_texts, wide_vocab_tokenizer

TEXTS = sample_texts(9, seed=5, min_words=1, max_words=45)


def reference_outputs(model: M3Model, text: str, max_length: int = 512):
    """Each output from the formulas, one unpadded text at a time, with the raw encoder."""
    enc = model.tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        h = model.backbone(**enc).last_hidden_state[0]  # (L, H)
        dense = F.normalize(h[0], dim=-1).numpy()
        w = torch.relu(model.sparse_linear(h)).squeeze(-1).numpy()
        colbert = F.normalize(model.colbert_linear(h[1:]), dim=-1).numpy()
    special = {model.tokenizer.cls_token_id, model.tokenizer.eos_token_id, model.tokenizer.pad_token_id}
    special |= {model.tokenizer.unk_token_id, model.tokenizer.sep_token_id}
    lexical: dict[str, float] = {}
    for token_id, weight in zip(enc["input_ids"][0].tolist(), w.tolist()):
        if token_id not in special and weight > 0:
            lexical[str(token_id)] = max(lexical.get(str(token_id), 0.0), weight)
    return dense, lexical, colbert


def encode_all(model, texts, **kwargs):
    return model.encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=True, **kwargs)


def assert_outputs_close(a, b, tol=1e-5):
    np.testing.assert_allclose(a["dense_vecs"], b["dense_vecs"], rtol=tol, atol=tol)
    for x, y in zip(a["lexical_weights"], b["lexical_weights"], strict=True):
        assert x.keys() == y.keys()
        np.testing.assert_allclose([x[k] for k in x], [y[k] for k in x], rtol=tol, atol=tol)
    for x, y in zip(a["colbert_vecs"], b["colbert_vecs"], strict=True):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


@pytest.fixture
def saved(tmp_path, xlmr_model):
    xlmr_model.save_pretrained(tmp_path / "m3")
    return tmp_path / "m3"


def test_encode_matches_the_formulas(saved):
    model = M3Model.from_pretrained(saved)
    out = encode_all(model, TEXTS, batch_size=4)
    assert out["dense_vecs"].shape == (len(TEXTS), 32) and out["dense_vecs"].dtype == np.float32
    for i, text in enumerate(TEXTS):
        dense, lexical, colbert = reference_outputs(model, text)
        np.testing.assert_allclose(out["dense_vecs"][i], dense, rtol=1e-5, atol=1e-5)
        assert out["lexical_weights"][i].keys() == lexical.keys()
        for k, v in lexical.items():
            assert out["lexical_weights"][i][k] == pytest.approx(v, rel=1e-5, abs=1e-5)
        assert out["colbert_vecs"][i].shape == colbert.shape
        np.testing.assert_allclose(out["colbert_vecs"][i], colbert, rtol=1e-5, atol=1e-5)


def test_compute_score_matches_the_formulas(saved):
    model = M3Model.from_pretrained(saved)
    pairs = list(zip(TEXTS[:4], TEXTS[4:8]))
    weights = [0.4, 0.2, 0.4]
    got = model.compute_score(pairs, batch_size=3, weights_for_different_modes=weights)
    for i, (q, p) in enumerate(pairs):
        qd, ql, qc = reference_outputs(model, q)
        pd, pl, pc = reference_outputs(model, p)
        dense = float(qd @ pd)
        sparse = sum(w * pl[t] for t, w in ql.items() if t in pl)
        colbert = float((qc @ pc.T).max(axis=1).sum() / len(qc))
        assert got["dense"][i] == pytest.approx(dense, abs=1e-5)
        assert got["sparse"][i] == pytest.approx(sparse, abs=1e-5)
        assert got["colbert"][i] == pytest.approx(colbert, abs=1e-5)
        assert got["sparse+dense"][i] == pytest.approx((0.2 * sparse + 0.4 * dense) / 0.6, abs=1e-5)
        assert got["colbert+sparse+dense"][i] == pytest.approx(
            0.4 * dense + 0.2 * sparse + 0.4 * colbert, abs=1e-5
        )
    one = model.compute_score(pairs[0], weights_for_different_modes=weights)
    assert one["dense"] == pytest.approx(got["dense"][0], abs=1e-6)


def test_round_trip_gives_identical_outputs(tmp_path, xlmr_model):
    before = encode_all(xlmr_model, TEXTS)
    xlmr_model.save_pretrained(tmp_path / "a")
    loaded = M3Model.from_pretrained(tmp_path / "a")
    assert loaded.config == xlmr_model.config
    assert_outputs_close(before, encode_all(loaded, TEXTS), tol=0)


def test_flagembedding_layout_without_our_config_loads(tmp_path, xlmr_model):
    """What FlagEmbedding's ``save`` writes: encoder files + the two head state dicts, nothing else."""
    directory = tmp_path / "fe"
    xlmr_model.backbone.save_pretrained(directory)
    xlmr_model.tokenizer.save_pretrained(directory)
    torch.save(xlmr_model.colbert_linear.state_dict(), directory / "colbert_linear.pt")
    torch.save(xlmr_model.sparse_linear.state_dict(), directory / "sparse_linear.pt")
    loaded = M3Model.from_pretrained(directory)
    assert_outputs_close(encode_all(xlmr_model, TEXTS), encode_all(loaded, TEXTS), tol=0)


@pytest.mark.parametrize(
    ("kind", "tokenizer_max", "expected"),
    [("xlmr", None, 512), ("bert", None, 512), ("xlmr", 128, 128)],
    ids=["xlmr-514-positions-less-offset", "bert-512-positions", "tokenizer-limit"],
)
def test_sentence_transformers_max_seq_length_is_what_the_encoder_takes(
    tmp_path, kind, tokenizer_max, expected
):
    """XLM-R numbers positions from padding_idx + 1 (514 - 2 usable), BERT from 0; a tokenizer limit wins."""
    model = tiny_model(kind)
    model.tokenizer.model_max_length = tokenizer_max or VERY_LARGE_INTEGER  # None: no tokenizer limit
    model.save_pretrained(tmp_path / "m")
    written = json.loads((tmp_path / "m" / "sentence_bert_config.json").read_text())
    assert written == {"max_seq_length": expected, "do_lower_case": False}


def test_missing_heads_are_initialised_with_a_warning(tmp_path, xlmr_model, caplog):
    xlmr_model.backbone.save_pretrained(tmp_path / "bare")
    xlmr_model.tokenizer.save_pretrained(tmp_path / "bare")
    with caplog.at_level(logging.WARNING, logger="m3embed.model"):
        model = M3Model.from_pretrained(tmp_path / "bare")
    assert "colbert_linear.pt not found" in caplog.text and "sparse_linear.pt not found" in caplog.text
    assert model.colbert_linear is not None and model.sparse_linear is not None


def test_input_order_is_kept_under_length_sorting(xlmr_model):
    rng = np.random.default_rng(0)
    texts = [TEXTS[i] for i in rng.permutation(len(TEXTS))]
    batched = encode_all(xlmr_model, texts, batch_size=2)
    one_by_one = [encode_all(xlmr_model, [t]) for t in texts]
    for i in range(len(texts)):
        np.testing.assert_allclose(
            batched["dense_vecs"][i], one_by_one[i]["dense_vecs"][0], rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            batched["colbert_vecs"][i], one_by_one[i]["colbert_vecs"][0], rtol=1e-5, atol=1e-6
        )
        assert batched["lexical_weights"][i].keys() == one_by_one[i]["lexical_weights"][0].keys()


class ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def test_no_vocabulary_sized_tensor_in_encode_or_training_step():
    from m3embed.memory import MemoryConfig
    from m3embed.step import train_step

    vocab = 250_002
    model = tiny_model(tokenizer=wide_vocab_tokenizer(vocab), vocab_size=vocab, hidden=16, heads=2)
    texts = wide_vocab_texts(12, vocab)
    hidden = model.backbone.config.hidden_size
    with ShapeRecorder() as rec:
        model.encode(texts, batch_size=4, return_sparse=True, return_colbert_vecs=True)
        train_step(model, texts[:4], texts[4:12], 2, memory=MemoryConfig("cache", sub_batch_size=3))
    assert len(rec.shapes) > 100
    offending = [(f, s) for f, s in rec.shapes if vocab in s and s != (vocab, hidden)]
    assert offending == [], offending[:5]  # only the embedding matrix's own gradient may be that wide


def test_bad_input_errors_name_the_index(xlmr_model):
    empty = xlmr_model.encode([], return_sparse=True, return_colbert_vecs=True)
    assert (
        empty["dense_vecs"].shape == (0, 32)
        and empty["lexical_weights"] == []
        and empty["colbert_vecs"] == []
    )
    for bad, index in ((["ok", ""], 1), (["ok", "fine", None], 2), ([3], 0), (["a", "  "], 1)):
        with pytest.raises(ValueError, match=f"index {index}"):
            xlmr_model.encode(bad)


def test_long_texts_are_truncated(xlmr_model):
    long_text = " ".join(TEXTS) * 5
    out = xlmr_model.encode([long_text], max_length=20, return_colbert_vecs=True)
    assert out["colbert_vecs"][0].shape[0] == 19  # max_length tokens, minus CLS


def test_single_string_in_single_item_out(xlmr_model):
    out = xlmr_model.encode(TEXTS[0], return_sparse=True)
    assert out["dense_vecs"].shape == (32,) and isinstance(out["lexical_weights"], dict)
    tokens = xlmr_model.convert_id_to_token(out["lexical_weights"])
    assert len(tokens) >= 1 and all(isinstance(k, str) for k in tokens)


def test_bert_tokenizer_without_eos_works(tmp_path):
    model = tiny_model("bert")
    assert model.tokenizer.eos_token_id is None
    out = encode_all(model, TEXTS[:3])
    specials = {
        str(model.tokenizer.cls_token_id),
        str(model.tokenizer.sep_token_id),
        str(model.tokenizer.pad_token_id),
    }
    assert all(not (specials & w.keys()) for w in out["lexical_weights"])
    model.save_pretrained(tmp_path / "bert")
    assert_outputs_close(out, encode_all(M3Model.from_pretrained(tmp_path / "bert"), TEXTS[:3]), tol=0)


def test_dense_only_model(tmp_path, xlmr_tokenizer, caplog):
    model = tiny_model(tokenizer=xlmr_tokenizer, config=M3Config(use_sparse=False, use_colbert=False))
    assert model.sparse_linear is None and model.colbert_linear is None
    with pytest.raises(ValueError, match="no sparse head"):
        model.encode(TEXTS, return_sparse=True)
    model.save_pretrained(tmp_path / "d")
    assert not (tmp_path / "d" / "sparse_linear.pt").exists()
    with caplog.at_level(logging.WARNING, logger="m3embed.model"):
        loaded = M3Model.from_pretrained(tmp_path / "d")
    assert "not found" not in caplog.text and loaded.sparse_linear is None
    np.testing.assert_allclose(loaded.encode(TEXTS)["dense_vecs"], model.encode(TEXTS)["dense_vecs"])
    scores = loaded.compute_score([(TEXTS[0], TEXTS[1])])
    assert scores["sparse"] == [0.0] and scores["colbert"] == [0.0]


def test_mean_pooling_is_the_masked_mean(xlmr_tokenizer):
    model = tiny_model(tokenizer=xlmr_tokenizer, config=M3Config(pooling="mean", normalize=False))
    out = model.encode(TEXTS[:3], batch_size=3)
    enc = model.tokenizer(TEXTS[1], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        h = model.backbone(**enc).last_hidden_state[0]
    np.testing.assert_allclose(out["dense_vecs"][1], h.mean(0).numpy(), rtol=1e-5, atol=1e-5)


def test_out_of_memory_retries_with_smaller_batches(xlmr_model, caplog):
    expected = xlmr_model.encode(TEXTS, batch_size=8, return_colbert_vecs=True)
    real_forward = xlmr_model.forward
    seen = []

    def forward_that_fits_three(input_ids, attention_mask):
        seen.append(input_ids.shape[0])
        if input_ids.shape[0] > 3:
            raise torch.OutOfMemoryError("simulated")
        return real_forward(input_ids, attention_mask)

    xlmr_model.forward = forward_that_fits_three
    with caplog.at_level(logging.WARNING, logger="m3embed.model"):
        got = xlmr_model.encode(TEXTS, batch_size=8, return_colbert_vecs=True)
    assert seen[:3] == [8, 6, 4] and max(seen[3:]) == 3  # FlagEmbedding's 3/4 back-off
    assert "retrying with batch_size=6" in caplog.text
    np.testing.assert_allclose(got["dense_vecs"], expected["dense_vecs"], rtol=1e-5, atol=1e-6)
    for a, b in zip(got["colbert_vecs"], expected["colbert_vecs"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

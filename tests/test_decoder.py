"""Decoder-only backbones (Qwen3, Llama): last-token pooling, padding sides, EOS, pad token,
instructions, training end to end and the memory strategies' equivalence (m3embed.backbones)."""

import json

import numpy as np
import pytest
import torch

from m3embed import M3Config, M3Model
from m3embed.backbones import append_eos_token, format_query
from m3embed.data import DataConfig
from m3embed.losses import LossConfig
from m3embed.memory import MemoryConfig
from m3embed.peers import load_flagembedding_llm
from m3embed.pooling import last_token_pool
from m3embed.runlog import LOG_FILE, read_log
from m3embed.step import train_step
from m3embed.testing import sample_texts, tiny_decoder_tokenizer, tiny_model
from m3embed.train import RunConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ("qwen3", "llama")
TEXTS = sample_texts(6, seed=3, min_words=1, max_words=30)  # ragged: padding on every batch
# Normalised float32 vectors: entries ~0.2; two runs of the same math differ by ~1e-7.
ATOL = 1e-6


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_last_token_pool_picks_the_last_real_position_on_either_side():
    hidden = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4, 1)  # value = flat position
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token_pool(hidden, right).flatten().tolist() == [1.0, 7.0]
    assert last_token_pool(hidden, left).flatten().tolist() == [3.0, 7.0]


@pytest.mark.parametrize("kind", KINDS)
def test_decoders_default_to_last_token_and_dense_only(kind):
    model = tiny_model(kind)
    assert (model.config.pooling, model.sparse_linear, model.colbert_linear) == ("last_token", None, None)
    assert tiny_model("xlmr").config.pooling == "cls"  # encoders keep BGE-M3's defaults


@pytest.mark.parametrize("kind", KINDS)
def test_left_and_right_padding_give_each_text_its_unpadded_vector(kind):
    model = tiny_model(kind)
    alone = np.stack([model.encode(t)["dense_vecs"] for t in TEXTS])  # batch of one: no padding
    model.tokenizer.padding_side = "right"
    right = model.encode(TEXTS, batch_size=6)["dense_vecs"]
    model.tokenizer.padding_side = "left"
    left = model.encode(TEXTS, batch_size=6)["dense_vecs"]
    assert max_diff(right, alone) < ATOL, f"right padding moved vectors by {max_diff(right, alone):.2e}"
    assert max_diff(left, alone) < ATOL, f"left padding moved vectors by {max_diff(left, alone):.2e}"


@pytest.mark.parametrize("kind", KINDS)
def test_pooling_is_saved_and_a_reload_pools_the_same_way(tmp_path, kind):
    model = tiny_model(kind, dropout=0.0)
    model.tokenizer.padding_side = "left"
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "m3embed_config.json").read_text())["pooling"] == "last_token"
    assert json.loads((tmp_path / "1_Pooling" / "config.json").read_text())["pooling_mode_lasttoken"]
    loaded = M3Model.from_pretrained(tmp_path)
    assert loaded.config == model.config and loaded.tokenizer.padding_side == "left"
    diff = max_diff(loaded.encode(TEXTS)["dense_vecs"], model.encode(TEXTS)["dense_vecs"])
    assert diff < ATOL, f"reloaded model's vectors differ by {diff:.2e}"


@pytest.mark.parametrize("kind", KINDS)
def test_append_eos_ends_every_text_with_eos_as_the_qwen3_reference_does(tmp_path, kind):
    model = tiny_model(kind, dropout=0.0)
    eos = model.tokenizer.eos_token_id
    plain = model.tokenizer(TEXTS[0])["input_ids"]
    assert plain[-1] != eos  # the base tokenizers add no EOS (FlagLLMModel would pool the last word)
    append_eos_token(model.tokenizer)
    ids = model.tokenizer(TEXTS[0])["input_ids"]
    assert ids == plain + [eos], f"expected the plain ids then EOS {eos}, got {ids}"
    truncated = model.tokenizer(TEXTS[0], truncation=True, max_length=4)["input_ids"]
    assert len(truncated) == 4 and truncated[-1] == eos, truncated
    # Qwen3-Embedding's reference: tokenize, append the EOS id by hand, take the last hidden state.
    with torch.no_grad():
        hidden = model.backbone(input_ids=torch.tensor([plain + [eos]])).last_hidden_state[0, -1]
    reference = torch.nn.functional.normalize(hidden, dim=-1).numpy()
    ours = model.encode(TEXTS[0])["dense_vecs"]
    assert max_diff(ours, reference) < ATOL, f"differs from the reference by {max_diff(ours, reference):.2e}"
    model.save_pretrained(tmp_path)  # the tokenizer files carry it: every tool sees the same tokens
    assert M3Model.from_pretrained(tmp_path).tokenizer(TEXTS[0])["input_ids"][-1] == eos


def test_a_tokenizer_without_pad_pads_with_eos_and_one_with_neither_is_refused():
    llama = tiny_decoder_tokenizer("llama", pad=False)
    assert llama.pad_token is None
    model = tiny_model("llama", tokenizer=llama)
    assert llama.pad_token == "</s>"
    model.encode(TEXTS)  # batches pad
    bare = tiny_decoder_tokenizer("qwen3", pad=False)
    bare.eos_token = None
    with pytest.raises(ValueError, match=r"--pooling last_token.*neither") as err:
        tiny_model("qwen3", tokenizer=bare)
    assert "\n" not in str(err.value)


def test_query_instructions_use_the_family_format_unless_given():
    model = tiny_model("qwen3", dropout=0.0)
    queries = ["free software", "json parser"]
    wanted = [f"Instruct: find packages\nQuery: {q}" for q in queries]
    assert model.with_instruction(queries, "find packages") == wanted
    got = model.encode_queries(queries, query_instruction_for_retrieval="find packages")["dense_vecs"]
    assert max_diff(got, model.encode(wanted)["dense_vecs"]) < ATOL
    assert model.with_instruction(queries, None) == queries  # no instruction: the query as it is
    assert tiny_model("xlmr").with_instruction(["q"], "Represent: ") == ["Represent: q"]
    assert format_query("q", "i", "<{}|{}>") == "<i|q>"
    with pytest.raises(ValueError, match="DataConfig.query_instruction_format must contain two"):
        DataConfig(query_instruction_format="Instruct: {}")


# ---------------------------------------------------------------------- FlagEmbedding's FlagLLMModel
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_dense_vectors_equal_flagembedding_flagllmmodel(tmp_path, kind, side):
    try:
        flag_llm_model = load_flagembedding_llm().BaseLLMEmbedder  # = FlagEmbedding.FlagLLMModel
    except ImportError as err:  # pragma: no cover - depends on the environment
        pytest.skip(f"FlagEmbedding not importable: {err}")
    model = tiny_model(kind, dropout=0.0)
    model.tokenizer.padding_side = side
    model.save_pretrained(tmp_path)
    instruction = "Given a question, find the package"
    theirs = flag_llm_model(
        str(tmp_path), devices="cpu", use_fp16=False, query_instruction_for_retrieval=instruction
    )
    ours = M3Model.from_pretrained(tmp_path, pooling="last_token")
    queries, corpus = TEXTS[:3], sample_texts(5, seed=9, min_words=3, max_words=30)
    for got, want in (
        (
            ours.encode_queries(queries, query_instruction_for_retrieval=instruction),
            theirs.encode_queries(queries),
        ),
        (ours.encode_corpus(corpus), theirs.encode_corpus(corpus)),
    ):
        diff = max_diff(got["dense_vecs"], want)
        assert diff < 1e-5, f"{kind} ({side} padding): m3embed and FlagLLMModel differ by {diff:.2e}"


# ---------------------------------------------------------------------- training
B, G = 3, 3
QUERIES = sample_texts(B, seed=1, min_words=1, max_words=10)
PASSAGES = sample_texts(B * G, seed=2, min_words=3, max_words=40)


def step(kind, side, strategy, heads):
    three = heads == "all"
    config = M3Config(pooling="last_token", use_sparse=three, use_colbert=three)
    model = tiny_model(kind, dropout=0.1, seed=0, config=config).double()
    model.tokenizer.padding_side = side
    model.train()
    torch.manual_seed(1234)  # the dropout masks of this step
    layers = strategy == "cache + layer checkpointing"
    memory = MemoryConfig(strategy.split()[0], sub_batch_size=2, layer_checkpointing=layers)
    parts = train_step(model, QUERIES, PASSAGES, G, memory=memory, loss=LossConfig(heads=heads))
    return parts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("heads", ["dense", "all"])
def test_strategies_give_the_same_loss_and_gradients_on_decoders(kind, side, heads):
    """float64, dropout on, sub-batches of 2 (ragged: 3 queries, 9 passages); every weight trains
    (LoRA: tests/test_lora.py)."""
    ref_parts, ref_grads = step(kind, side, "none", heads)
    assert len(ref_grads) > 0 and (heads == "dense" or any("_linear" in n for n in ref_grads))
    for strategy in ("checkpoint", "cache", "cache + layer checkpointing"):
        parts, grads = step(kind, side, strategy, heads)
        for k in ref_parts:
            assert parts[k] == pytest.approx(ref_parts[k], rel=1e-9, abs=1e-10), (strategy, k)
        assert grads.keys() == ref_grads.keys()
        for name, want in ref_grads.items():
            err = float((grads[name] - want).abs().max())
            scale = float(want.abs().max())
            assert err <= 1e-9 * scale + 1e-12, (
                f"{strategy} {name}: off by {err:.2e} (gradient scale {scale:.2e})"
            )


def test_training_a_tiny_qwen3_saves_a_checkpoint_that_pools_the_same(tmp_path):
    """Default heads ('auto'): a decoder trains the dense-only objective and gains no head."""
    folder = tmp_path / "qwen3"
    tiny_model("qwen3", dropout=0.1).save_pretrained(folder)
    queries = sample_texts(8, seed=4, min_words=2, max_words=8)
    passages = sample_texts(32, seed=5, min_words=5, max_words=30)
    lines = [
        {"query": q, "pos": [passages[4 * i]], "neg": passages[4 * i + 1 : 4 * i + 4]}
        for i, q in enumerate(queries)
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = RunConfig.from_dict(
        {
            "train": {
                "model_name_or_path": str(folder),
                "output_dir": str(tmp_path / "run"),
                "max_steps": 3,
                "learning_rate": 1e-3,
                "progress_bar": False,
            },
            "data": {"train_data": str(tmp_path / "train.jsonl"), "train_group_size": G, "batch_size": 2},
            "memory": {"strategy": "cache", "sub_batch_size": 2},
        }
    )
    assert config.loss.heads == "auto"
    result = train(config)
    assert len(result.losses) == 3 and all(np.isfinite(result.losses)), result.losses
    steps = [e for e in read_log(tmp_path / "run" / LOG_FILE) if "loss" in e]
    assert steps and all("dense" in e and "sparse" not in e and "colbert" not in e for e in steps), steps[0]
    saved = M3Model.from_pretrained(result.checkpoint)
    assert saved.config.pooling == "last_token" and saved.sparse_linear is None
    trained = M3Model.from_pretrained(result.checkpoint, pooling="last_token")
    before = M3Model.from_pretrained(folder).encode(TEXTS)["dense_vecs"]
    after = trained.encode(TEXTS)["dense_vecs"]
    assert max_diff(saved.encode(TEXTS)["dense_vecs"], after) == 0.0
    assert max_diff(before, after) > 1e-4, "three steps at lr 1e-3 left the vectors where they were"

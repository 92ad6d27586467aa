"""LoRA adapters (m3embed.lora): the same loss and gradients under every memory strategy, on one
process or two; adapter checkpoints that resume exactly; merged folders that load without peft in
m3embed, FlagEmbedding's FlagLLMModel and sentence-transformers; the errors a user meets.

Gradient comparisons run in float64 (see tests/test_distributed.py): the tolerance is then relative to
each gradient's own scale and far below any real error.
"""

import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("peft")

from m3embed import M3Config, M3Model  # noqa: E402
from m3embed.distributed import all_reduce_gradients  # noqa: E402
from m3embed.losses import LossConfig  # noqa: E402
from m3embed.memory import MemoryConfig  # noqa: E402
from m3embed.runlog import LOG_FILE, read_log  # noqa: E402
from m3embed.step import train_step  # noqa: E402
from m3embed.testing import sample_texts, tiny_decoder, tiny_decoder_tokenizer  # noqa: E402
from m3embed.train import RunConfig, train  # noqa: E402

KINDS = ("qwen3", "llama")
B, G = 3, 3
QUERIES = sample_texts(B, seed=1, min_words=1, max_words=10)
PASSAGES = sample_texts(B * G, seed=2, min_words=3, max_words=40)
TEXTS = sample_texts(5, seed=7, min_words=2, max_words=30)
STRATEGIES = {
    "none": MemoryConfig("none", sub_batch_size=2),  # the same sub-batches: the same dropout masks
    "checkpoint": MemoryConfig("checkpoint", sub_batch_size=2),
    "cache": MemoryConfig("cache", sub_batch_size=2),
    "cache + layer checkpointing": MemoryConfig("cache", sub_batch_size=2, layer_checkpointing=True),
}


def lora_model(kind, heads="dense", dropout=0.1, tokenizer=None, rank=4):
    """A tiny random decoder (float64) with rank-4 adapters whose B matrices are random, not LoRA's
    zeros: with B = 0 the gradient of every A is zero and a wrong one would pass unseen."""
    config = M3Config(pooling="last_token", use_sparse=heads == "all", use_colbert=heads == "all")
    model = tiny_decoder(kind, dropout=dropout, config=config, tokenizer=tokenizer, seed=0)
    model.add_lora(rank=rank, dropout=dropout, target_modules=("q_proj", "v_proj", "down_proj"))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.double()


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def step(kind, side, memory, heads):
    model = lora_model(kind, heads)
    model.tokenizer.padding_side = side
    model.train()
    torch.manual_seed(1234)  # the dropout masks of this step, LoRA's included
    parts = train_step(model, QUERIES, PASSAGES, G, memory=memory, loss=LossConfig(heads=heads))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return parts, grads, model


@pytest.mark.parametrize("heads", ["dense", "all"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_strategy_gives_the_same_loss_and_adapter_gradients(kind, side, heads):
    """float64, dropout 0.1 in the attention and in LoRA, ragged sub-batches of 2 (3 queries, 9 passages)."""
    ref_parts, ref_grads, model = step(kind, side, STRATEGIES["none"], heads)
    names = trainable(model)
    assert ref_grads.keys() == names, "only the adapters and heads get gradients"
    assert all("lora_" in n or "_linear" in n for n in names), sorted(names)
    assert any("lora_A" in n for n in names) and (heads == "dense" or any("_linear" in n for n in names))
    for label, memory in list(STRATEGIES.items())[1:]:
        parts, grads, _ = step(kind, side, memory, heads)
        for k in ref_parts:
            assert parts[k] == pytest.approx(ref_parts[k], rel=1e-9, abs=1e-12), (
                label,
                k,
                parts[k],
                ref_parts[k],
            )
        assert grads.keys() == ref_grads.keys(), label
        for name, want in ref_grads.items():
            err, scale = float((grads[name] - want).abs().max()), float(want.abs().max())
            assert scale > 0, f"{name}: zero gradient"
            assert err <= 1e-9 * scale, f"{label} {name}: off by {err:.2e} (gradient scale {scale:.2e})"


def test_lora_dropout_is_on_in_training_and_replayed_by_the_cache():
    """The equivalence above means something for LoRA's dropout only if it acts: two steps with other
    dropout masks give other adapter gradients."""
    model = lora_model("qwen3")
    model.train()
    grads = []
    for seed in (1, 2):
        model.zero_grad()
        torch.manual_seed(seed)
        train_step(model, QUERIES, PASSAGES, G, memory=STRATEGIES["cache"])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "lora_A" in n})
    assert any(not torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


# ---------------------------------------------------------------------- two processes
WORLD = 2


def _worker(rank, port, tok_dir, out_dir):
    from transformers import AutoTokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    model = lora_model("qwen3", "all", dropout=0.0, tokenizer=AutoTokenizer.from_pretrained(tok_dir)).train()
    n = 2
    from m3embed.distributed import CrossDeviceGather

    parts = train_step(
        model,
        (QUERIES + QUERIES)[rank * n : (rank + 1) * n],
        (PASSAGES + PASSAGES)[rank * n * G : (rank + 1) * n * G],
        G,
        memory=STRATEGIES["cache + layer checkpointing"],
        loss=LossConfig(heads="all"),
        gather=CrossDeviceGather("all"),
    )
    all_reduce_gradients(model)
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    torch.save({"parts": parts, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_with_half_the_batch_each_equal_one_process(tmp_path):
    import socket

    from transformers import AutoTokenizer

    tok_dir = tmp_path / "tok"
    tiny_decoder_tokenizer("qwen3").save_pretrained(tok_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tok_dir), str(tmp_path)), nprocs=WORLD, join=True)
    model = lora_model("qwen3", "all", dropout=0.0, tokenizer=AutoTokenizer.from_pretrained(tok_dir)).train()
    ref_parts = train_step(
        model,
        (QUERIES + QUERIES)[:4],
        (PASSAGES + PASSAGES)[: 4 * G],
        G,
        memory=STRATEGIES["none"],
        loss=LossConfig(heads="all"),
    )
    ref = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["grads"].keys() == ref.keys() == trainable(model)
        assert got["parts"]["loss"] == pytest.approx(ref_parts["loss"], rel=1e-9)
        for name, want in ref.items():
            err, scale = float((got["grads"][name] - want).abs().max()), float(want.abs().max())
            assert err <= 1e-9 * scale, f"rank {rank} {name}: off by {err:.2e} (scale {scale:.2e})"


# ---------------------------------------------------------------------- folders
def test_an_adapter_folder_reloads_on_its_base_and_a_merged_folder_loads_everywhere(tmp_path):
    """The adapter folder (peft's layout + heads) gives the trained model's vectors exactly; the merged
    folder gives them within 1e-5 in m3embed (no peft involved), FlagLLMModel and SentenceTransformer."""
    base = tmp_path / "base"
    tiny_decoder("qwen3", dropout=0.0).save_pretrained(base)
    model = M3Model.from_pretrained(base).add_lora(rank=4)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    want = model.encode(TEXTS)["dense_vecs"]
    assert np.abs(want - M3Model.from_pretrained(base).encode(TEXTS)["dense_vecs"]).max() > 1e-3
    model.save_pretrained(tmp_path / "adapter")
    model.save_pretrained(tmp_path / "merged", merged=True)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert not (tmp_path / "adapter" / "model.safetensors").exists()

    again = M3Model.from_pretrained(tmp_path / "adapter")
    assert np.array_equal(again.encode(TEXTS)["dense_vecs"], want)
    merged = M3Model.from_pretrained(tmp_path / "merged")
    assert not hasattr(merged.backbone, "peft_config")
    assert np.abs(merged.encode(TEXTS)["dense_vecs"] - want).max() < 1e-5

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tmp_path / "merged"), device="cpu")
    assert np.abs(st.encode(TEXTS, normalize_embeddings=True) - want).max() < 1e-5
    from m3embed.peers import load_flagembedding_llm

    flag = load_flagembedding_llm().BaseLLMEmbedder(
        str(tmp_path / "merged"), use_fp16=False, devices="cpu", query_instruction_for_retrieval=None
    )
    got = flag.encode_corpus(TEXTS, batch_size=2, max_length=128)
    assert np.abs(got - want).max() < 1e-5


# ---------------------------------------------------------------------- training
def _lines(tmp_path):
    queries = sample_texts(8, seed=4, min_words=2, max_words=8)
    passages = sample_texts(32, seed=5, min_words=5, max_words=30)
    lines = [
        {"query": q, "pos": [passages[4 * i]], "neg": passages[4 * i + 1 : 4 * i + 4]}
        for i, q in enumerate(queries)
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _config(base, data, out, **train_kw):
    train = {
        "model_name_or_path": str(base),
        "output_dir": str(out),
        "max_steps": 4,
        "learning_rate": 1e-3,
        "progress_bar": False,
        "lora_rank": 4,
        **train_kw,
    }
    return RunConfig.from_dict(
        {
            "train": train,
            "data": {"train_data": str(data), "train_group_size": G, "batch_size": 2},
            "memory": {"strategy": "cache", "sub_batch_size": 2},
        }
    )


class Killed(Exception):
    pass


def test_a_lora_run_killed_and_resumed_gives_the_uninterrupted_losses_exactly(tmp_path):
    base = tmp_path / "base"
    tiny_decoder("qwen3", dropout=0.1).save_pretrained(base)
    data = _lines(tmp_path)
    full = train(_config(base, data, tmp_path / "full"))
    ckpt = full.checkpoint
    assert (ckpt / "adapter_model.safetensors").exists() and (ckpt / "optimizer.pt").exists()
    assert not (ckpt / "model.safetensors").exists(), "a LoRA checkpoint holds the adapter, not the model"
    assert (ckpt / "merged" / "model.safetensors").exists(), "the last checkpoint gets the merged model"
    np.testing.assert_allclose(
        M3Model.from_pretrained(ckpt / "merged").encode(TEXTS)["dense_vecs"],
        M3Model.from_pretrained(ckpt).encode(TEXTS)["dense_vecs"],
        atol=1e-5,
    )

    def kill_at_3(step, metrics):
        if step == 3:
            raise Killed

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train(_config(base, data, out, save_steps=2), on_step=kill_at_3)
    assert not (out / "checkpoint-2" / "merged").exists(), "merged only at the end unless --save-merged"
    resumed = train(_config(base, data, out, save_steps=2, resume="latest"))
    assert resumed.losses == full.losses[2:], (resumed.losses, full.losses)
    logged = [e["loss"] for e in read_log(out / LOG_FILE) if "loss" in e]
    assert logged == full.losses


def test_bf16_base_weights_train_fp32_adapters_and_heads(tmp_path):
    base = tmp_path / "base"
    tiny_decoder("qwen3", dropout=0.1).save_pretrained(base)
    data = _lines(tmp_path)
    result = train(_config(base, data, tmp_path / "run", dtype="bfloat16", max_steps=2, save_merged=True))
    assert all(np.isfinite(result.losses)), result.losses
    model = M3Model.from_pretrained(result.checkpoint, torch_dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert (result.checkpoint / "merged").exists() and (tmp_path / "run" / "checkpoint-2" / "merged").exists()


# ---------------------------------------------------------------------- bad input
def test_bad_lora_input_gets_one_line_naming_the_flag(tmp_path, capsys, monkeypatch):
    from m3embed.cli import main

    with pytest.raises(ValueError, match="--lora-target-modules nope: the Qwen3Model has no such module"):
        tiny_decoder("qwen3").add_lora(rank=2, target_modules=("nope",))
    with pytest.raises(ValueError, match="TrainConfig.dtype bfloat16 .*--lora-rank"):
        RunConfig.from_dict({"train": {"dtype": "bfloat16"}})
    base = tmp_path / "base"
    tiny_decoder("qwen3").save_pretrained(base)
    data = _lines(tmp_path)
    argv = ["train", "--model", str(base), "--train-data", str(data), "--output-dir", str(tmp_path / "o")]
    assert main([*argv, "--lora-rank", "2", "--lora-target-modules", "query", "value"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "--lora-target-modules query value" in err[-1], err
    assert main([*argv, "--dtype", "float16"]) != 0
    assert "--lora-rank" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "peft", None)  # peft not installed
    assert main([*argv, "--lora-rank", "2", "--batch-size", "2"]) == 2
    assert "pip install 'm3embed[lora]'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists(), "nothing written"


def test_a_dtype_the_device_cannot_run_is_one_line_naming_the_flag(tmp_path, capsys, monkeypatch):
    """This CPU runs both 16-bit dtypes, so the failing kernel and the GPU without bf16 are simulated."""
    from m3embed.cli import main
    from m3embed.lora import check_dtype_runs

    linear = torch.nn.functional.linear

    def no_half(x, w, b=None):
        if x.dtype == torch.float16:
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")
        return linear(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", no_half)
    base = tmp_path / "base"
    tiny_decoder("qwen3").save_pretrained(base)
    out = tmp_path / "o"
    argv = ["train", "--model", str(base), "--train-data", str(_lines(tmp_path)), "--output-dir", str(out)]
    assert main([*argv, "--lora-rank", "2", "--dtype", "float16", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("m3embed train: error: --dtype float16 cannot run on cpu"), err
    assert "Traceback" not in "\n".join(err), err
    assert not out.exists(), "nothing written"
    check_dtype_runs(torch.bfloat16, torch.device("cpu"))  # the real kernel passes

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ValueError, match=r"^--dtype bfloat16: Tesla T4 has no bfloat16 support$"):
        check_dtype_runs(torch.bfloat16, torch.device("cuda"))

"""2 gloo processes × B/2 give the gradient of 1 process × B (docs/design.md, "Distributed").

The models run in float64: in float32 the two runs sum the embedding gradient's rows in another order
(per rank, then across ranks) and pad texts differently, which moves elements near zero by ~1e-6, the
size of the contract's atol; in float64 that noise is ~1e-15 and any real error still shows.
"""

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from m3embed.distributed import CrossDeviceGather, all_reduce_gradients
from m3embed.losses import LossConfig, batch_scores, contrastive_loss, m3_loss
from m3embed.memory import MemoryConfig
from m3embed.scores import dense_scores
from m3embed.step import train_step
from m3embed.testing import sample_texts, tiny_model, tiny_tokenizer

B, G, WORLD = 4, 3, 2
QUERIES = sample_texts(B, seed=1, min_words=1, max_words=12)
PASSAGES = sample_texts(B * G, seed=2, min_words=3, max_words=40)
TEACHER = torch.randn(B, G, generator=torch.Generator().manual_seed(3))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def step(model, queries, passages, teacher, strategy, gather=None, scaler=None):
    """``scaler`` runs the encoder under float16 autocast with that loss scaler (test_fp16)."""
    loss = LossConfig(kd_loss_type="kl_div")
    return train_step(
        model,
        queries,
        passages,
        G,
        memory=MemoryConfig(strategy, sub_batch_size=3),
        loss=loss,
        teacher_scores=teacher,
        autocast_dtype=None if scaler is None else torch.float16,
        scaler=scaler,
        gather=gather,
    )


def worker(rank, port, tok_dir, out_dir, strategy, fail_rank, negatives="all", fp16_scale=None):
    """One rank's step; float64, or float32 weights under fp16 autocast with a loss scaler starting at
    ``fp16_scale`` (its gradients saved scaled)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=__import__("datetime").timedelta(seconds=20)
    )
    from transformers import AutoTokenizer

    model = tiny_model(tokenizer=AutoTokenizer.from_pretrained(tok_dir), dropout=0.0, seed=0)
    model = model.train() if fp16_scale else model.double().train()
    scaler = torch.amp.GradScaler("cpu", init_scale=fp16_scale) if fp16_scale else None
    n = B // WORLD
    queries = QUERIES[rank * n : (rank + 1) * n]
    passages = PASSAGES[rank * n * G : (rank + 1) * n * G]
    try:
        if rank == fail_rank:  # the encoder itself fails, inside train_step, after the other rank started it

            def broken_forward(*args, **kwargs):
                raise RuntimeError("injected failure")

            model.forward = broken_forward
        gather = CrossDeviceGather(negatives)
        parts = step(model, queries, passages, TEACHER[rank * n : (rank + 1) * n], strategy, gather, scaler)
        all_reduce_gradients(model)
        torch.save({"parts": parts, "grads": grads_of(model)}, os.path.join(out_dir, f"rank{rank}.pt"))
    except Exception as err:
        raise RuntimeError(f"rank {rank} failed: {err}") from err
    # Both ranks done before either tears gloo down (a rank that destroys its group while the other
    # is still finishing the last all-reduce can abort: "terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(tmp_path, tok_dir, strategy, fail_rank=-1, negatives="all", fp16_scale=None) -> list[dict]:
    """Spawn the WORLD ranks of :func:`worker` and return what each saved (its parts and gradients)."""
    args = (free_port(), tok_dir, str(tmp_path), strategy, fail_rank, negatives, fp16_scale)
    mp.spawn(worker, args=args, nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("strategy", ["none", "checkpoint", "cache"])
def test_two_processes_equal_one_process(tmp_path, tok_dir, strategy):
    from transformers import AutoTokenizer

    outs = run_ranks(tmp_path, tok_dir, strategy)
    model = tiny_model(tokenizer=AutoTokenizer.from_pretrained(tok_dir), dropout=0.0, seed=0).double()
    model.train()
    ref_parts = step(model, QUERIES, PASSAGES, TEACHER, "none")
    ref = grads_of(model)
    for got in outs:
        for key, value in ref_parts.items():
            assert got["parts"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
        for name, grad in ref.items():
            assert torch.allclose(got["grads"][name], grad, rtol=1e-4, atol=1e-6), name


def test_a_failing_rank_ends_the_job_with_its_rank_named(tmp_path, tok_dir):
    start = time.monotonic()
    with pytest.raises(Exception, match="rank 1 failed: injected failure"):
        run_ranks(tmp_path, tok_dir, "cache", fail_rank=1)
    assert time.monotonic() - start < 60


def test_flagembedding_style_negatives_dense_global_rest_in_batch(tmp_path, tok_dir):
    """negatives="dense": w_d·CE over the global batch + the mean over ranks of the in-batch rest."""
    from transformers import AutoTokenizer

    outs = run_ranks(tmp_path, tok_dir, "cache", negatives="dense")
    model = tiny_model(tokenizer=AutoTokenizer.from_pretrained(tok_dir), dropout=0.0, seed=0).double()
    model.train()
    cfg = LossConfig(kd_loss_type="kl_div")
    n = B // WORLD
    # each rank's texts encoded as that rank encodes them (same padding), so only the loss differs
    qs = [model(**model.tokenize(QUERIES[r * n : (r + 1) * n], 512)) for r in range(WORLD)]
    ps = [model(**model.tokenize(PASSAGES[r * n * G : (r + 1) * n * G], 512)) for r in range(WORLD)]
    q_dense, p_dense = torch.cat([q.dense for q in qs]), torch.cat([p.dense for p in ps])
    global_scores = dense_scores(q_dense, p_dense) / cfg.temperature
    dense_global = contrastive_loss(global_scores, G, cfg, torch.softmax(TEACHER, -1))
    total = 0
    for r in range(WORLD):
        # m3_loss is linear in its dense term: feeding W·dense to one rank's share and 0 to the others
        # counts the global dense loss once and averages the in-batch rest over ranks.
        dense_term = dense_global * (WORLD if r == 0 else 0)
        local = m3_loss(batch_scores(qs[r], ps[r], cfg), G, cfg, 0, TEACHER[r * n : (r + 1) * n], dense_term)
        total = total + local.loss / WORLD
    total.backward()
    for got in outs:
        assert got["parts"]["dense"] == pytest.approx(float(dense_global.detach()), rel=1e-5)
        for name, param in model.named_parameters():
            diff = (got["grads"][name] - param.grad).abs().max()
            assert torch.allclose(got["grads"][name], param.grad, rtol=1e-4, atol=1e-6), (name, float(diff))

"""The memory strategies give the loss and gradients of plain autograd (docs/design.md, "Memory").

The models run in float64. In float32, two runs of the same strategy on an AMD EPYC already differed
by up to 2e-5 on single elements of the word-embedding gradient (multi-threaded reductions do not fix
their summation order), which is above the contract's atol of 1e-6 and made the suite fail at random;
in float64 that noise is ~1e-15, so the tolerances below are far tighter than the contract's and any
real error (a lost row, a wrong dropout mask, a missing gradient path) still shows.
"""

import pytest
import torch

from m3embed import M3Config
from m3embed.losses import LossConfig
from m3embed.memory import MemoryConfig, RandContext, TokenBatch, choose_sub_batch_size, plan_sub_batches
from m3embed.step import train_step
from m3embed.testing import sample_texts, tiny_model

B, G = 5, 3  # 5 queries, 15 passages: sub-batches of 4 leave uneven last ones (4+1, 4+4+4+3)
QUERIES = sample_texts(B, seed=1, min_words=1, max_words=10)
PASSAGES = sample_texts(B * G, seed=2, min_words=3, max_words=40)
TEACHER = torch.randn(B, G, generator=torch.Generator().manual_seed(3))


def run(tokenizer, strategy, *, config=None, loss=None, teacher=None, dropout=0.1, kind="xlmr", **memory):
    model = tiny_model(kind, tokenizer=tokenizer, config=config, dropout=dropout, seed=0).double()
    model.train()
    torch.manual_seed(1234)  # the dropout masks of this step
    parts = train_step(
        model,
        QUERIES,
        PASSAGES,
        G,
        memory=MemoryConfig(strategy, **memory),
        loss=loss,
        teacher_scores=teacher,
    )
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return parts, grads, torch.get_rng_state()


def assert_same(ref, other, rtol=1e-9, atol=1e-10):
    parts_ref, grads_ref, rng_ref = ref
    parts, grads, rng = other
    assert parts.keys() == parts_ref.keys()
    for k in parts_ref:
        assert parts[k] == pytest.approx(parts_ref[k], rel=rtol, abs=atol), k
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], rtol, atol, name)
    assert torch.equal(rng, rng_ref), "a strategy left the global RNG somewhere else"


def assert_close(got, want, rtol, atol, name):
    """allclose, and on failure the numbers: worst element, its values and the gradient's scale."""
    excess = (got - want).abs() - (atol + rtol * want.abs())
    if bool((excess > 0).any()):
        worst = int(excess.flatten().argmax())
        raise AssertionError(
            f"{name}: {int((excess > 0).sum())} of {want.numel()} elements differ; worst at flat index "
            f"{worst}: got {got.flatten()[worst].item():.6g}, want {want.flatten()[worst].item():.6g} "
            f"(max |diff| {(got - want).abs().max().item():.3g}, gradient scale max|want| "
            f"{want.abs().max().item():.3g}, rtol {rtol}, atol {atol})"
        )


CASES = {
    "all heads + self-distillation": dict(),
    "teacher scores, kl_div": dict(loss=LossConfig(kd_loss_type="kl_div"), teacher=TEACHER),
    "teacher scores, m3_kd_loss": dict(loss=LossConfig(kd_loss_type="m3_kd_loss"), teacher=TEACHER),
    "dense only": dict(config=M3Config(use_sparse=False, use_colbert=False), loss=LossConfig(heads="dense")),
    "mean pooling, no self-distillation": dict(
        config=M3Config(pooling="mean"), loss=LossConfig(self_distill=False)
    ),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("strategy", ["checkpoint", "cache"])
def test_strategies_match_plain_autograd(xlmr_tokenizer, case, strategy):
    kwargs = CASES[case]
    ref = run(xlmr_tokenizer, "none", sub_batch_size=4, **kwargs)
    assert len(ref[1]) == sum(
        1 for _ in tiny_model(tokenizer=xlmr_tokenizer, config=kwargs.get("config")).parameters()
    )
    assert_same(ref, run(xlmr_tokenizer, strategy, sub_batch_size=4, **kwargs))


@pytest.mark.parametrize("case", ["all heads + self-distillation", "dense only"])
@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_cache_with_layer_checkpointing_matches_every_strategy(case, kind, request):
    """``cache`` whose grad passes run under the encoder's layer checkpointing: the loss and every
    parameter's gradient of ``none``, ``checkpoint`` and ``cache`` (dropout on; sub-batches of 4 leave
    ragged last ones: queries 4+1, passages 4+4+4+3)."""
    tokenizer = request.getfixturevalue(f"{kind}_tokenizer")
    kwargs = {**CASES[case], "kind": kind, "sub_batch_size": 4}
    layers = run(tokenizer, "cache", layer_checkpointing=True, **kwargs)
    for strategy in ("none", "checkpoint", "cache"):
        assert_same(run(tokenizer, strategy, **kwargs), layers)


def test_layer_checkpointing_without_encoder_support_checkpoints_whole_sub_batches(xlmr_tokenizer):
    """run_step's fallback for an encode function whose layers it cannot switch: each grad pass of
    ``cache`` is checkpointed as a whole, with the same loss and gradients."""
    from m3embed.losses import M3Objective
    from m3embed.memory import run_step

    results = []
    for memory in (
        MemoryConfig("none", sub_batch_size=4),
        MemoryConfig("cache", 4, layer_checkpointing=True),
    ):
        model = tiny_model(tokenizer=xlmr_tokenizer, seed=0).double().train()
        q, p = TokenBatch(**model.tokenize(QUERIES, 64)), TokenBatch(**model.tokenize(PASSAGES, 64))
        torch.manual_seed(7)
        out = run_step(lambda ids, mask, m=model: m(ids, mask), M3Objective(LossConfig(), G), q, p, memory)
        grads = {n: t.grad.clone() for n, t in model.named_parameters()}
        results.append((out.as_floats(), grads, torch.get_rng_state()))
    assert_same(*results)


def test_layer_checkpointing_is_on_for_the_grad_passes_only(xlmr_tokenizer):
    """The passes without grad (steps (1) and (2)) run as without the setting; every pass with grad
    (the kept sub-batch, steps (4) and (5)) runs with the encoder's layers checkpointed; the switch is
    off again after the step."""
    from m3embed.losses import M3Objective
    from m3embed.memory import run_step

    model = tiny_model(tokenizer=xlmr_tokenizer, seed=0).train()
    layers = [m for m in model.backbone.modules() if hasattr(m, "gradient_checkpointing")]
    assert layers, "the backbone has no checkpointable layers: the test sees nothing"
    calls = []

    def encode(ids, mask):
        calls.append((torch.is_grad_enabled(), all(m.gradient_checkpointing for m in layers)))
        return model(ids, mask)

    def switch(on):
        model.gradient_checkpointing_enable() if on else model.gradient_checkpointing_disable()

    q, p = TokenBatch(**model.tokenize(QUERIES, 64)), TokenBatch(**model.tokenize(PASSAGES, 64))
    memory = MemoryConfig("cache", sub_batch_size=4, layer_checkpointing=True)
    run_step(encode, M3Objective(LossConfig(), G), q, p, memory, gradient_checkpointing=switch)
    no_grad, with_grad = (False, False), (True, True)
    # (1) 2 query sub-batches; (2) 3 passage sub-batches + the kept one; (4) 3 again; (5) 2 query ones
    assert calls == [no_grad] * 2 + [no_grad] * 3 + [with_grad] + [with_grad] * 3 + [with_grad] * 2, calls
    assert not any(m.gradient_checkpointing for m in layers)


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_encoders_run_sdpa_attention(tmp_path, kind):
    """The grad passes recompute attention through PyTorch's fused SDPA where transformers offers it:
    its default, kept by our model building and loading."""
    from m3embed.model import M3Model

    model = tiny_model(kind)
    assert model.backbone.config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path)
    assert M3Model.from_pretrained(tmp_path).backbone.config._attn_implementation == "sdpa"


def test_layer_checkpointing_needs_a_strategy_that_can_use_it():
    with pytest.raises(ValueError, match="layer_checkpointing needs strategy 'cache'.*got strategy 'none'"):
        MemoryConfig("none", layer_checkpointing=True)
    assert MemoryConfig("checkpoint", layer_checkpointing=True).layer_checkpointing


def test_token_budget_sub_batches_match(xlmr_tokenizer):
    ref = run(xlmr_tokenizer, "none", sub_batch_size=None, sub_batch_tokens=300)
    assert_same(ref, run(xlmr_tokenizer, "cache", sub_batch_size=None, sub_batch_tokens=300))


def test_result_does_not_depend_on_the_split_without_dropout(xlmr_tokenizer):
    """Padding to each sub-batch's own length and merging back changes nothing.

    Other splits pad texts differently and sum the embedding gradient's rows in another order, which in
    float64 moves elements by ~1e-16; a real error (a lost or misplaced row) is far larger.
    """
    whole = run(xlmr_tokenizer, "none", sub_batch_size=None, dropout=0.0)
    assert_same(whole, run(xlmr_tokenizer, "cache", sub_batch_size=2, dropout=0.0))
    split = run(xlmr_tokenizer, "checkpoint", sub_batch_size=3, sub_batch_tokens=200, dropout=0.0)
    assert_same(whole, split)


def test_dropout_really_is_on(xlmr_tokenizer):
    """Guards the equivalence tests: different dropout masks must change the gradient."""
    a = run(xlmr_tokenizer, "none", sub_batch_size=4)
    b = run(xlmr_tokenizer, "none", sub_batch_size=2)
    assert any(not torch.allclose(a[1][n], b[1][n], rtol=1e-4, atol=1e-6) for n in a[1])  # far apart


def test_plan_sub_batches_covers_every_row_once_within_budgets():
    lengths = torch.tensor([5, 40, 12, 40, 3, 27, 8, 19, 33])
    plan = plan_sub_batches(lengths, max_size=3, max_tokens=90)
    rows = torch.cat(plan)
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    for sub in plan:
        assert len(sub) <= 3
        assert len(sub) * int(lengths[sub].max()) <= 90 or len(sub) == 1
    longest_first = [int(lengths[s].max()) for s in plan]
    assert longest_first == sorted(longest_first, reverse=True)


def test_auto_sub_batch_size_follows_the_budget_and_keeps_rng(xlmr_model):
    xlmr_model.train()
    q = TokenBatch(**xlmr_model.tokenize(QUERIES, 64))
    p = TokenBatch(**xlmr_model.tokenize(PASSAGES, 64))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    small = choose_sub_batch_size(xlmr_model, q, p, MemoryConfig(sub_batch_size="auto", memory_budget=2**20))
    large = choose_sub_batch_size(xlmr_model, q, p, MemoryConfig(sub_batch_size="auto", memory_budget=2**30))
    assert torch.equal(before, torch.get_rng_state())
    assert 1 <= small < large <= len(PASSAGES)
    assert large == len(PASSAGES)


def test_auto_sub_batch_size_is_larger_with_layer_checkpointing(xlmr_tokenizer):
    """The probe measures what a grad pass holds: under layer checkpointing the layers' inputs plus one
    recomputed layer, far less per text than every layer's activations, so more texts fit."""
    model = tiny_model(tokenizer=xlmr_tokenizer, layers=6, seed=0).train()
    texts = sample_texts(B * G, seed=2, min_words=60, max_words=80)
    q, p = TokenBatch(**model.tokenize(QUERIES, 64)), TokenBatch(**model.tokenize(texts, 128))

    def switch(on):
        model.gradient_checkpointing_enable() if on else model.gradient_checkpointing_disable()

    budget = 8 * 2**20  # ~2 texts of 128 tokens without checkpointing (3.9 MB each), ~10 with (0.7 MB)
    plain = choose_sub_batch_size(model, q, p, MemoryConfig(sub_batch_size="auto", memory_budget=budget))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    layers = MemoryConfig(sub_batch_size="auto", memory_budget=budget, layer_checkpointing=True)
    checkpointed = choose_sub_batch_size(model, q, p, layers, gradient_checkpointing=switch)
    assert torch.equal(before, torch.get_rng_state())
    assert all(t.grad is None for t in model.parameters()), "the probe must leave no gradient behind"
    assert plain >= 1 and checkpointed >= 3 * plain, (plain, checkpointed)


def test_rand_context_replays_dropout():
    ctx = RandContext(torch.device("cpu"))
    first = torch.rand(3)
    after = torch.get_rng_state()
    with ctx:
        assert torch.equal(torch.rand(3), first)
    assert torch.equal(torch.get_rng_state(), after)


def test_train_step_rejects_bad_shapes(xlmr_model):
    with pytest.raises(ValueError, match="group_size"):
        train_step(xlmr_model, QUERIES, PASSAGES[:-1], G)
    with pytest.raises(ValueError, match="index 1"):
        train_step(xlmr_model, ["a", " ", "c", "d", "e"], PASSAGES, G)
    with pytest.raises(ValueError, match="strategy"):
        MemoryConfig(strategy="fast")


def test_checkpoint_without_encoder_support_checkpoints_whole_sub_batches(xlmr_tokenizer):
    """run_step's generic fallback (any encode function) gives plain autograd's gradients too."""
    from m3embed.losses import M3Objective
    from m3embed.memory import run_step

    results = []
    for strategy in ("none", "checkpoint"):
        model = tiny_model(tokenizer=xlmr_tokenizer, seed=0).double().train()
        q = TokenBatch(**model.tokenize(QUERIES, 64))
        p = TokenBatch(**model.tokenize(PASSAGES, 64))
        cfg = LossConfig()
        torch.manual_seed(7)
        out = run_step(
            lambda ids, mask, m=model: m(ids, mask),
            M3Objective(cfg, G),
            q,
            p,
            MemoryConfig(strategy, sub_batch_size=4),
        )
        results.append(
            (out.as_floats(), {n: t.grad.clone() for n, t in model.named_parameters()}, torch.get_rng_state())
        )
    assert_same(*results)


@pytest.mark.parametrize("strategy", ["none", "cache"])
def test_cache_holds_no_passage_representation_at_the_loss(xlmr_tokenizer, strategy):
    """Score-level caching: when the loss runs, only the last passage sub-batch's representations are
    alive (its graph is kept for step (4)); ``none``, the control, holds the whole batch's. The
    passages were scored one sub-batch at a time."""
    import gc
    import weakref

    from m3embed.losses import M3Objective
    from m3embed.memory import run_step

    seen: list[weakref.ref] = []
    blocks: list[int] = []
    alive_at_loss: list[int] = []
    alive_rows: list[int] = []

    class Watching(M3Objective):
        def scores(self, queries, passages):
            seen.extend(weakref.ref(t) for t in passages.float_tensors().values())
            blocks.append(len(passages))
            return super().scores(queries, passages)

        def loss(self, scores):
            gc.collect()
            alive_at_loss.append(sum(ref() is not None for ref in seen))
            alive_rows.extend(len(ref()) for ref in seen if ref() is not None)
            return super().loss(scores)

    model = tiny_model(tokenizer=xlmr_tokenizer, seed=0).train()
    q = TokenBatch(**model.tokenize(QUERIES, 64))
    p = TokenBatch(**model.tokenize(PASSAGES, 64))
    run_step(model, Watching(LossConfig(), G), q, p, MemoryConfig(strategy, sub_batch_size=4))
    if strategy == "cache":
        assert alive_at_loss == [3], alive_at_loss  # dense, sparse weights, ColBERT of 1 sub-batch
        assert len(set(alive_rows)) == 1 and alive_rows[0] <= 4, alive_rows
        # step (2): every sub-batch; step (4): all but the last, whose graph was kept
        assert blocks == [4, 4, 4, 3] + [4, 4, 4], blocks
    else:
        assert alive_at_loss == [3], alive_at_loss  # dense, sparse weights, ColBERT of the whole batch
        assert blocks == [len(PASSAGES)], blocks

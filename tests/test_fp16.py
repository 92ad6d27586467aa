"""fp16 with dynamic loss scaling: the scale enters once, at the loss, and the three strategies give the
same unscaled gradients (docs/design.md, "Memory"; issue 19). The encoder runs under CPU float16
autocast with ``torch.amp.GradScaler("cpu")``; dropout on, ragged last sub-batches and padding as in
test_step.

Tolerances, from fp16's unit roundoff u = 2**-11:

- Strategy against strategy. The encoder's forward is the same kernels on the same sub-batches in
  every strategy, so the fp16 activations are identical; what differs is the fp32 summation order
  of the scores and of the queries' gradients (accumulated over passage blocks by ``cache``). A
  difference of a few fp32 ulps can move an fp16 rounding of a backward tensor by one ulp (2u
  relative), and each fp16 rounding on the backward path can add one: about 5 per encoder layer
  (the grad inputs of the output, intermediate, attention-output and q/k/v linears and of the GELU)
  plus 2 for the heads and the cast of the representations, D = 5·layers + 2. So every gradient
  element must agree within ``2u·D`` of its module's gradient scale (max |grad| over the module's
  weight and bias: a bias gradient sums the same per-token terms as its weight's, and the key
  biases' true gradient is exactly 0 — softmax ignores a shift shared by every key — so their
  computed values are rounding noise of those terms). For 2 layers: 24u ≈ 1.2e-2. A real error
  (a lost row, another dropout mask, the scale applied twice or not at all) is O(1) or a factor
  2**10. The loss is computed from identical activations in fp32 and must agree to 1e-4 relative
  (fp32 reassociation over the ~10³ terms of a score, n·2**-24).
- fp16 against fp32 (loose, to show it is the right gradient): now the forward differs too, by up to
  u per rounding over D forward and D backward roundings: ``4u·D`` of the module's gradient scale
  (≈ 2.3e-2 for 2 layers), and 2u·D relative on the loss.
"""

import pytest
import torch

from m3embed.losses import LossConfig, M3Objective
from m3embed.memory import MemoryConfig, TokenBatch, run_step
from m3embed.step import ScaledObjective, _autocast, train_step
from m3embed.testing import tiny_model
from test_distributed import PASSAGES as PASSAGES_D
from test_distributed import QUERIES as QUERIES_D
from test_distributed import TEACHER as TEACHER_D
from test_distributed import run_ranks, tok_dir  # noqa: F401 (module fixture used by name)
from test_distributed import step as distributed_step
from test_step import PASSAGES, QUERIES, G, assert_close

U = 2.0**-11
LAYERS = 2  # tiny_model's default
D = 5 * LAYERS + 2  # fp16 roundings on the deepest backward path (module docstring)
STRATEGY_TOL = 2 * U * D
FP32_TOL = 4 * U * D
SCALE = 2.0**10  # overflows start at 2**14 for these models and texts (measured); well below
HUGE = 2.0**40


def run(tokenizer, strategy, *, fp16=True, scale=SCALE, seed=1234, state=None):
    """One step; returns the parts, the UNSCALED gradients, and (model, scaler, optimiser), which
    ``state`` passes back in to take the next step with them."""
    if state is None:
        model = tiny_model(tokenizer=tokenizer, dropout=0.1, seed=0).train()
        scaler = torch.amp.GradScaler("cpu", init_scale=scale) if fp16 else None
        state = model, scaler, torch.optim.SGD(model.parameters(), lr=1.0)
    model, scaler, optimizer = state
    optimizer.zero_grad()
    torch.manual_seed(seed)  # the dropout masks of this step
    parts = train_step(
        model,
        QUERIES,
        PASSAGES,
        G,
        memory=MemoryConfig(strategy, sub_batch_size=4),
        autocast_dtype=torch.float16 if fp16 else None,
        scaler=scaler,
    )
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return parts, grads, state


def assert_same_gradients(got, want, tol):
    """Each element within ``tol`` of its module's gradient scale (module docstring)."""
    assert got.keys() == want.keys()
    modules: dict[str, float] = {}
    for name, g in want.items():
        module = name.rsplit(".", 1)[0]
        modules[module] = max(modules.get(module, 0.0), g.abs().max().item())
    for name, g in want.items():
        assert_close(got[name], g, 0.0, tol * modules[name.rsplit(".", 1)[0]], name)


@pytest.mark.parametrize("strategy", ["checkpoint", "cache"])
def test_strategies_match_under_fp16_with_a_scaler(xlmr_tokenizer, strategy):
    parts_ref, ref, _ = run(xlmr_tokenizer, "none")
    parts, got, _ = run(xlmr_tokenizer, strategy)
    assert parts.keys() == parts_ref.keys()
    for k in parts_ref:
        assert parts[k] == pytest.approx(parts_ref[k], rel=1e-4), k
    assert_same_gradients(got, ref, STRATEGY_TOL)


@pytest.mark.parametrize("strategy", ["none", "cache"])
def test_fp16_gives_the_fp32_gradient_unscaled(xlmr_tokenizer, strategy):
    """The returned loss and the gradients after ``unscale_`` are fp32's: the scale entered exactly once
    (twice or never would leave a factor of 2**10)."""
    parts32, ref, _ = run(xlmr_tokenizer, "none", fp16=False)
    parts16, got, _ = run(xlmr_tokenizer, strategy)
    for k in parts32:
        assert parts16[k] == pytest.approx(parts32[k], rel=2 * U * D), k
    assert_same_gradients(got, ref, FP32_TOL)


def test_scores_and_loss_stay_fp32_under_fp16_autocast(xlmr_model):
    dtypes = []

    class Watching(M3Objective):
        def scores(self, queries, passages):
            out = super().scores(queries, passages)
            dtypes.extend(t.dtype for t in out.tensors().values())
            return out

        def loss(self, scores):
            out = super().loss(scores)
            dtypes.append(out.loss.dtype)
            return out

    xlmr_model.train()
    q = TokenBatch(**xlmr_model.tokenize(QUERIES, 64))
    p = TokenBatch(**xlmr_model.tokenize(PASSAGES, 64))
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    encode = _autocast(xlmr_model, xlmr_model.device, torch.float16)
    out = run_step(encode, ScaledObjective(Watching(LossConfig(), G), scaler), q, p, MemoryConfig("cache", 4))
    assert set(dtypes) == {torch.float32}, dtypes
    assert out.loss.dtype == torch.float32 and out.loss == pytest.approx(SCALE * out.unscaled)


@pytest.mark.parametrize("strategy", ["none", "checkpoint", "cache"])
def test_an_overflowing_step_is_skipped_and_the_scale_backs_off(xlmr_tokenizer, strategy):
    _, grads, state = run(xlmr_tokenizer, strategy, scale=HUGE)
    model, scaler, optimizer = state
    assert not all(torch.isfinite(g).all() for g in grads.values()), "2**40 should overflow fp16"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler.step(optimizer)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed in a step that overflowed"
    scaler.update()
    assert scaler.get_scale() == HUGE / 2

    for seed in range(40):  # the scale halves after each overflow: finite from 2**13 here (measured)
        _, grads, _ = run(xlmr_tokenizer, strategy, seed=seed, state=state)
        finite = all(torch.isfinite(g).all() for g in grads.values())
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        if finite:
            break
    else:
        pytest.fail(f"still overflowing at scale {scaler.get_scale()}")
    assert scale < 2.0**14 and scaler.get_scale() == scale  # a good step keeps the scale
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters()), "the good step applied"


@pytest.mark.parametrize("strategy", ["none", "cache"])
def test_two_processes_equal_one_process_under_fp16(tmp_path, tok_dir, strategy):  # noqa: F811
    from transformers import AutoTokenizer

    got = run_ranks(tmp_path, tok_dir, strategy, fp16_scale=SCALE)
    model = tiny_model(tokenizer=AutoTokenizer.from_pretrained(tok_dir), dropout=0.0, seed=0).train()
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    ref_parts = distributed_step(model, QUERIES_D, PASSAGES_D, TEACHER_D, "none", scaler=scaler)
    ref = {n: p.grad / SCALE for n, p in model.named_parameters()}
    for rank_out in got:
        for key, value in ref_parts.items():
            assert rank_out["parts"][key] == pytest.approx(value, rel=2 * U * D), key
        assert_same_gradients({n: g / SCALE for n, g in rank_out["grads"].items()}, ref, FP32_TOL)

"""The lean LoRA forward (m3embed.lora_lean): the same update and gradients as peft's own forward,
with dropout on, in float64 and under bf16 autocast; less saved for backward; peft's forward kept for
the cases it does not cover."""

import pytest
import torch

pytest.importorskip("peft")

from m3embed import M3Config  # noqa: E402
from m3embed.lora_lean import LoraDelta  # noqa: E402
from m3embed.tensor_bytes import saved_bytes  # noqa: E402
from m3embed.testing import sample_texts, tiny_decoder  # noqa: E402

TEXTS = sample_texts(4, seed=3, min_words=3, max_words=30)


def model_pair(dtype):
    """Two identical tiny decoders with adapters (random B): the first with m3embed's lean forward, the
    second with peft's own (the instance attribute removed, so the class's forward runs)."""
    models = []
    for _ in range(2):
        model = tiny_decoder(
            "qwen3",
            dropout=0.1,
            config=M3Config(pooling="last_token", use_sparse=False, use_colbert=False),
            seed=0,
        )
        model.add_lora(rank=4, dropout=0.25, target_modules=("q_proj", "v_proj", "o_proj", "down_proj"))
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        models.append(model.to(dtype).train())
    lean, plain = models
    swapped = [m for m in plain.modules() if "forward" in vars(m)]
    for module in swapped:
        del module.forward
    assert swapped and sum("forward" in vars(m) for m in lean.modules()) == len(swapped)
    return lean, plain


def loss_and_grads(model, autocast=None):
    batch = model.tokenize(TEXTS, max_length=32)
    torch.manual_seed(11)  # the same dropout masks in both models
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        dense = model(batch["input_ids"], batch["attention_mask"]).dense
    weights = torch.linspace(-1, 1, dense.numel(), dtype=torch.float64).view_as(dense)
    loss = (dense.double() * weights).sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    grads = {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}
    return dense.detach().double(), grads


def assert_close(a, b, tol, what):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= tol * max(scale, 1e-30), (
        f"{what}: max error {err:.3e} against scale {scale:.3e} (tol {tol})"
    )


def test_lean_forward_equals_peft_with_dropout_in_float64():
    lean, plain = model_pair(torch.float64)
    dense_lean, grads_lean = loss_and_grads(lean)
    dense_plain, grads_plain = loss_and_grads(plain)
    assert grads_lean.keys() == grads_plain.keys() and any("lora_A" in n for n in grads_lean)
    assert_close(dense_lean, dense_plain, 1e-12, "dense")
    for name in grads_plain:
        assert grads_plain[name].abs().max() > 0, name
        assert_close(grads_lean[name], grads_plain[name], 1e-10, name)


def test_dropout_masks_differ_between_calls_and_match_peft():
    """With dropout 0.25 the update depends on the seed (the mask is real), and peft draws the same."""
    lean, plain = model_pair(torch.float64)
    batch = lean.tokenize(TEXTS, max_length=32)
    outs = []
    for model, seed in ((lean, 1), (lean, 2), (plain, 1)):
        torch.manual_seed(seed)
        outs.append(model(batch["input_ids"], batch["attention_mask"]).dense.detach())
    assert (outs[0] - outs[1]).abs().max() > 1e-6
    assert_close(outs[0], outs[2], 1e-12, "dense, same seed")


def test_lean_forward_under_bf16_autocast_matches_peft():
    lean, plain = model_pair(torch.float32)
    dense_lean, grads_lean = loss_and_grads(lean, autocast=torch.bfloat16)
    dense_plain, grads_plain = loss_and_grads(plain, autocast=torch.bfloat16)
    tol = 4 * 2.0**-8  # a few bf16 roundings
    assert_close(dense_lean, dense_plain, tol, "dense")
    for name in grads_plain:
        assert_close(grads_lean[name], grads_plain[name], tol, name)


def test_lean_forward_saves_a_bool_mask_instead_of_fp32_copies():
    """One adapted projection on bf16 inputs: beyond what the frozen projection saves (its input), the
    lean forward saves a 1-byte mask per input feature and the rank-wide hidden; peft saves the fp32
    dropout output and noise (or mask) on top."""
    lean, plain = model_pair(torch.float32)
    module_lean = lean.backbone.get_base_model().layers[0].mlp.down_proj
    module_plain = plain.backbone.get_base_model().layers[0].mlp.down_proj
    for module in (module_lean, module_plain):
        module.base_layer.to(torch.bfloat16)
    x = torch.randn(6, 10, module_lean.in_features, dtype=torch.bfloat16, requires_grad=True)
    rank = module_lean.lora_A["default"].out_features
    base_only = x.numel() * 2  # the bf16 input the frozen projection keeps
    lean_bytes = saved_bytes(lambda: module_lean(x), exclude=module_lean.parameters())
    plain_bytes = saved_bytes(lambda: module_plain(x), exclude=module_plain.parameters())
    assert lean_bytes == base_only + x.numel() * 1 + 6 * 10 * rank * 4, (lean_bytes, base_only)
    assert plain_bytes >= base_only + x.numel() * 5, (plain_bytes, base_only)


def test_peft_forward_is_used_where_the_lean_one_does_not_apply():
    """Adapters disabled: the base model's output, as peft gives it."""
    lean, plain = model_pair(torch.float64)
    lean.eval(), plain.eval()
    batch = lean.tokenize(TEXTS, max_length=32)
    with lean.backbone.disable_adapter(), plain.backbone.disable_adapter():
        off = lean(batch["input_ids"], batch["attention_mask"]).dense
        off_plain = plain(batch["input_ids"], batch["attention_mask"]).dense
    on = lean(batch["input_ids"], batch["attention_mask"]).dense
    assert_close(off, off_plain, 1e-12, "adapters disabled")
    assert (on - off).abs().max() > 1e-6


def test_lora_delta_gradcheck():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    a = torch.randn(2, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.float64, generator=gen, requires_grad=True)

    def fn(x, a, b):
        torch.manual_seed(3)  # the same mask in every evaluation gradcheck makes
        return LoraDelta.apply(x, a, b, 0.3, 1.5)

    assert torch.autograd.gradcheck(fn, (x, a, b))


def test_dropout_one_goes_through_peft_and_drops_the_whole_update():
    """p = 1 (the Python API allows it; the CLI's bound is < 1): the adapters add nothing, no NaN."""
    model = tiny_decoder(
        "qwen3",
        dropout=0.0,
        config=M3Config(pooling="last_token", use_sparse=False, use_colbert=False),
        seed=0,
    )
    base = model.tokenize(TEXTS, max_length=32)
    model.train()
    without = model(base["input_ids"], base["attention_mask"]).dense.detach()
    model.add_lora(rank=4, dropout=1.0, target_modules=("q_proj", "down_proj"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.5)
    model.train()
    dense = model(base["input_ids"], base["attention_mask"]).dense
    assert torch.isfinite(dense).all()
    assert_close(dense.detach(), without, 1e-6, "dense with every adapter input dropped")

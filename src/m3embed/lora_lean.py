"""A leaner training forward for peft's LoRA ``Linear`` layers: what it saves for backward.

peft computes an adapter's update as ``lora_B(lora_A(dropout(x.to(fp32)))) · scaling``, and autograd
then keeps, per adapted projection and token, the fp32 dropout output (lora_A's input, 4 bytes an
input feature) and the dropout mask (a bool on CUDA; on CPU the fp32 noise, 4 more bytes). With the
7 projections of a decoder layer, that is more than half of what one layer saves for backward, so it
sets the floor of a layer-checkpointed sub-batch.

:class:`LoraDelta` computes the same update and saves only what it cannot recompute: ``x`` itself (in
its own dtype, usually the very tensor the frozen base projection already saved, so no new memory),
the kept positions as a bool mask (1 byte a feature), and the rank-wide ``lora_A`` output. The fp32
dropout output is recomputed in backward. The mask is drawn as PyTorch's CPU dropout draws it (fp32
noise, ``bernoulli_(1 - p)``), so on CPU the update and its gradients equal peft's, bit for bit;
``tests/test_lora_lean.py`` checks that.

:func:`use_lean_forward` puts it on every vanilla LoRA ``Linear`` of a peft model; any other case
(adapters disabled or merged, a per-row ``adapter_names`` batch, DoRA or another variant, several
active adapters, dropout 1) goes through peft's own forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class LoraDelta(torch.autograd.Function):
    """``F.linear(F.linear(dropout(x.to(A.dtype)), A), B) · scaling`` for one adapter, in the autocast
    dtype when autocast is on (as peft's ``lora_A`` / ``lora_B`` calls would be), saving ``x``, a bool
    mask and the rank-wide hidden."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, p: float, scaling: float):
        device = x.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else a.dtype
        with torch.autocast(device, enabled=False):
            keep = None
            if p > 0:  # drawn as aten's CPU dropout draws its noise: fp32 bernoulli_(1 - p)
                keep = torch.empty_like(x, dtype=a.dtype).bernoulli_(1 - p).bool()
            hidden = F.linear(_dropped(x, keep, p, a.dtype).to(compute), a.to(compute))
            out = F.linear(hidden, b.to(compute)) * scaling
        ctx.save_for_backward(x, keep, a, b, hidden)
        ctx.p, ctx.scaling, ctx.compute = p, scaling, compute
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, keep, a, b, hidden = ctx.saved_tensors
        compute = ctx.compute
        with torch.autocast(x.device.type, enabled=False):
            grad = (grad * ctx.scaling).to(compute)
            grad_b = grad.flatten(0, -2).T @ hidden.flatten(0, -2)
            grad_hidden = grad @ b.to(compute)
            dropped = _dropped(x, keep, ctx.p, a.dtype).to(compute)
            grad_a = grad_hidden.flatten(0, -2).T @ dropped.flatten(0, -2)
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = (grad_hidden @ a.to(compute)).to(a.dtype)
                if keep is not None:
                    grad_x = grad_x * _scale(keep, ctx.p, a.dtype)
                grad_x = grad_x.to(x.dtype)
        return grad_x, grad_a.to(a.dtype), grad_b.to(b.dtype), None, None


def _scale(keep: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """Dropout's multiplier: 1 / (1 - p) where kept, 0 elsewhere (aten's ``noise.div_(1 - p)``)."""
    return keep.to(dtype).div_(1 - p)


def _dropped(x: torch.Tensor, keep: torch.Tensor | None, p: float, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(dtype)
    return x if keep is None else x * _scale(keep, p, dtype)


def _lean_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's ``lora.Linear.forward`` with :class:`LoraDelta` for the vanilla one-adapter case."""
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    variants = getattr(self, "lora_variant", {})
    use_dora = getattr(self, "use_dora", {})
    simple = (
        not self.disable_adapters
        and not self.merged
        and not kwargs
        and len(adapters) == 1
        and adapters[0] not in variants
        and not use_dora.get(adapters[0], False)
        and not getattr(self, "lora_bias", {}).get(adapters[0], False)
        and isinstance(self.lora_dropout[adapters[0]], nn.Dropout | nn.Identity)
    )
    dropout = self.lora_dropout[adapters[0]] if simple else None
    p = dropout.p if isinstance(dropout, nn.Dropout) and self.training else 0.0
    if not simple or p >= 1:  # dropout 1 drops everything: 1 / (1 - p) has no value
        return type(self).forward(self, x, *args, **kwargs)
    name = adapters[0]
    result = self.base_layer(x, *args)
    delta = LoraDelta.apply(x, self.lora_A[name].weight, self.lora_B[name].weight, p, self.scaling[name])
    return (result + delta).to(result.dtype)


def use_lean_forward(model: nn.Module) -> None:
    """Give every peft LoRA ``Linear`` in ``model`` the lean forward."""
    from peft.tuners.lora import Linear

    for module in model.modules():
        if type(module) is Linear and getattr(module, "fan_in_fan_out", False) is False:
            module.forward = types.MethodType(_lean_forward, module)

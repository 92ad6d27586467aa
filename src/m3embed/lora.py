"""LoRA adapters on the encoder through peft (the optional ``lora`` extra).

The adapters wrap ``M3Model.backbone`` in a ``peft.PeftModel``; the base weights are frozen (and may
be stored in bf16 / fp16), the adapters are fp32, and the sparse / ColBERT heads stay outside the
wrapper and keep training. Two ways to write such a model:

- the **adapter folder** (what a training checkpoint holds): peft's ``adapter_config.json`` +
  ``adapter_model.safetensors``, whose ``base_model_name_or_path`` names the encoder it adapts, with
  m3embed's heads, tokenizer and ``m3embed_config.json`` beside them;
- the **merged folder**: the full encoder with ``W + (alpha / r)·B·A`` in each adapted weight, which
  loads without peft in ``M3Model.from_pretrained``, FlagEmbedding's ``FlagLLMModel`` and
  ``SentenceTransformer``. The merge is computed into a new state dict, so the training model's own
  weights are never rounded through a merge and unmerge.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from m3embed.lora_lean import use_lean_forward

ADAPTER_CONFIG = "adapter_config.json"  # peft's file names
# FlagEmbedding's decoder-only defaults (finetune.embedder.decoder_only.base.arguments).
DEFAULT_TARGET_MODULES = ("v_proj", "q_proj", "k_proj", "gate_proj", "down_proj", "o_proj", "up_proj")
DEFAULT_ALPHA = 16.0
DEFAULT_DROPOUT = 0.1
INSTALL_HINT = "LoRA needs peft: pip install 'm3embed[lora]' (or pip install peft)"


@dataclass(frozen=True)
class LoraSettings:
    """What :func:`add_lora` puts on the encoder; the defaults are FlagEmbedding's (rank 64 there)."""

    rank: int
    alpha: float = DEFAULT_ALPHA
    dropout: float = DEFAULT_DROPOUT
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES


def is_lora(backbone: nn.Module) -> bool:
    return hasattr(backbone, "peft_config")


def _peft():
    from m3embed.report import MissingExtra

    try:
        import peft
    except ImportError:
        raise MissingExtra(INSTALL_HINT) from None
    return peft


def add_lora(backbone: nn.Module, settings: LoraSettings, base_name_or_path: str | None = None) -> nn.Module:
    """``backbone`` wrapped in a peft LoRA model: base weights frozen, fp32 adapters on the
    ``target_modules`` (module names, matched as peft matches them: the last name components).

    ValueError naming ``--lora-target-modules`` when none of them is a module of ``backbone``.
    """
    peft = _peft()
    if is_lora(backbone):
        raise ValueError("the model already has LoRA adapters")
    targets = list(settings.target_modules)
    names = {name.rsplit(".", 1)[-1] for name, m in backbone.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in targets if t not in names]
    if missing == targets:
        raise ValueError(
            f"--lora-target-modules {' '.join(targets)}: the {type(backbone).__name__} has no such "
            f"module; its linear layers are named {', '.join(sorted(names)) or 'nothing'}"
        )
    config = peft.LoraConfig(
        task_type=peft.TaskType.FEATURE_EXTRACTION,
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
    )
    wrapped = peft.get_peft_model(backbone, config, autocast_adapter_dtype=True)
    use_lean_forward(wrapped)
    if base_name_or_path is not None:
        wrapped.peft_config["default"].base_model_name_or_path = base_name_or_path
    return wrapped


def load_adapter(backbone: nn.Module, folder: Path) -> nn.Module:
    """``backbone`` with the adapter saved in ``folder``, trainable (a resumed run trains it on)."""
    peft = _peft()
    wrapped = peft.PeftModel.from_pretrained(backbone, str(folder), is_trainable=True)
    use_lean_forward(wrapped)
    return wrapped


def adapter_base(folder: Path) -> str | None:
    """The encoder an adapter folder adapts (its ``base_model_name_or_path``), or None for a folder
    without ``adapter_config.json``."""
    file = folder / ADAPTER_CONFIG
    if not file.exists():
        return None
    base = json.loads(file.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"{file}: base_model_name_or_path is empty: which encoder this adapter adapts is unknown"
        )
    return base


def merged_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter merged in (``W + scale·B·A`` computed in fp32,
    stored in ``W``'s dtype), under the plain names of the model without peft."""
    from peft.tuners.lora import LoraLayer

    base = backbone.get_base_model()
    state: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight
            delta = sum(module.get_delta_weight(a).float() for a in module.active_adapters)
            state[f"{name}.weight"] = (weight.detach().float() + delta).to(weight.dtype)
    for key, tensor in base.state_dict().items():
        if ".lora_" in key:
            continue
        state.setdefault(key.replace(".base_layer.", "."), tensor.detach())
    return state


def save_backbone(backbone: nn.Module, directory: Path, merged: bool, safe_serialization: bool) -> None:
    """A LoRA backbone as peft's adapter folder, or (``merged``) as the full merged encoder."""
    if merged:
        state = {k: v.contiguous() for k, v in merged_state_dict(backbone).items()}
        base = backbone.get_base_model()
        base.save_pretrained(directory, state_dict=state, safe_serialization=safe_serialization)
    else:
        backbone.save_pretrained(directory, safe_serialization=safe_serialization)


def trainable_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} of {total:,} parameters train ({100 * trainable / max(total, 1):.2f} %)"


def check_dtype_runs(dtype: torch.dtype, device: torch.device, flag: str = "--dtype") -> None:
    """ValueError naming ``flag`` when ``device`` cannot multiply matrices in ``dtype``."""
    name = str(dtype).removeprefix("torch.")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{flag} {name}: {torch.cuda.get_device_name(device)} has no bfloat16 support")
    try:
        a = torch.ones(4, 4, dtype=dtype, device=device)
        torch.nn.functional.linear(a, a).sum().item()
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{flag} {name} cannot run on {device}: {err}") from err


def dtype_of(name: str | None) -> torch.dtype | None:
    return (
        None
        if name is None
        else {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    )

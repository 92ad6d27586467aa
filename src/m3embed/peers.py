"""Access to the reference implementations m3embed is compared with (tests and benchmarks only).

FlagEmbedding 1.4.2's package ``__init__`` imports its LLM rerankers, which fail under transformers 5
(``transformers.modeling_attn_mask_utils`` is gone). Its M3 inference module does not need them, so
we register empty package modules for the parents and import the module directly.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

_STUB_PACKAGES = ("FlagEmbedding", "FlagEmbedding.inference", "FlagEmbedding.inference.embedder")
M3_INFERENCE_MODULE = "FlagEmbedding.inference.embedder.encoder_only.m3"


M3_FINETUNE_MODULE = "FlagEmbedding.finetune.embedder.encoder_only.m3"
LLM_INFERENCE_MODULE = "FlagEmbedding.inference.embedder.decoder_only.base"


def load_flagembedding_m3() -> types.ModuleType:
    """FlagEmbedding's ``inference.embedder.encoder_only.m3`` module (it has ``M3Embedder``).

    Raises ``ImportError`` (with the reason) when FlagEmbedding is not installed or cannot be imported.
    """
    return _import(M3_INFERENCE_MODULE)


def load_flagembedding_m3_finetune() -> types.ModuleType:
    """FlagEmbedding's ``finetune.embedder.encoder_only.m3`` module (its training model and runner)."""
    return _import(M3_FINETUNE_MODULE)


def load_flagembedding_llm() -> types.ModuleType:
    """FlagEmbedding's ``inference.embedder.decoder_only.base`` module: its ``BaseLLMEmbedder`` is the
    package's ``FlagLLMModel``."""
    return _import(LLM_INFERENCE_MODULE)


def _import(module_name: str) -> types.ModuleType:
    if module_name in sys.modules:
        return sys.modules[module_name]
    if "FlagEmbedding" not in sys.modules:
        spec = importlib.util.find_spec("FlagEmbedding")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("FlagEmbedding is not installed (pip install 'm3embed[peers]')")
        root = Path(next(iter(spec.submodule_search_locations)))
        for name in _STUB_PACKAGES:
            module = types.ModuleType(name)
            module.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = module
    try:
        return importlib.import_module(module_name)
    except Exception as err:  # any failure inside FlagEmbedding means "peer unavailable"
        raise ImportError(f"cannot import {module_name}: {type(err).__name__}: {err}") from err

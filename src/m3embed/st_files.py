"""The files that make an m3embed model folder a sentence-transformers model as well.

sentence-transformers builds a model from ``modules.json``, a pipeline of modules each with its own
config; its own models and BGE-M3's folder on the Hub carry these files, written the same way here:

* ``modules.json``: Transformer (the folder itself) -> Pooling (``1_Pooling/``) -> Normalize (only
  when the model normalises; it has no settings, so ``2_Normalize/`` need not exist, as in
  sentence-transformers' own all-MiniLM-L6-v2 folder);
* ``sentence_bert_config.json``: the Transformer's ``max_seq_length`` and ``do_lower_case``;
* ``1_Pooling/config.json``: CLS, mean or last-token pooling, as :class:`~m3embed.model.M3Config` says;
* ``config_sentence_transformers.json``: the similarity (cosine for normalised vectors, else dot: the
  dense score is an inner product either way) and the versions that wrote the folder.

So ``SentenceTransformer(folder).encode(texts)`` gives m3embed's dense vectors: the CLS vector, or the
mean of the last hidden states over the attention mask (special tokens in, padding out), which is what
Pooling's ``cls`` and ``mean_tokens`` modes compute; then L2 normalisation when ``normalize`` is set.

Class references are the ``sentence_transformers.models.*`` names that every sentence-transformers
release resolves (6.x maps them to its new modules), and the pooling config has the four
``pooling_mode_*`` keys every release reads, as all-MiniLM-L6-v2's has (plus ``pooling_mode_lasttoken``
for last-token pooling); nothing needs
``trust_remote_code``. ``M3Model.from_pretrained`` and FlagEmbedding read only the root's transformers
files and the head files, so these change nothing for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from m3embed._version import __version__
from m3embed.checkpoint import write_atomic

MODULES_FILE = "modules.json"
TRANSFORMER_CONFIG_FILE = "sentence_bert_config.json"
MODEL_CONFIG_FILE = "config_sentence_transformers.json"
POOLING_DIR = "1_Pooling"
NORMALIZE_DIR = "2_Normalize"


def write_sentence_transformers_files(
    directory: Path,
    *,
    pooling: Literal["cls", "mean", "last_token"],
    normalize: bool,
    hidden_size: int,
    max_seq_length: int | None,
) -> None:
    """Write what sentence-transformers needs to load ``directory`` as a model's dense encoder.

    The caller (``M3Model.save_pretrained``) passes what the files say: the pooling and normalisation
    of its config, the encoder's hidden size and :func:`max_seq_length`, so this module needs no model.
    Each file is replaced atomically (written beside itself, then renamed), as checkpoint files are.
    """
    import transformers

    modules = [("", "Transformer"), (POOLING_DIR, "Pooling")]
    if normalize:
        modules.append((NORMALIZE_DIR, "Normalize"))
    files: dict[str, Any] = {
        MODULES_FILE: [
            {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
            for i, (path, kind) in enumerate(modules)
        ],
        TRANSFORMER_CONFIG_FILE: {"max_seq_length": max_seq_length, "do_lower_case": False},
        f"{POOLING_DIR}/config.json": {
            "word_embedding_dimension": hidden_size,
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            **({"pooling_mode_lasttoken": True} if pooling == "last_token" else {}),
        },
        MODEL_CONFIG_FILE: {
            "model_type": "SentenceTransformer",
            "__version__": {
                "m3embed": __version__,
                "transformers": transformers.__version__,
                "pytorch": torch.__version__,
            },
            "prompts": {},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine" if normalize else "dot",
        },
    }
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, json.dumps(content, indent=2) + "\n")


def max_seq_length(tokenizer: Any, backbone: nn.Module) -> int | None:
    """The longest input the encoder (``backbone`` with ``tokenizer``) takes, in tokens; ``None`` when
    nothing says.

    The tokenizer's ``model_max_length`` (unless it is transformers' "no limit"), capped by the position
    table less its offset: RoBERTa-style positions start after the padding index, so XLM-R's 514
    positions (BGE-M3's 8,194) hold 512 (8,192) tokens.
    """
    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

    limits = []
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    if tokenizer_max and tokenizer_max < VERY_LARGE_INTEGER:
        limits.append(int(tokenizer_max))
    positions = getattr(backbone.config, "max_position_embeddings", None)
    if positions and positions > 0:
        limits.append(positions - _position_offset(backbone))
    return min(limits) if limits else None


def _position_offset(backbone: nn.Module) -> int:
    """Positions the encoder never uses at the start of its table (padding_idx + 1 for RoBERTa-style
    embeddings, which number positions from there; 0 for BERT-style)."""
    for module in backbone.modules():
        padding_idx = getattr(module, "padding_idx", None)
        if isinstance(padding_idx, int) and isinstance(
            getattr(module, "position_embeddings", None), nn.Embedding
        ):
            return padding_idx + 1
    return 0

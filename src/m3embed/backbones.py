"""Backbone families as data: what differs between a BERT-style encoder and a decoder-only LLM embedder.

A family is one row of :data:`FAMILIES`, chosen by the backbone's ``model_type`` (Qwen2 / Qwen3 / Llama /
Mistral / Gemma2 are decoders, everything else is an encoder). It gives the defaults
:class:`~m3embed.model.M3Model` uses when neither the caller nor the folder's ``m3embed_config.json``
says otherwise: the dense pooling, which heads exist, and the query-instruction format. The memory
strategies and the loss never see it.

The end-of-text token: m3embed adds nothing itself; the tokenizer's own post-processor decides, as in
FlagEmbedding's ``FlagLLMModel`` and sentence-transformers. Qwen3-Embedding's published tokenizer ends
every text with ``<|endoftext|>`` there (its reference code appends the same id by hand), so both give
the same tokens. For a tokenizer that does not (a base LLM), :func:`append_eos_token` adds EOS to its
post-processor; the tokenizer files then carry it, so every tool that loads the saved folder sees it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# FlagEmbedding's FlagLLMModel default; its encoder models (and its training data) use "{}{}".
LLM_INSTRUCTION_FORMAT = "Instruct: {}\nQuery: {}"
PREFIX_INSTRUCTION_FORMAT = "{}{}"
POOLINGS = ("cls", "mean", "last_token")  # M3Config.pooling's values (m3embed.pooling computes them)


@dataclass(frozen=True)
class Family:
    """What a backbone family changes; the values are the defaults of its reference embedders."""

    name: str
    pooling: str  # the dense vector: "cls" (BGE-M3), "mean", or "last_token" (LLM embedders)
    use_sparse: bool  # build the sparse head unless told otherwise
    use_colbert: bool  # build the ColBERT head unless told otherwise
    query_instruction_format: str  # "{instruction}{query}" template, FlagEmbedding's name
    position_ids_from_mask: bool  # number positions from each text's first token, whatever the padding

    def config_defaults(self) -> dict[str, Any]:
        """The :class:`~m3embed.model.M3Config` fields this family sets."""
        return {"pooling": self.pooling, "use_sparse": self.use_sparse, "use_colbert": self.use_colbert}


ENCODER = Family("encoder", "cls", True, True, PREFIX_INSTRUCTION_FORMAT, False)
DECODER = Family("decoder", "last_token", False, False, LLM_INSTRUCTION_FORMAT, True)
# transformers' model_type of each decoder-only family m3embed knows (their causal-LM base models).
DECODER_MODEL_TYPES = frozenset(
    {"qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "llama", "mistral", "gemma", "gemma2", "gemma3_text"}
)


def family_of(backbone_config: Any) -> Family:
    """The family of a transformers config (``backbone.config``), by its ``model_type``."""
    return DECODER if getattr(backbone_config, "model_type", None) in DECODER_MODEL_TYPES else ENCODER


def format_query(query: str, instruction: str | None, instruction_format: str) -> str:
    """``instruction_format.format(instruction, query)`` when there is an instruction, else the query
    as it is (FlagEmbedding's ``query_instruction_for_retrieval`` / ``query_instruction_format``)."""
    return instruction_format.format(instruction, query) if instruction else query


def check_instruction_format(instruction_format: str, name: str) -> None:
    """ValueError naming the setting unless the format has exactly two ``{}`` (instruction, query)."""
    if not isinstance(instruction_format, str) or instruction_format.count("{}") != 2:
        raise ValueError(
            f"{name} must contain two '{{}}' (the instruction, then the query), e.g. "
            f"{LLM_INSTRUCTION_FORMAT!r}; got {instruction_format!r}"
        )


def ensure_pad_token(tokenizer: Any, pooling: str) -> None:
    """A batch needs a pad token: with ``last_token`` pooling, a tokenizer without one pads with its EOS
    token (what e5-mistral, gte-Qwen2 and FlagEmbedding's decoder training do; the attention mask, not
    the id, marks padding). ValueError when it has neither."""
    if pooling != "last_token" or tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise ValueError(
            "pooling='last_token' (--pooling last_token) needs a tokenizer with a pad token or an EOS token "
            f"to pad with; {type(tokenizer).__name__} has neither: set tokenizer.pad_token"
        )
    logger.info("the tokenizer has no pad token: padding with its EOS token %r", tokenizer.eos_token)
    tokenizer.pad_token = tokenizer.eos_token


def append_eos_token(tokenizer: Any) -> None:
    """Make a fast tokenizer end every text with its EOS token (kept under truncation), as
    Qwen3-Embedding's reference does; nothing happens when it already does. ValueError without EOS."""
    from tokenizers import processors

    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            f"append_eos=True (--append-eos) needs an EOS token; {type(tokenizer).__name__} has none"
        )
    ids = tokenizer("a")["input_ids"]
    if ids and ids[-1] == eos_id:
        return
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    start = f"{bos} " if bos is not None and ids and ids[0] == bos_id else ""
    specials = [(eos, eos_id)] + ([(bos, bos_id)] if start else [])
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{start}$A {eos}", pair=f"{start}$A {eos} $B:1 {eos}:1", special_tokens=specials
    )

"""M3Model: one Hugging Face encoder with BGE-M3's dense, sparse and ColBERT heads.

The checkpoint layout is BGE-M3's (the HF encoder files + ``colbert_linear.pt`` + ``sparse_linear.pt``)
so a directory moves both ways between FlagEmbedding and m3embed.

Finding the files is :mod:`m3embed.loading`; checking and tokenising texts and shaping outputs as
FlagEmbedding does is :mod:`m3embed.inference` (their public names are importable from here too).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from m3embed import lora as lora_io
from m3embed import scores as S
from m3embed.backbones import POOLINGS, append_eos_token, ensure_pad_token, family_of, format_query
from m3embed.checkpoint import write_atomic
from m3embed.inference import autocast_for, check_texts, encode_batches, eval_mode, numpy_outputs, tokenize
from m3embed.loading import load_head, no_library_progress_bars, resolve_model_path
from m3embed.lora import DEFAULT_ALPHA, DEFAULT_DROPOUT, DEFAULT_TARGET_MODULES, LoraSettings
from m3embed.pooling import pool
from m3embed.reps import M3Reps
from m3embed.st_files import max_seq_length, write_sentence_transformers_files

logger = logging.getLogger(__name__)

COLBERT_FILE = "colbert_linear.pt"
SPARSE_FILE = "sparse_linear.pt"
CONFIG_FILE = "m3embed_config.json"
# Special tokens that carry no lexical meaning; zeroed in the sparse output when the tokenizer has them.
# FlagEmbedding zeroes cls/eos/pad/unk; sep is added because BERT-style tokenizers end texts with
# [SEP] and have no eos (for XLM-RoBERTa sep == eos, so BGE-M3 outputs are unchanged).
SPECIAL_TOKEN_ATTRS = ("cls_token_id", "eos_token_id", "sep_token_id", "pad_token_id", "unk_token_id")


@dataclass(frozen=True)
class M3Config:
    """How the three outputs are built from the encoder's last hidden state."""

    pooling: Literal["cls", "mean", "last_token"] = "cls"  # CLS (BGE-M3), masked mean, or last token (LLMs)
    normalize: bool = True  # L2-normalise dense and ColBERT vectors (BGE-M3 inference default)
    colbert_dim: int = -1  # ColBERT vector size; -1 means the encoder's hidden size
    use_sparse: bool = True  # build the sparse (lexical weights) head
    use_colbert: bool = True  # build the ColBERT (multi-vector) head

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"M3Config.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.colbert_dim == 0 or self.colbert_dim < -1:
            raise ValueError(
                f"M3Config.colbert_dim must be -1 (hidden size) or positive, got {self.colbert_dim}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> M3Config:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class M3Model(nn.Module):
    """A text encoder with BGE-M3's three outputs.

    The backbone's family (:mod:`m3embed.backbones`: encoder or decoder-only LLM) gives the defaults of
    ``config`` when none is given. ``forward`` returns :class:`~m3embed.reps.M3Reps` (tensors, for training); ``encode`` returns
    FlagEmbedding's dict of NumPy outputs (for inference).
    """

    def __init__(self, backbone: nn.Module, tokenizer: Any, config: M3Config | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.family = family_of(backbone.config)
        self.config = config or M3Config(**self.family.config_defaults())
        ensure_pad_token(tokenizer, self.config.pooling)
        hidden = backbone.config.hidden_size
        colbert_dim = hidden if self.config.colbert_dim == -1 else self.config.colbert_dim
        self.sparse_linear = nn.Linear(hidden, 1) if self.config.use_sparse else None
        self.colbert_linear = nn.Linear(hidden, colbert_dim) if self.config.use_colbert else None
        # Heads with freshly initialised weights (from_pretrained removes those it loads from files):
        # training starts them from the encoder (m3embed.heads) and may give them their own learning rate.
        self.new_heads = {
            name for name in ("sparse", "colbert") if getattr(self, f"{name}_linear") is not None
        }
        ids = {getattr(tokenizer, attr, None) for attr in SPECIAL_TOKEN_ATTRS} - {None}
        self.register_buffer("special_ids", torch.tensor(sorted(ids), dtype=torch.long), persistent=False)

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        pooling: Literal["cls", "mean", "last_token"] | None = None,
        normalize: bool | None = None,
        colbert_dim: int | None = None,
        use_sparse: bool | None = None,
        use_colbert: bool | None = None,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        warn_new_heads: bool = True,
        append_eos: bool = False,
    ) -> M3Model:
        """Load a BGE-M3-layout directory or Hub name (e.g. ``BAAI/bge-m3``).

        Arguments left at ``None`` come from the directory's ``m3embed_config.json`` when present,
        else from the backbone family's defaults (:mod:`m3embed.backbones`: CLS and three heads for
        encoders, ``last_token`` and dense only for decoder-only LLMs). ``append_eos`` makes the
        tokenizer end every text with EOS (:func:`~m3embed.backbones.append_eos_token`). Missing head files mean freshly initialised heads
        (logged as a warning; at INFO with ``warn_new_heads=False``, for a caller that starts them
        itself, as training does from the encoder). A folder that does not exist, or is no model, raises
        ``FileNotFoundError`` / ``ValueError`` naming what was given.
        """
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model_path(name_or_path, cache_dir=cache_dir)
        saved = json.loads((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).exists() else {}
        overrides = {
            "pooling": pooling,
            "normalize": normalize,
            "colbert_dim": colbert_dim,
            "use_sparse": use_sparse,
            "use_colbert": use_colbert,
        }
        saved.update({k: v for k, v in overrides.items() if v is not None})
        colbert_state = load_head(path / COLBERT_FILE)
        sparse_state = load_head(path / SPARSE_FILE)
        if colbert_state is not None and "colbert_dim" not in saved:
            saved["colbert_dim"] = int(colbert_state["weight"].shape[0])

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if append_eos:
            append_eos_token(tokenizer)
        # The folder is local by now (a Hub snapshot was downloaded above, with its bars): loading it
        # takes a second, and transformers' "Loading weights" bar is noise.
        base = lora_io.adapter_base(path)  # an adapter folder: the encoder it adapts, then the adapter
        with no_library_progress_bars():
            backbone = AutoModel.from_pretrained(
                resolve_model_path(base) if base else path,
                trust_remote_code=trust_remote_code,
                dtype=torch_dtype,
            )
        if base:
            backbone = lora_io.load_adapter(backbone, path)
        config = M3Config.from_dict({**family_of(backbone.config).config_defaults(), **saved})
        model = cls(backbone, tokenizer, config)
        for name, head, state, file in (
            ("colbert", model.colbert_linear, colbert_state, COLBERT_FILE),
            ("sparse", model.sparse_linear, sparse_state, SPARSE_FILE),
        ):
            if head is None:
                continue
            if state is None:
                level = logging.WARNING if warn_new_heads else logging.INFO
                logger.log(level, "%s not found in %s: that head is freshly initialised", file, path)
            else:
                head.load_state_dict(state)
                model.new_heads.discard(name)
        if device is not None:
            model.to(device)
        return model.eval()  # as transformers does: inference mode until someone calls .train()

    def save_pretrained(
        self, directory: str | os.PathLike, safe_serialization: bool = True, merged: bool = False
    ) -> None:
        """Write BGE-M3's layout: encoder + tokenizer files, ``colbert_linear.pt``, ``sparse_linear.pt``.

        Also ``m3embed_config.json`` and sentence-transformers' files, so that
        ``SentenceTransformer(directory).encode(texts)`` gives this model's dense vectors
        (:func:`m3embed.st_files.write_sentence_transformers_files`). With LoRA adapters the encoder is
        written as peft's adapter folder (no sentence-transformers files: it needs its base model), or
        with ``merged=True`` as the full encoder with the adapters merged in (:mod:`m3embed.lora`).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        adapter_only = lora_io.is_lora(self.backbone) and not merged
        if lora_io.is_lora(self.backbone):
            lora_io.save_backbone(self.backbone, directory, merged, safe_serialization)
        else:
            self.backbone.save_pretrained(directory, safe_serialization=safe_serialization)
        self.tokenizer.save_pretrained(directory)
        for head, file in ((self.colbert_linear, COLBERT_FILE), (self.sparse_linear, SPARSE_FILE)):
            if head is not None:
                torch.save(
                    {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}, directory / file
                )
        write_atomic(directory / CONFIG_FILE, json.dumps(asdict(self.config), indent=2) + "\n")
        if adapter_only:
            return
        write_sentence_transformers_files(
            directory,
            pooling=self.config.pooling,
            normalize=self.config.normalize,
            hidden_size=self.backbone.config.hidden_size,
            max_seq_length=max_seq_length(self.tokenizer, self.backbone),
        )

    def add_lora(
        self,
        rank: int = 64,
        alpha: float = DEFAULT_ALPHA,
        dropout: float = DEFAULT_DROPOUT,
        target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
        base_name_or_path: str | None = None,
    ) -> M3Model:
        """Put LoRA adapters (peft) on the encoder: its weights freeze, the fp32 adapters and the heads
        train. The defaults are FlagEmbedding's for decoder-only embedders. ``base_name_or_path`` (default:
        where the encoder was loaded from) is recorded in the saved adapter folder, which
        ``from_pretrained`` loads on top of that encoder. Returns the model."""
        source = base_name_or_path or getattr(self.backbone.config, "_name_or_path", None) or None
        settings = LoraSettings(rank, alpha, dropout, tuple(target_modules))
        self.backbone = lora_io.add_lora(self.backbone, settings, source)
        return self

    def gradient_checkpointing_enable(self) -> None:
        """Layer-level activation checkpointing in the encoder (non-reentrant: RNG is replayed)."""
        # transformers 5 renamed the method; 4.x only has the old name.
        kwargs = {"use_reentrant": False}
        if hasattr(self.backbone, "activation_checkpointing_enable"):
            self.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def gradient_checkpointing_disable(self) -> None:
        disable = getattr(self.backbone, "activation_checkpointing_disable", None)
        (disable or self.backbone.gradient_checkpointing_disable)()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ the three outputs
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> M3Reps:
        """Encode a tokenised batch.

        Shapes: input_ids, attention_mask (B, L) -> M3Reps(dense (B, H), token_weights (B, L),
        colbert (B, L-1, C)).
        """
        extra = {}
        if self.family.position_ids_from_mask:  # rotary positions from each text's first token: a
            # left-padded text gets exactly the vector of its right-padded self
            extra["position_ids"] = (attention_mask.cumsum(1) - 1).clamp(min=0)  # (B, L)
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, **extra
        ).last_hidden_state  # (B, L, H)
        mask = attention_mask.to(hidden.dtype)
        dense = pool(hidden, attention_mask, self.config.pooling)  # (B, H)

        token_weights = None
        if self.sparse_linear is not None:
            # Zero padding and special tokens *before* pooling (multiplication, not an in-place write,
            # so autograd keeps what it needs and nothing vocabulary-sized is ever built).
            keep = mask * ~torch.isin(input_ids, self.special_ids)
            token_weights = torch.relu(self.sparse_linear(_as(hidden, self.sparse_linear))).squeeze(-1) * keep

        colbert = None
        if self.colbert_linear is not None:
            colbert = self.colbert_linear(_as(hidden[:, 1:], self.colbert_linear)) * mask[:, 1:, None]

        if self.config.normalize:
            dense = F.normalize(dense, dim=-1)
            if colbert is not None:
                colbert = F.normalize(colbert, dim=-1)
        return M3Reps(dense, token_weights, colbert, input_ids, attention_mask)

    # ------------------------------------------------------------------ inference API (FlagEmbedding's)
    def tokenize(self, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
        """Tokenise and pad ``texts`` to their own longest member (truncating at ``max_length``)."""
        return tokenize(self.tokenizer, texts, max_length)

    @torch.inference_mode()
    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int = 256,
        max_length: int = 512,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
        show_progress_bar: bool | None = None,
        use_fp16: bool = False,
        use_bf16: bool = False,
    ) -> dict[str, Any]:
        """Encode texts as FlagEmbedding's ``BGEM3FlagModel.encode`` does.

        Returns ``{"dense_vecs": ndarray (n, D), "lexical_weights": [{str(token_id): weight}],
        "colbert_vecs": [ndarray (tokens, C)]}``, with ``None`` for outputs not asked for; one text in,
        one item out. Batching (length-sorted, with out-of-memory back-off) is :func:`encode_batches`.
        """
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        check_texts(texts)
        wanted = {
            "dense_vecs": return_dense,
            "lexical_weights": return_sparse,
            "colbert_vecs": return_colbert_vecs,
        }
        self._check_heads(return_sparse, return_colbert_vecs)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        outputs: dict[str, list[Any]] = {key: [None] * len(texts) for key, want in wanted.items() if want}
        if texts:
            autocast = autocast_for(self.device, use_fp16, use_bf16)
            ids = self.tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)
            show = len(texts) > batch_size if show_progress_bar is None else show_progress_bar
            with eval_mode(self), tqdm(total=len(texts), desc="Encoding", disable=not show) as bar:
                for rows, batch, reps in encode_batches(self, ids["input_ids"], batch_size, autocast):
                    for key, values in numpy_outputs(reps, batch, outputs).items():
                        for i, value in zip(rows, values, strict=True):
                            outputs[key][i] = value
                    bar.update(len(rows))
        if "dense_vecs" in outputs:
            dense = outputs["dense_vecs"]
            outputs["dense_vecs"] = np.stack(dense) if dense else np.zeros((0, self._dense_dim()), np.float32)
        result = {key: outputs.get(key) for key in wanted}
        return {k: (v[0] if v is not None else None) for k, v in result.items()} if single else result

    def _check_heads(self, return_sparse: bool, return_colbert_vecs: bool) -> None:
        """ValueError when an output is asked of a model without its head."""
        if return_sparse and self.sparse_linear is None:
            raise ValueError("return_sparse=True but this model has no sparse head (use_sparse=False)")
        if return_colbert_vecs and self.colbert_linear is None:
            raise ValueError(
                "return_colbert_vecs=True but this model has no ColBERT head (use_colbert=False)"
            )

    def encode_queries(
        self,
        queries: str | Sequence[str],
        max_length: int = 512,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """:meth:`encode` of the queries with the instruction in FlagEmbedding's format (unset = the
        family's: ``"Instruct: {}\\nQuery: {}"`` for LLMs, ``"{}{}"`` for encoders)."""
        single = isinstance(queries, str)
        texts = self.with_instruction(
            [queries] if single else list(queries), query_instruction_for_retrieval, query_instruction_format
        )
        return self.encode(texts[0] if single else texts, max_length=max_length, **kwargs)

    def with_instruction(
        self, queries: Sequence[str], instruction: str | None, instruction_format: str | None = None
    ) -> list[str]:
        """The queries as the model reads them: each in ``instruction_format`` (unset = the family's)."""
        fmt = instruction_format or self.family.query_instruction_format
        return [format_query(q, instruction, fmt) for q in queries]

    def encode_corpus(
        self, corpus: str | Sequence[str], max_length: int = 512, **kwargs: Any
    ) -> dict[str, Any]:
        return self.encode(corpus, max_length=max_length, **kwargs)

    def _dense_dim(self) -> int:
        return self.backbone.config.hidden_size

    # ------------------------------------------------------------------ scoring helpers (FlagEmbedding's names)
    @staticmethod
    def compute_lexical_matching_score(lexical_weights_1: Any, lexical_weights_2: Any) -> float | np.ndarray:
        """Σ over shared tokens of w1·w2; two dicts give a float, two lists a (n1, n2) matrix."""
        return S.lexical_matching_scores(lexical_weights_1, lexical_weights_2)

    @staticmethod
    def colbert_score(q_reps: np.ndarray, p_reps: np.ndarray) -> float:
        """(1/n_q) Σ_i max_j q_i·p_j for one query's and one passage's ColBERT vectors."""
        return S.colbert_pair_score(q_reps, p_reps)

    def convert_id_to_token(self, lexical_weights: dict | list[dict]) -> dict | list[dict]:
        """Turn ``{str(token_id): weight}`` into ``{token: weight}`` (one dict in, one dict out)."""
        single = isinstance(lexical_weights, dict)
        items = [lexical_weights] if single else lexical_weights
        out = [{self.tokenizer.decode([int(i)]): w for i, w in item.items()} for item in items]
        return out[0] if single else out

    def compute_score(
        self,
        sentence_pairs: Sequence[tuple[str, str]] | tuple[str, str],
        batch_size: int = 256,
        max_query_length: int = 512,
        max_passage_length: int = 512,
        weights_for_different_modes: Sequence[float] | None = None,
        show_progress_bar: bool | None = False,
    ) -> dict[str, Any]:
        """Scores of (query, passage) pairs by each output and their weighted fusions.

        Returns FlagEmbedding's keys (:data:`m3embed.scores.MODES`): ``dense``, ``sparse``,
        ``colbert``, ``sparse+dense`` and ``colbert+sparse+dense`` (weighted means with
        ``weights_for_different_modes = [w_d, w_s, w_c]``, default ``[1, 1, 1]``); one pair in, floats
        out. The scoring is :func:`m3embed.scores.encoded_pair_scores`.
        """
        if isinstance(sentence_pairs, list | tuple) and len(sentence_pairs) == 0:
            return {mode: [] for mode in S.MODES}
        pairs, single = S.as_pairs(sentence_pairs)
        weights = S.check_weights(
            weights_for_different_modes or S.PAIR_SCORE_WEIGHTS, "weights_for_different_modes"
        )
        kwargs = dict(
            batch_size=batch_size,
            return_dense=True,
            return_sparse=self.sparse_linear is not None,
            return_colbert_vecs=self.colbert_linear is not None,
            show_progress_bar=show_progress_bar,
        )
        q = self.encode([p[0] for p in pairs], max_length=max_query_length, **kwargs)
        p = self.encode([p[1] for p in pairs], max_length=max_passage_length, **kwargs)
        result = S.encoded_pair_scores(q, p, weights)
        return {k: v[0] for k, v in result.items()} if single else result


def _as(hidden: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """The encoder's states in the head's dtype (fp32 heads on a bf16 / fp16 encoder; under autocast
    the linear layer casts anyway)."""
    return hidden if torch.is_autocast_enabled() else hidden.to(head.weight.dtype)

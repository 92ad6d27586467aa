"""Tiny random encoders and decoders and offline tokenizers for tests, benchmarks (``--tiny``) and examples.

Nothing here downloads: tokenizers are trained on a few KB of text with the ``tokenizers`` library.
"""

from __future__ import annotations

import random
from typing import Literal

import torch

from m3embed.model import M3Config, M3Model

SAMPLE_TEXT = """\
Debian is a free operating system for your computer and the packages that make it useful.
This package provides the command line tools to manage virtual machines and containers.
A library for parsing and writing JSON documents with a small memory footprint.
Dense retrieval encodes queries and passages as vectors and compares them by inner product.
Sparse lexical weights give each token of a text a learned importance for matching.
Multi-vector retrieval keeps one vector per token and scores with late interaction.
Ein Werkzeug zur Verwaltung von Paketen und Abhängigkeiten auf dem System.
Une bibliothèque pour lire et écrire des fichiers audio dans plusieurs formats.
Una herramienta para comprimir y descomprimir archivos de forma rápida y segura.
Biblioteka do obsługi wyrażeń regularnych zgodnych z Perlem i narzędzia pomocnicze.
Documentation files for the server, including examples and the manual pages.
Metapackage that depends on the recommended fonts for desktop environments.
Python bindings for the image processing library with support for many formats.
The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.
"""


def sample_texts(n: int, seed: int = 0, min_words: int = 2, max_words: int = 40) -> list[str]:
    """``n`` texts of varied lengths drawn from :data:`SAMPLE_TEXT`'s words."""
    words = SAMPLE_TEXT.split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def tiny_tokenizer(kind: Literal["xlmr", "bert"] = "xlmr", vocab_size: int = 400):
    """A Unigram (XLM-RoBERTa-style) or WordPiece (BERT-style) tokenizer trained offline in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    corpus = SAMPLE_TEXT.splitlines() * 4
    if kind == "xlmr":
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(
            corpus, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>")
        )
        return _xlmr_tokenizer(tok)
    if kind == "bert":
        from transformers import BertTokenizerFast

        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(
            corpus, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
        )
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        return BertTokenizerFast(
            tokenizer_object=tok,
            unk_token="[UNK]",
            sep_token="[SEP]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            mask_token="[MASK]",
            model_max_length=512,
        )
    raise ValueError(f"kind must be 'xlmr' or 'bert', got {kind!r}")


def tiny_decoder_tokenizer(
    kind: Literal["qwen3", "llama"] = "qwen3",
    vocab_size: int = 400,
    padding_side: Literal["left", "right"] = "right",
    pad: bool = True,
):
    """A byte-level BPE tokenizer for the tiny decoders, trained offline.

    ``qwen3``: Qwen's layout, ``<|endoftext|>`` as EOS and pad, nothing added around a text (the
    base Qwen3 tokenizer's behaviour). ``llama``: ``<s>`` before every text, ``</s>`` as EOS, and a pad
    token ``<pad>`` unless ``pad=False`` (Llama's own tokenizer has none).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>"] if kind == "qwen3" else ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SAMPLE_TEXT.splitlines() * 4, trainer)
    if kind == "qwen3":
        names = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>" if pad else None}
    elif kind == "llama":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        names = {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>" if pad else None,
        }
    else:
        raise ValueError(f"kind must be 'qwen3' or 'llama', got {kind!r}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, padding_side=padding_side, model_max_length=512, **names
    )


def tiny_decoder(
    kind: Literal["qwen3", "llama"] = "qwen3",
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    dropout: float = 0.1,
    tokenizer=None,
    config: M3Config | None = None,
    seed: int = 0,
) -> M3Model:
    """A randomly initialised decoder-only M3Model (Qwen3 or Llama, hidden 32, 2 layers, 2 key-value
    heads); its family's defaults apply: last-token pooling, dense only."""
    from transformers import LlamaConfig, LlamaModel, Qwen3Config, Qwen3Model

    tokenizer = tokenizer or tiny_decoder_tokenizer(kind)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=hidden // heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=512,
        attention_dropout=dropout,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model_cls, config_cls = (Qwen3Model, Qwen3Config) if kind == "qwen3" else (LlamaModel, LlamaConfig)
    backbone = model_cls(config_cls(**common))
    return M3Model(backbone, tokenizer, config)


def wide_vocab_tokenizer(vocab_size: int = 250_002):
    """A word-level XLM-RoBERTa-style tokenizer whose ids span ``vocab_size`` (BGE-M3 has 250,002).

    Words are ``w<k>``; :func:`wide_vocab_texts` draws texts whose ids are spread over the whole range.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{k}": k for k in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return _xlmr_tokenizer(tok)


def _xlmr_tokenizer(tok):
    """Wrap a ``tokenizers.Tokenizer`` whose ids 0-3 are <s>, <pad>, </s>, <unk> as XLM-RoBERTa's does."""
    from tokenizers import processors
    from transformers import XLMRobertaTokenizerFast

    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return XLMRobertaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<unk>",
        model_max_length=512,
    )


def wide_vocab_texts(n: int, vocab_size: int = 250_002, seed: int = 0, max_words: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(f"w{rng.randrange(4, vocab_size)}" for _ in range(rng.randint(2, max_words)))
        for _ in range(n)
    ]


def tiny_model(
    kind: Literal["xlmr", "bert", "qwen3", "llama"] = "xlmr",
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    dropout: float = 0.1,
    tokenizer=None,
    vocab_size: int | None = None,
    config: M3Config | None = None,
    seed: int = 0,
) -> M3Model:
    """A randomly initialised M3Model (hidden 32, 2 layers by default) with an offline tokenizer.

    ``qwen3`` and ``llama`` are :func:`tiny_decoder` (same arguments; ``vocab_size`` is the tokenizer's).
    """
    if kind in ("qwen3", "llama"):
        return tiny_decoder(
            kind,
            hidden=hidden,
            layers=layers,
            heads=heads,
            dropout=dropout,
            tokenizer=tokenizer,
            config=config,
            seed=seed,
        )
    from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel

    tokenizer = tokenizer or tiny_tokenizer(kind)
    vocab = vocab_size or len(tokenizer)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    if kind == "xlmr":
        cfg = XLMRobertaConfig(max_position_embeddings=514, bos_token_id=0, eos_token_id=2, **common)
        backbone = XLMRobertaModel(cfg, add_pooling_layer=False)
    else:
        cfg = BertConfig(max_position_embeddings=512, **common)
        backbone = BertModel(cfg, add_pooling_layer=False)
    return M3Model(backbone, tokenizer, config)

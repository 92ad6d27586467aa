"""m3embed: BGE-M3-style embedding models (dense + sparse + ColBERT) trained with huge batches on little memory."""

from m3embed._version import __version__ as __version__  # one definition, read by st_files too
from m3embed.losses import LossConfig
from m3embed.memory import MemoryConfig
from m3embed.model import M3Config, M3Model
from m3embed.reps import M3Reps
from m3embed.step import train_step

# Retrieval needs the `search` extra (scipy, faiss-cpu, ir-measures): imported on first use only.
_LAZY = {
    "encode_corpus": "m3embed.index",
    "IndexOptions": "m3embed.index",
    "Searcher": "m3embed.search",
    "SearchOptions": "m3embed.search",
    "evaluate_beir": "m3embed.evaluate",
    "mine_hard_negatives": "m3embed.mine",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'm3embed' has no attribute {name!r}")


__all__ = ["LossConfig", "M3Config", "M3Model", "M3Reps", "MemoryConfig", "train_step", *_LAZY]

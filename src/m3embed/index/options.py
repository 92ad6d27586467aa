"""How a corpus is encoded (:class:`IndexOptions`), saved in the manifest."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Literal, get_args

from m3embed.model import M3Model

logger = logging.getLogger(__package__)  # "m3embed.index", the one logger of the index modules

Dtype = Literal["float32", "float16"]
DTYPES: tuple[str, ...] = get_args(Dtype)  # storage types of dense and ColBERT vectors


@dataclass(frozen=True)
class IndexOptions:
    """How a corpus is encoded; saved in the manifest (a resumed run must use the same options)."""

    max_length: int = 512  # passage truncation, in tokens
    batch_size: int = 32  # texts per encoder forward pass
    # Documents per shard: the unit of resuming (a kill loses at most the shard being encoded) and of
    # sharing out under torchrun; one shard is held in memory. 4,000 documents are 1-2 minutes of CPU
    # encoding (all-MiniLM-L6-v2: 30-67 documents/s, docs/retrieval.md); a GPU can take more.
    shard_size: int = 4_000
    dtype: Dtype = "float32"  # storage type of dense and ColBERT vectors
    dense: bool = True  # store dense vectors
    sparse: bool = True  # store lexical weights (ignored, with a log line, if the model has no sparse head)
    colbert: bool = True  # store ColBERT vectors (ignored, with a log line, if the model has no ColBERT head)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"IndexOptions.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("max_length", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"IndexOptions.{name} must be >= 1, got {getattr(self, name)}")
        if not (self.dense or self.sparse or self.colbert):
            raise ValueError("IndexOptions: at least one of dense, sparse, colbert must be True")

    def for_model(self, model: M3Model) -> IndexOptions:
        """These options with the outputs the model cannot produce turned off."""
        sparse = self.sparse and model.sparse_linear is not None
        colbert = self.colbert and model.colbert_linear is not None
        if self.sparse and not sparse:
            logger.info("model has no sparse head: the index has no lexical weights")
        if self.colbert and not colbert:
            logger.info("model has no ColBERT head: the index has no ColBERT vectors")
        return IndexOptions(**{**asdict(self), "sparse": sparse, "colbert": colbert})

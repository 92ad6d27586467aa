"""Training data: FlagEmbedding JSON lines → validated dataset → same-dataset batches → texts of a step.

* :class:`DataConfig` — where the data is and how groups and batches are drawn.
* :class:`TrainDataset` — validates every file up front (:class:`DataError` names file, line and field)
  and maps an index to a raw example, reading one line per access.
* :class:`SameDatasetBatchSampler` — seeded, resumable, shardable batches from one file at a time, with
  no positive passage twice in a batch.
* :func:`build_batch` — the query and ``G`` passages (and teacher scores) of each index, as a
  :class:`TrainBatch`; deterministic in ``(seed, epoch, index)``.
* :class:`BatchStream` — the sampler's batches made ready ahead of the step, in a background thread,
  with the sampler position of the batches consumed (for checkpoints).
"""

from m3embed.data.collate import Group, TrainBatch, build_batch, build_group
from m3embed.data.config import DataConfig, DataError
from m3embed.data.dataset import TrainDataset
from m3embed.data.prefetch import BatchStream
from m3embed.data.sampler import SameDatasetBatchSampler

__all__ = [
    "BatchStream",
    "DataConfig",
    "DataError",
    "Group",
    "SameDatasetBatchSampler",
    "TrainBatch",
    "TrainDataset",
    "build_batch",
    "build_group",
]

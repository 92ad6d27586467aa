"""SameDatasetBatchSampler: seeded, resumable, shardable batches that never mix datasets.

How an epoch's batches are formed (a pure function of ``seed``, ``epoch`` and the dataset, so every
rank and every resumed run computes the same plan):

1. ``rng = default_rng([seed, epoch])``; each file's example indices are shuffled with it.
2. Within a file, examples are split by length bucket (see ``length_buckets``) keeping the shuffled
   order; each (file, bucket) stream is cut into *global* batches of ``bucket_batch_size *
   num_replicas`` examples. An example whose positive text is already a positive in the batch being
   filled is deferred to a later batch of the same stream (the same document may be the positive of
   several queries, and in one batch it would be a false negative for them); deferred examples are
   placed first when the next batch starts.
3. Leftovers that cannot fill a global batch are dropped (``drop_last=True``, the default) or become
   one smaller batch (cut to a multiple of ``num_replicas`` so every rank gets the same count).
4. The batches of all streams are shuffled together (FlagEmbedding does the same), and each rank
   takes its contiguous slice of every global batch: rank ``r`` of ``R`` gets items
   ``[r*b, (r+1)*b)`` of a global batch of ``R*b``, so all ranks are on the same file at every step.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from m3embed.data.config import normalize_length_buckets
from m3embed.data.dataset import TrainDataset

logger = logging.getLogger(__name__)


class SameDatasetBatchSampler:
    """Yields lists of dataset indices (this rank's share of one global batch), one file per batch.

    Args:
        dataset: the :class:`TrainDataset` to draw from.
        batch_size: queries per batch per rank (the global batch is ``batch_size * num_replicas``).
        seed: shuffling seed; must be the same on every rank.
        num_replicas: number of data-parallel ranks sharing each global batch.
        rank: this process's rank in ``[0, num_replicas)``.
        length_buckets: ``{min_estimated_tokens: batch_size}`` (FlagEmbedding-style length grouping):
            an example whose longest passage is estimated (``TrainDataset.lengths``, UTF-8 bytes / 4)
            at ``>= key`` tokens goes into the bucket of the largest such key and is batched with that
            bucket's per-rank batch size; examples below every key use ``batch_size``. Batches never
            mix buckets. None = no length grouping.
        drop_last: drop each (file, bucket)'s incomplete last batch (keeps batch sizes constant).

    Resuming: :meth:`state_dict` gives ``{"epoch", "position", ...}`` where ``position`` counts the
    batches this sampler has handed out in the epoch. When batches are made ahead (``BatchStream``, or
    a ``DataLoader`` that prefetches), the sampler runs ahead of training, so a trainer saves the
    state of the batches it consumed (``BatchStream.state_dict``); :meth:`load_state_dict` accepts it.
    After a full pass the sampler moves to ``epoch + 1``, position 0; :meth:`set_epoch` with the
    current epoch keeps the position (so a loop calling ``set_epoch`` after a resume continues).
    """

    def __init__(
        self,
        dataset: TrainDataset,
        batch_size: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        length_buckets: Mapping[int, int] | None = None,
        drop_last: bool = True,
    ) -> None:
        for name, value, minimum in (
            ("batch_size", batch_size, 1),
            ("num_replicas", num_replicas, 1),
            ("seed", seed, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(
                    f"SameDatasetBatchSampler {name} must be an integer >= {minimum}, got {value!r}"
                )
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(
                f"SameDatasetBatchSampler rank must be in [0, num_replicas={num_replicas}), got {rank!r}"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.length_buckets = normalize_length_buckets(length_buckets) if length_buckets is not None else None
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0
        self._plan_cache: tuple[int, list[np.ndarray]] | None = None
        if not self._plan(0):
            sizes = {name: stop - start for name, (start, stop) in zip(dataset.names, dataset.file_ranges)}
            raise ValueError(
                f"no full batch can be formed: the smallest global batch is {self._smallest_global_batch()} examples "
                f"(batch size x {num_replicas} replicas) but the files hold {sizes}; lower batch_size or "
                "length_buckets' batch sizes, or set drop_last=False"
            )

    # ------------------------------------------------------------------ epochs and resuming
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to draw; a different epoch than the current one starts at position 0."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def state_dict(self) -> dict[str, Any]:
        """Where the sampler is: ``epoch``, ``position`` (batches handed out) and the settings they assume."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_replicas": self.num_replicas,
            "length_buckets": self.length_buckets,
            "num_examples": len(self.dataset),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state["epoch"]``, ``state["position"]``; the next batches equal the saved run's.

        Settings saved in ``state`` must match this sampler's (a different seed, batch size, world
        size, bucketing or dataset gives different batches, so positions would not line up).
        """
        mine = self.state_dict()
        for key in ("seed", "batch_size", "num_replicas", "length_buckets", "num_examples"):
            if key in state and _normalise(state[key]) != _normalise(mine[key]):
                raise ValueError(
                    f"cannot resume the batch sampler: the saved {key} is {state[key]!r} but this run has "
                    f"{mine[key]!r}; use the saved settings, or start the next epoch fresh by loading "
                    f"{{'epoch': {int(state.get('epoch', 0)) + 1}, 'position': 0}}"
                )
        epoch, position = state.get("epoch"), state.get("position", 0)
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"sampler state 'epoch' must be an integer >= 0, got {epoch!r}")
        n = len(self._plan(epoch))
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position <= n:
            raise ValueError(
                f"sampler state 'position' must be an integer in [0, {n}] for epoch {epoch}, got {position!r}"
            )
        self.epoch, self.position = epoch, position

    # ------------------------------------------------------------------ iteration
    def __len__(self) -> int:
        """Batches in the current epoch (counting those already handed out)."""
        return len(self._plan(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        plan = self._plan(self.epoch)
        while self.position < len(plan):
            batch = plan[self.position]
            per_rank = len(batch) // self.num_replicas
            self.position += 1
            yield batch[self.rank * per_rank : (self.rank + 1) * per_rank].tolist()
        self.epoch += 1
        self.position = 0

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every rank's indices together, per batch, for ``epoch`` (for inspection and tests)."""
        return [b.tolist() for b in self._plan(epoch)]

    # ------------------------------------------------------------------ planning
    def _plan(self, epoch: int) -> list[np.ndarray]:
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[np.ndarray] = []
        dropped = 0
        for start, stop in self.dataset.file_ranges:
            order = start + rng.permutation(stop - start)
            for bucket_batch, members in self._buckets(order):
                formed, left = self._form_batches(members, bucket_batch * self.num_replicas)
                batches.extend(formed)
                dropped += left
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
        if dropped:
            logger.debug("epoch %d: %d example(s) left out of the last incomplete batches", epoch, dropped)
        self._plan_cache = (epoch, batches)
        return batches

    def _buckets(self, order: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Split a shuffled index array into (per-rank batch size, members) by length bucket."""
        if self.length_buckets is None:
            return [(self.batch_size, order)]
        keys = np.array(list(self.length_buckets), dtype=np.int64)
        which = np.searchsorted(keys, self.dataset.lengths[order], side="right") - 1  # -1: below every key
        out = []
        for b in range(-1, len(keys)):
            members = order[which == b]
            if len(members):
                size = self.batch_size if b < 0 else self.length_buckets[int(keys[b])]
                out.append((size, members))
        return out

    def _form_batches(self, members: np.ndarray, size: int) -> tuple[list[np.ndarray], int]:
        """Cut one stream into global batches of ``size`` with no positive text twice in a batch."""
        batches: list[np.ndarray] = []
        queue: deque[int] = deque(int(i) for i in members)
        deferred: deque[int] = deque()
        while queue or deferred:
            batch: list[int] = []
            seen: set[int] = set()
            # Deferred examples first (oldest first), then fresh ones; conflicts go (back) to deferred.
            for source in (deferred, queue):
                kept: deque[int] = deque()
                while source and len(batch) < size:
                    idx = source.popleft()
                    hashes = self.dataset.positive_hashes(idx).tolist()
                    if seen.isdisjoint(hashes):
                        batch.append(idx)
                        seen.update(hashes)
                    elif source is deferred:
                        kept.append(idx)
                    else:
                        deferred.append(idx)
                if source is deferred:
                    deferred.extendleft(reversed(kept))
            if len(batch) == size:
                batches.append(np.asarray(batch, dtype=np.int64))
                continue
            # The stream is exhausted: this batch and whatever is still deferred are the leftovers.
            leftover = len(batch) + len(deferred)
            if self.drop_last or not batch:
                return batches, leftover
            usable = len(batch) - len(batch) % self.num_replicas
            if usable:
                batches.append(np.asarray(batch[:usable], dtype=np.int64))
                leftover -= usable
            if deferred and usable:  # more partial batches from the examples that conflicted
                queue, deferred = deferred, deque()
                continue
            return batches, leftover
        return batches, 0

    def _smallest_global_batch(self) -> int:
        sizes = [self.batch_size, *(self.length_buckets or {}).values()]
        return min(sizes) * self.num_replicas


def _normalise(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {int(k): int(v) for k, v in value.items()}
    return value

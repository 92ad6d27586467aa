"""BatchStream: the sampler's batches, epoch after epoch, made ready ahead of the step that needs them.

Why a thread and not ``DataLoader`` workers: making a batch is reading a few lines at known offsets,
drawing groups from a seeded NumPy generator and tokenising with a Rust fast tokenizer (which
releases the GIL) — tens of milliseconds against a step of tenths of a second to minutes. One thread
does that while the step runs, at no cost in memory (worker processes would each import torch and hold a copy of the
tokenizer, and the dataset and tokenizer would be pickled at every start). One producer filling a
FIFO queue keeps the order of the batches, and nothing in it touches torch's RNG, so the batches,
and with them the losses, are those of the synchronous loop.

Resuming stays exact because the stream, not the sampler, says where the data is: the producer runs
up to ``prefetch`` batches ahead of training, so each batch travels with the sampler state right
after it was drawn, and :meth:`BatchStream.state_dict` is that of the last batch *handed out*, the
position a resumed run must continue from.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from m3embed.data.sampler import SameDatasetBatchSampler

T = TypeVar("T")

_POLL_S = 0.1  # how often a producer blocked on a full queue checks whether the stream was closed


@dataclass(frozen=True)
class _Made(Generic[T]):
    epoch: int
    value: T
    sampler_state: dict[str, Any]  # the sampler's state right after this batch was drawn


@dataclass(frozen=True)
class _Failed:
    error: BaseException


class BatchStream(Generic[T]):
    """``make(indices, epoch)`` for every batch of ``sampler``, from its current position on, without end.

    ``prefetch=0`` makes each batch when ``next(stream)`` asks for it (the synchronous loop);
    ``prefetch=k`` starts a background thread on ``__enter__`` that keeps up to ``k`` made batches
    waiting (and makes the next one meanwhile), so ``next(stream)`` returns at once unless the thread fell behind. ``make`` must not use
    anything the caller's thread uses at the same time (e.g. give it its own tokenizer).

    While the stream is open only it may touch ``sampler`` (the thread iterates it). An error in
    ``make`` or the sampler is raised by the ``next(stream)`` that would have returned that batch.
    """

    def __init__(
        self, sampler: SameDatasetBatchSampler, make: Callable[[list[int], int], T], prefetch: int = 0
    ) -> None:
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"BatchStream prefetch must be an integer >= 0, got {prefetch!r}")
        self.prefetch = prefetch
        self._sampler = sampler
        self._make = make
        self._consumed = sampler.state_dict()
        self._made = self._draw()
        self._queue: queue.Queue[_Made[T] | _Failed] = queue.Queue(maxsize=max(prefetch, 1))
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> BatchStream[T]:
        if self.prefetch and self._thread is None:
            self._thread = threading.Thread(target=self._produce, name="m3embed-batches", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> BatchStream[T]:
        return self

    def __next__(self) -> tuple[int, T]:
        """The next batch as ``(epoch, make(indices, epoch))``; waits for it when it is not made yet."""
        if self._closed.is_set():
            raise RuntimeError("the BatchStream was closed; make a new one to go on drawing batches")
        item = self._queue.get() if self._thread is not None else next(self._made)
        if isinstance(item, _Failed):
            self.close()
            raise item.error
        self._consumed = item.sampler_state
        return item.epoch, item.value

    def state_dict(self) -> dict[str, Any]:
        """The sampler state after the last batch handed out by ``next(stream)`` (not after those made ahead):
        what a checkpoint saves and ``SameDatasetBatchSampler.load_state_dict`` resumes from."""
        return dict(self._consumed)

    def close(self) -> None:
        """Stop the thread; batches made ahead are dropped, so the sampler, free to use again, stands
        past them: :meth:`state_dict` is where the consumed batches end."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join()

    def _draw(self) -> Iterator[_Made[T]]:
        while True:
            epoch = self._sampler.epoch
            for indices in self._sampler:  # at the end of a pass the sampler moves to epoch + 1
                yield _Made(epoch, self._make(indices, epoch), self._sampler.state_dict())

    def _produce(self) -> None:
        try:
            for item in self._made:
                if not self._put(item):
                    return
        except BaseException as err:  # anything: a consumer waiting on the queue must never hang
            self._put(_Failed(err))

    def _put(self, item: _Made[T] | _Failed) -> bool:
        """Queue ``item`` once there is room; False when the stream was closed while waiting."""
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

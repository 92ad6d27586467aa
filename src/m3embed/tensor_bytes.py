"""What a function's tensors hold, for ``sub_batch_size="auto"``'s probe (``m3embed.memory``).

Two counts, device-independent (they count tensor storages, not an allocator's pages, so they work
on CPU where no allocator keeps statistics):

- :func:`saved_bytes`: the bytes autograd saves for backward while ``fn`` runs. It is what a plain
  encode holds until its backward, but it cannot see inside a checkpointed region: non-reentrant
  ``torch.utils.checkpoint`` installs its own saved-tensor hooks there, keeps the region's inputs
  outside any hook and recomputes the rest in backward.
- :func:`peak_live_bytes`: the most bytes of tensors created by ``fn`` and its backward that are
  alive at once. Under layer checkpointing that is the layers' inputs plus one layer recomputed
  with its gradients, which is what such an encode really holds.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

Outputs = Sequence[torch.Tensor]


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs (with grad),
    leaving out the storages of ``exclude`` (e.g. a module's parameters) and views of them."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
        del out
    return sum(seen.values())


def peak_live_bytes(fn: Callable[[], Outputs]) -> int:
    """The peak bytes of live tensors while ``fn()`` runs with grad and its outputs are backpropagated
    (each with a gradient of ones). The gradients are returned by ``torch.autograd.grad`` and dropped:
    no ``.grad`` is touched. Tensors that existed before (parameters, inputs) are not counted.
    """
    with torch.enable_grad(), _LiveBytes() as live:
        outputs = [t for t in fn() if t.requires_grad]
        leaves = _leaves(outputs)
        if leaves:
            grads = torch.autograd.grad(
                outputs, leaves, [torch.ones_like(t) for t in outputs], allow_unused=True
            )
            del grads
        del outputs
    return live.peak


class _LiveBytes(TorchDispatchMode):
    """Counts the storages every op (forward and backward) creates, until they are freed."""

    def __init__(self) -> None:
        super().__init__()
        self.alive: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.alive:
                    self.alive[ref.cdata] = (ref, t.untyped_storage().nbytes())
                    self.now += self.alive[ref.cdata][1]
        self.peak = max(self.peak, self.now)
        for key in [k for k, (ref, _) in self.alive.items() if ref.expired()]:
            self.now -= self.alive.pop(key)[1]
        return out


def _leaves(outputs: Outputs) -> list[torch.Tensor]:
    """The leaf tensors (parameters) that ``outputs``' graph accumulates gradients into."""
    leaves, seen, stack = [], set(), [t.grad_fn for t in outputs]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):  # AccumulateGrad
            leaves.append(fn.variable)
        else:
            stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return leaves


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device`` (CUDA: the driver's free memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))

"""Peak memory of this process since a reset: what ``train``'s step log and the memory benchmark report.

On CPU the peak is the resident set's high-water mark. Linux keeps it per process as ``VmHWM`` and
restarts it from the current RSS when ``5`` is written to ``/proc/self/clear_refs``, so the peak of a
phase (the training steps, one benchmark step) can be told from the peak before it (model loading,
evaluation). ``getrusage``'s ``ru_maxrss`` cannot be reset and also keeps the peaks of exited
threads, so it is only the fallback where ``/proc`` is missing (macOS: a peak since the start).
On CUDA the peak is the caching allocator's ``max_memory_allocated``, reset with
``reset_peak_memory_stats``.
"""

from __future__ import annotations

import resource
import sys

import torch


def _proc_status(*keys: str) -> dict[str, int] | None:
    """The ``keys`` of ``/proc/self/status`` in bytes, or None where there is no such file."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in keys:
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        return None
    return out


def rss_bytes() -> int:
    """The resident set size now (0 where it cannot be read)."""
    status = _proc_status("VmRSS")
    return status.get("VmRSS", 0) if status else 0


def rss_peak_bytes() -> int:
    """The resident set's high-water mark since the last :func:`reset_rss_peak` (or the start)."""
    status = _proc_status("VmHWM")
    if status and "VmHWM" in status:
        return status["VmHWM"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def reset_rss_peak() -> bool:
    """Restart the high-water mark from the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """Memory above what was in use at :meth:`start`: the RSS high-water mark on CPU, the allocator's
    peak on CUDA. ``baseline`` is what was in use at the start (bytes)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.baseline = 0

    def start(self) -> bool:
        """Reset the peak to the memory in use now; False where the CPU peak cannot be reset."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return True
        reset = reset_rss_peak()
        self.baseline = rss_bytes()
        return reset

    def peak(self) -> int:
        """The peak since :meth:`start`, in bytes in use (not above the baseline)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return rss_peak_bytes()

    def peak_above_baseline(self) -> int:
        return max(0, self.peak() - self.baseline)

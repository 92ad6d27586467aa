"""The peak-memory helper that the training log and the memory benchmark share."""

import sys

import numpy as np
import pytest

from m3embed.peak_memory import PeakMemory, rss_peak_bytes

MB = 2**20

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc/self/clear_refs")


@linux_only
def test_peak_after_start_counts_only_what_follows_it():
    """A big allocation before ``start`` does not count; a smaller one after it does, about its size."""
    big = np.ones(300 * MB // 8)  # touched pages: 300 MB resident
    del big  # numpy's large buffers are mmapped: freeing them returns the pages
    assert rss_peak_bytes() > 300 * MB
    meter = PeakMemory("cpu")
    assert meter.start()
    small = np.ones(60 * MB // 8)
    peak = meter.peak_above_baseline()
    del small
    assert 50 * MB < peak < 120 * MB, f"peak above baseline {peak / MB:.1f} MB, expected about 60"
    assert meter.peak() < meter.baseline + 200 * MB, (meter.peak() / MB, meter.baseline / MB)

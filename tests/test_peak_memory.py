"""The peak-memory helper that the training log and the memory benchmark share."""

import json
import subprocess
import sys

import pytest

MB = 2**20

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc/self/clear_refs")


# Run in a fresh interpreter: after hundreds of tests the process's heap and mappings make the resident
# set of a new allocation depend on what ran before (it failed at 26.8 MB in a full run, passed alone).
_MEASURE = """
import json
import numpy as np
from m3embed.peak_memory import PeakMemory, rss_peak_bytes
MB = 2**20
big = np.ones(300 * MB // 8)  # touched pages: 300 MB resident
del big  # numpy's large buffers are mmapped: freeing them returns the pages
before = rss_peak_bytes()
meter = PeakMemory("cpu")
started = meter.start()
small = np.ones(60 * MB // 8)
peak = meter.peak_above_baseline()
del small
print(json.dumps([before, started, peak, meter.peak(), meter.baseline]))
"""


@linux_only
def test_peak_after_start_counts_only_what_follows_it():
    """A big allocation before ``start`` does not count; a smaller one after it does, about its size."""
    out = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, check=True)
    before, started, peak, meter_peak, baseline = json.loads(out.stdout)
    assert before > 300 * MB
    assert started
    assert 50 * MB < peak < 120 * MB, f"peak above baseline {peak / MB:.1f} MB, expected about 60"
    assert meter_peak < baseline + 200 * MB, (meter_peak / MB, baseline / MB)

"""The node keeps freed heap memory (``node.runtime.allocator``): a large array allocated again
after it was freed must not page-fault afresh, as it does by default. Counted in page faults,
in a fresh process each, so nothing else in the test run moves the figures. (glibc raises its
threshold after a free by itself, but trims the heap top again once several such arrays are
freed together, so the pages are mapped afresh every token.)"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

FAULTS = """
import json, resource, sys
import numpy as np
from node.runtime.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "kept" else None
def token():  # a few large temporaries alive at once, then all freed (as per-token work does)
    return [np.ones(100_000) for _ in range(4)]  # 800 KB each; a logits row's float64 copy is 384 KB
token()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    token()
print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_freed_arrays_are_reused_without_page_faults():
    default, kept = _faults("default"), _faults("kept")
    assert kept["kept"] is True
    pages = 50 * 4 * 800_000 // 4096
    assert default["faults"] > pages // 2  # each array mapped and zero-filled again
    assert kept["faults"] < pages // 20

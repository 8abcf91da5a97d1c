"""TVM's thread pool is sized to the cores the process may use, in a fresh process without
TVM_NUM_THREADS (TVM's own default on a 2-vCPU machine is one thread: half the speed)."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import threading
from node.compiler.targets import configure_threads, tvm_pool_size, usable_cores
configured = configure_threads({threads})
pool = []
worker = threading.Thread(target=lambda: pool.append(tvm_pool_size()))  # as the engine's worker thread
worker.start(); worker.join()
print(configured, pool[0], usable_cores())
"""


def _probe(threads: int | None) -> list[int]:
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(threads=threads)], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    return [int(x) for x in out.stdout.split()]


def test_pool_uses_every_core_of_the_affinity_mask_by_default():
    configured, pool, cores = _probe(None)
    assert configured == pool == cores


def test_threads_flag_sets_the_pool_size():
    configured, pool, _ = _probe(1)
    assert configured == pool == 1


def test_cli_prints_the_thread_count_and_refuses_zero(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    bad = subprocess.run([sys.executable, "-m", "node.cli", "verify", str(tmp_path / "none.json"), "--threads", "0"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--threads must be at least 1" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "node.cli", "verify", str(tmp_path / "none.json")],
                             env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and f"{len(os.sched_getaffinity(0))} CPU threads for TVM" in missing.stderr

"""Where a benchmark's figures go: one JSON file under ``bench/results/`` (or where asked)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def resident_mb() -> float:
    """This process's resident set size now (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def machine() -> dict:
    """The CPU this ran on (model name, LLVM's mcpu, AVX-512) and the thread count."""
    from node.compiler.targets import host_cpu_name, usable_cores

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    field = lambda key: next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith(key)), "")  # noqa: E731
    return {"cpu": field("model name"), "mcpu": host_cpu_name(), "avx512": "avx512f" in field("flags").split(),
            "cores": usable_cores(), "threads": int(os.environ.get("TVM_NUM_THREADS", usable_cores()))}


def write_json(path: Path, report: Any) -> Path:
    """Write ``report`` as indented JSON (folders made as needed) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return path

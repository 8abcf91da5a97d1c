"""Where a benchmark's figures go: one JSON file under ``bench/results/`` (or where asked)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def write_json(path: Path, report: Any) -> Path:
    """Write ``report`` as indented JSON (folders made as needed) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return path

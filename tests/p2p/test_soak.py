"""The soak bench, short (20 s): a gateway and two servers under steady mixed load answer every
request and stay up. Figures (throughput, latency, memory growth) are the bench's to report."""

from __future__ import annotations

from bench.bench_soak import run_soak
from tests.models_fixtures import make_tiny_hf_checkpoint


def test_a_short_soak_has_no_errors(tmp_path, store):
    (tmp_path / "warm").symlink_to(store)  # run_soak's warm home: the session's build of the tiny shape
    result = run_soak(tmp_path, make_tiny_hf_checkpoint(tmp_path / "tiny"), seconds=20, clients=4)
    assert result["errors"] == 0, result["error_samples"]
    assert result["alive"] and result["requests"] > 0

"""The ``proofmesh`` command as a user runs it (a subprocess), on a tiny checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.models_fixtures import make_tiny_hf_checkpoint


def run_cli(*args: str, home) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROOFMESH_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def test_generate_streams_text_and_compile_caches(tmp_path):
    folder = make_tiny_hf_checkpoint(tmp_path / "tiny")
    home = tmp_path / "home"
    first = run_cli("compile", str(folder), "--device", "cpu", home=home)
    assert first.returncode == 0, first.stderr
    assert "compiling llama" in first.stderr and "compiled in" in first.stderr  # it really built
    lib = first.stdout.strip().splitlines()[-1]
    assert lib.endswith(".so") and os.path.exists(lib)
    built = os.stat(lib).st_mtime_ns
    again = run_cli("compile", str(folder), "--device", "cpu", home=home)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == lib  # the same library, served from the cache ...
    assert os.stat(lib).st_mtime_ns == built and "compiling llama" not in again.stderr  # ... not rebuilt

    out = run_cli("generate", "Hello", "--model", str(folder), "--max-tokens", "5", "--seed", "3",
                  "--temperature", "0.7", "--device", "cpu", home=home)
    assert out.returncode == 0, out.stderr
    assert "5 tokens, finish=length, seed=3" in out.stderr
    out2 = run_cli("generate", "Hello", "--model", str(folder), "--max-tokens", "5", "--seed", "3",
                   "--temperature", "0.7", "--device", "cpu", home=home)
    assert out2.stdout == out.stdout  # same seed, same text


def test_clear_errors(tmp_path):
    missing = run_cli("generate", "hi", "--model", str(tmp_path / "nope"), home=tmp_path)
    assert missing.returncode == 2
    assert "unknown model" in missing.stderr and "Traceback" not in missing.stderr
    bad_device = run_cli("compile", str(tmp_path), "--device", "tpu", home=tmp_path)
    assert bad_device.returncode == 2 and "invalid choice" in bad_device.stderr
    no_config = run_cli("compile", str(tmp_path), "--device", "cpu", home=tmp_path)
    assert no_config.returncode == 2 and "config.json" in no_config.stderr and "Traceback" not in no_config.stderr


def test_bad_option_values_are_one_line_errors(tmp_path):
    """Values the library refuses end in one line and exit 2, before any model is loaded."""
    for args, expected in ((("generate", "hi", "--temperature", "3"), "--temperature: Input should be less than or equal to 2"),
                           (("generate", "hi", "--max-tokens", "0"), "--max-tokens: Input should be greater than or equal to 1"),
                           (("generate", "hi", "--seed", "-1"), "--seed: Input should be greater than or equal to 0"),
                           (("run", "--max-queue", "0"), "--max-queue must be at least 1"),
                           (("posp", "--reward", "-1", "--cost", "1", "--penalty", "1"), "--reward: Input should be")):
        out = run_cli(*args, home=tmp_path)
        assert out.returncode == 2 and expected in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    assert not (tmp_path / "models").exists()  # nothing was pulled or loaded
    assert "exit status:" in run_cli("--help", home=tmp_path).stdout

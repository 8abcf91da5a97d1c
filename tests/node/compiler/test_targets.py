"""Targets: detection, cache keys, and the CUDA path compiling on a machine without a GPU."""

from __future__ import annotations

import shutil

import pytest

from node.compiler.build import compile_model
from node.compiler.build import library_cache_key
from node.errors import DeviceError
from node.compiler.targets import cpu_target, cuda_target_for_arch, detect, host_cpu_name
from tests.models_fixtures import tiny_config


def test_cpu_detection_names_the_host_cpu():
    dt = detect("cpu")
    assert dt.kind == "cpu"
    assert str(dt.target.attrs["mcpu"]) == host_cpu_name()
    assert "llvm" in dt.description and host_cpu_name() in dt.description


def test_unknown_or_absent_device_is_a_clear_error():
    with pytest.raises(DeviceError, match="unknown device"):
        detect("tpu")
    import tvm

    if not tvm.device("cuda", 0).exist:
        with pytest.raises(DeviceError, match="no cuda device"):
            detect("cuda")


def test_cache_key_separates_targets_and_shapes():
    cfg = tiny_config()
    host, generic = cpu_target(), cpu_target("x86-64")
    assert library_cache_key(cfg, host) != library_cache_key(cfg, generic)
    assert library_cache_key(cfg, host) == library_cache_key(cfg, cpu_target())
    bigger = tiny_config(n_layers=3)
    assert library_cache_key(cfg, host) != library_cache_key(bigger, host)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="TVM needs nvcc to build CUDA kernels")
def test_cuda_library_compiles_without_a_gpu(tmp_path):
    lib = compile_model(tiny_config(), cuda_target_for_arch("sm_90"), tmp_path)
    assert lib.path.exists() and lib.path.stat().st_size > 0

"""Find the chips this machine has and describe them as TVM targets.

The compiled library is specific to its target: a library built for the host's ``znver5``
dies with SIGILL on a ``znver3`` (DESIGN.md), so the CPU is detected at run time and the
detected mcpu, features and core count go into the compile-cache key. GPU kinds are probed
through TVM's runtime (``tvm.device(kind).exist``); the wheel on these machines has CUDA only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import tvm
from tvm.target import Target

from node.compiler.devices import DEVICE_CHOICES, GPU_KINDS
from node.errors import DeviceError

# A library for a generic x86-64 CPU: slower, runs anywhere; used as an honest second backend.
GENERIC_X86_CPU = "x86-64"


@dataclass(frozen=True)
class DeviceTarget:
    """A device to run on and the TVM target to compile for it."""

    kind: str  # "cpu" or one of GPU_KINDS
    target: Target

    @property
    def device(self) -> tvm.runtime.Device:
        return tvm.cpu() if self.kind == "cpu" else tvm.device(self.kind, 0)

    @property
    def description(self) -> str:
        """Short, stable text naming the backend (goes into receipts and the cache key)."""
        t = self.target
        if self.kind == "cpu":
            mcpu = str(t.attrs.get("mcpu", "generic"))
            return f"tvm-{tvm.__version__}/llvm/{mcpu}/fp32"
        arch = str(t.attrs.get("arch", ""))
        return f"tvm-{tvm.__version__}/{self.kind}/{arch}/fp32"


def host_cpu_name() -> str:
    return str(tvm.get_global_func("target.llvm_get_system_cpu")())


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask (a container's or taskset's limit), not
    every core of the machine."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_core_count() -> int:
    """Cores TVM's thread pool will use (honours TVM_NUM_THREADS, else the affinity mask)."""
    env = os.environ.get("TVM_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return usable_cores()


def configure_threads(threads: int | None = None) -> int:
    """Size TVM's CPU thread pool before any TVM work runs, and return the size.

    Why: TVM's default on a small VM is one thread per *physical* core as it guesses them, which
    on a 2-vCPU machine is one thread: half the decode speed (measured 111 vs 214 tokens/s).
    Each thread that launches TVM work builds its own pool on first use from
    ``TVM_NUM_THREADS``, so setting it in-process before the first launch sizes every pool
    (``runtime.config_threadpool`` reconfigures only the calling thread's). ``threads`` (the
    ``--threads`` flag) wins over an inherited ``TVM_NUM_THREADS``, which wins over the
    affinity mask."""
    if threads is not None:
        if threads < 1:
            raise DeviceError("--threads must be at least 1")
        os.environ["TVM_NUM_THREADS"] = str(threads)
    else:
        os.environ["TVM_NUM_THREADS"] = str(cpu_core_count())
    return int(os.environ["TVM_NUM_THREADS"])


def tvm_pool_size() -> int:
    """How many threads TVM's pool of the calling thread runs (builds that pool if needed)."""
    return int(tvm.get_global_func("runtime.NumThreads")())


def cpu_target(mcpu: str | None = None) -> Target:
    """The llvm target for this host (or for ``mcpu``, e.g. ``x86-64`` for a portable build)."""
    if mcpu is None:
        # from_device fills in the host's mcpu *and* its feature list (avx512 or not, ...).
        host = Target.from_device(tvm.cpu())
        config = dict(host.export())
        config["num-cores"] = cpu_core_count()
        return Target(config)
    return Target({"kind": "llvm", "mcpu": mcpu, "num-cores": cpu_core_count()})


def gpu_target(kind: str) -> Target:
    dev = tvm.device(kind, 0)
    if not dev.exist:
        raise DeviceError(f"no {kind} device found on this machine")
    return Target.from_device(dev)


def cuda_target_for_arch(arch: str = "sm_90") -> Target:
    """A CUDA target for a named arch, buildable on a machine without a GPU."""
    return Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})


def detect(device: str = "auto") -> DeviceTarget:
    """``auto`` picks the first GPU kind present, else the CPU."""
    if device not in DEVICE_CHOICES:
        raise DeviceError(f"unknown device {device!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if device == "cpu":
        return DeviceTarget("cpu", cpu_target())
    if device != "auto":
        return DeviceTarget(device, gpu_target(device))
    for kind in GPU_KINDS:
        try:
            if tvm.device(kind, 0).exist:
                return DeviceTarget(kind, Target.from_device(tvm.device(kind, 0)))
        except Exception:  # a runtime the wheel was built without raises instead of saying no
            continue
    return DeviceTarget("cpu", cpu_target())

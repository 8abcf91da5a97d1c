"""Build (or fetch from the cache) the TVM library for an architecture on a target.

Weights are parameters, so the library depends only on the architecture's shapes, the
target (with the detected CPU's model and instruction-set features) and the TVM version:
those form the cache key, and one library serves every checkpoint of that shape. The
pipeline is TVM's default for the target with one addition per kind: our hand-written
matmul schedule plus dlight's rules on the CPU, dlight's GPU rules on GPUs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm import relax
from tvm.s_tir import dlight as dl
from tvm.target import Target

from node.compiler.cpu_attention import use_fast_cpu_attention
from node.compiler.cpu_rope import use_fast_cpu_rope
from node.compiler.cpu_schedule import ElementwiseCPU, NTMatmulCPU
from node.errors import CompileError
from node.models import architectures
from node.models.llama.model import WeightLayout
from node.models.quant.blocks import SPLIT_LAYOUT_VERSION

log = logging.getLogger(__name__)

LIBRARY_FORMAT_VERSION = 13  # bump when the exported functions, the kernels or the pipeline change


def _cpu_features_digest() -> str:
    """The CPU's flags: same mcpu name with different features (avx512 or not) must not share."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return hashlib.sha256(line.split(":", 1)[1].strip().encode()).hexdigest()[:16]
    except OSError:
        pass
    return "unknown"


def library_cache_key(cfg, target: Target, layout: WeightLayout | None = None) -> str:
    """Shape, target, TVM and, for natively quantized weights, their layout (which block type
    each weight keeps): another layout is another library, the same ``model_id``."""
    payload = {
        "format": LIBRARY_FORMAT_VERSION,
        "shape": cfg.shape_dict(),
        "target": str(target),
        "host_features": _cpu_features_digest() if target.kind.name == "llvm" else None,
        "tvm": tvm.__version__,
    }
    if layout:
        payload["weight_layout"] = [SPLIT_LAYOUT_VERSION, sorted(layout.items())]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _pipeline(target: Target) -> tvm.transform.Pass:
    kind = target.kind.name
    if kind == "llvm":
        from tvm.relax.backend.cpu_generic import pipeline as backend

        schedule = [dl.ApplyDefaultSchedule(NTMatmulCPU(), dl.cpu.GEMV(), dl.cpu.Reduction(), ElementwiseCPU())]
    else:
        from tvm.relax.backend.cuda import pipeline as backend  # same GPU passes for other kinds

        schedule = []  # the GPU legalize passes already apply dlight's GPU rules

    @tvm.transform.module_pass(opt_level=0)
    def run(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        with target:
            passes = (
                backend.library_dispatch_passes(target)
                + [relax.transform.FuseTransposeMatmul()]
                + backend.legalize_passes(target)
                + schedule
                + backend.dataflow_lower_passes(target)
                + backend.finalize_passes(target)
            )
            return tvm.transform.Sequential(passes)(mod)

    return run


@dataclass
class CompiledLibrary:
    path: Path
    param_names: list[str]  # order of the packed parameter tuple
    param_shapes: list[tuple[int, ...]]
    param_dtypes: list[str]
    cache_key: str
    target: Target

    def load(self) -> tvm.runtime.Module:
        return tvm.runtime.load_module(str(self.path))


def export_ir(cfg, target: Target, layout: WeightLayout | None = None):
    """The architecture's module (``node.models.architectures``) exported with its spec."""
    model = architectures.of_config(cfg).model_class()(cfg, target, layout)
    mod, named_params, _ = model.export_tvm(spec=model.export_spec(), allow_extern=True)
    if target.kind.name == "llvm":  # RoPE before attention (NORMAL, or the model's own), as the fast kernels need
        mod = use_fast_cpu_attention(mod, cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim,
                                     sliding_window_size=architectures.of_config(cfg).sliding_window(cfg) or 0)
        mod = use_fast_cpu_rope(mod, cfg)
    return mod, named_params


def compile_model(cfg, target: Target, cache_dir: Path, *, layout: WeightLayout | None = None,
                  force: bool = False) -> CompiledLibrary:
    """Return the cached library for (shape, target, TVM, weight layout), building it on a miss."""
    key = library_cache_key(cfg, target, layout)
    lib_dir = Path(cache_dir) / "libs"
    lib_path = lib_dir / f"{cfg.model_type}-{key}.so"
    meta_path = lib_path.with_suffix(".json")
    if not force and lib_path.exists() and meta_path.exists():
        return _library(lib_path, json.loads(meta_path.read_text()), key, target)

    log.info("compiling %s (%d layers) for %s; this takes a while once per machine", cfg.model_type, cfg.num_hidden_layers, target.kind.name)
    start = time.perf_counter()
    try:
        mod, named_params = export_ir(cfg, target, layout)
        executable = tvm.compile(mod, target=target, relax_pipeline=_pipeline(target))
    except Exception as exc:  # TVM raises its own error types from deep inside; report one
        raise CompileError(f"TVM could not compile {cfg.model_type} for {target}: {exc}") from exc
    lib_dir.mkdir(parents=True, exist_ok=True)
    # Write to a temporary name and rename, so a killed build never leaves a half library.
    with tempfile.TemporaryDirectory(dir=lib_dir) as tmp:
        tmp_lib = Path(tmp) / lib_path.name
        executable.export_library(str(tmp_lib))
        meta = {
            "param_names": [name for name, _ in named_params],
            "param_shapes": [[int(d) for d in p.shape] for _, p in named_params],
            "param_dtypes": [p.dtype for _, p in named_params],
            "target": str(target),
            "tvm": tvm.__version__,
            "shape": cfg.shape_dict(),
        }
        tmp_meta = Path(tmp) / meta_path.name
        tmp_meta.write_text(json.dumps(meta, indent=1))
        os.replace(tmp_lib, lib_path)
        os.replace(tmp_meta, meta_path)
    log.info("compiled in %.1f s -> %s", time.perf_counter() - start, lib_path)
    return _library(lib_path, meta, key, target)


def _library(path: Path, meta: dict, key: str, target: Target) -> CompiledLibrary:
    dtypes = meta.get("param_dtypes", ["float32"] * len(meta["param_names"]))  # libraries before quantization
    return CompiledLibrary(path, meta["param_names"], [tuple(s) for s in meta["param_shapes"]], dtypes, key, target)

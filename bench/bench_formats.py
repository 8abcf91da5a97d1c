"""Formats benchmark: each stored form served natively against the same file widened to fp32.

For every GGUF file asked for (default: the default model as shipped, Q4_1, and the same
weights written as F16), two processes each load it through ``load_model`` (the CLI's path)
with ``--weights native`` and ``fp32`` from a fresh store, and report the resident memory after
loading (the steady state a node serves from), the weights' bytes and batch-1 decode tokens/s
on the same prompt. The fp32 path is what the node did with every non-legacy type before the
native kernels: it is the same-run baseline. Prints a table and writes JSON
(``bench/results/formats.json``). Never a timed assertion.

    python -m bench.bench_formats [--tokens 64] [--threads 2] [FILE.gguf ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.report import RESULTS, write_json

PROMPT = "The history of the printing press begins in"


def write_f16_copy(source: Path, target: Path) -> Path:
    """``source`` with every quantized matrix dequantized and stored as F16 (1-D tensors F32): the
    16-bit file of the same weights, as llama.cpp's ``--outtype f16`` would hold them."""
    import gguf
    from gguf.quants import dequantize

    if target.exists():
        return target
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(target) + ".part", arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape)]
        values = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
        writer.add_tensor(t.name, values.astype(np.float16) if values.ndim == 2 else values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(str(target) + ".part", target)
    return target


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(path: Path, weights: str, tokens: int) -> dict:
    """One file, one weights mode, in this (fresh) process."""
    from bench.bench_inference import raw_decode_rate
    from node.runtime.allocator import keep_freed_memory
    from node.runtime.loading import load_model

    keep_freed_memory()  # as the CLI does
    model = load_model(str(path), device="cpu", weights=weights, progress=lambda m: None)
    rt = model.runtime
    prompt = model.tokenizer.encode_prompt(PROMPT)[:16]
    raw_decode_rate(rt, prompt, 1, 8)  # warm-up
    rate = max(raw_decode_rate(rt, prompt, 1, tokens) for _ in range(3))
    return {"resident_mb": resident_mb(), "weight_mb": rt.weight_bytes / 2**20, "kv_cache_mb": rt.kv_cache_bytes / 2**20,
            "decode_tok_s_b1": rate, "backend": model.backend, "layout": sorted(set(model.weight_layout.values()))}


def run_child(path: Path, weights: str, tokens: int, threads: int, home: Path) -> dict:
    env = {**os.environ, "PROOFMESH_HOME": str(home), "TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    child = subprocess.run([sys.executable, "-m", "bench.bench_formats", "--only", weights, "--tokens", str(tokens), str(path)],
                           capture_output=True, text=True, env=env)
    if child.returncode:
        raise SystemExit(f"{path.name} {weights} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1)))
    ap.add_argument("--only", choices=("native", "fp32"), help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.only:
        print(json.dumps(measure(args.files[0], args.only, args.tokens)))
        return

    from compiled_models.registry import DEFAULT_MODEL
    from node.runtime import model_store

    files = args.files
    if not files:
        default = model_store.resolve(DEFAULT_MODEL)
        files = [default, write_f16_copy(default, RESULTS / "work" / (default.stem.split(".")[0] + ".F16.gguf"))]
    results: dict = {"threads": args.threads, "tokens": args.tokens, "cpu": _cpu(), "files": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for path in files:
            row = {"file_mb": path.stat().st_size / 2**20}
            for weights in ("native", "fp32"):
                home = Path(tmp) / f"{path.stem}-{weights}"
                print(f"{path.name}: {weights} ...", file=sys.stderr, flush=True)
                row[weights] = run_child(path, weights, args.tokens, args.threads, home)
                shutil.rmtree(home, ignore_errors=True)
            row["resident_native_over_fp32"] = row["native"]["resident_mb"] / row["fp32"]["resident_mb"]
            row["decode_native_over_fp32"] = row["native"]["decode_tok_s_b1"] / row["fp32"]["decode_tok_s_b1"]
            results["files"][path.name] = row
    print(f"\n{args.threads} threads, {args.tokens} decode tokens at batch 1; {results['cpu']}")
    print(f"{'file':<40}{'MiB':>7}{'path':>8}{'RSS MiB':>9}{'weights':>9}{'tok/s':>8}")
    for name, row in results["files"].items():
        for weights in ("native", "fp32"):
            r = row[weights]
            print(f"{name:<40}{row['file_mb']:7.0f}{weights:>8}{r['resident_mb']:9.0f}{r['weight_mb']:9.0f}{r['decode_tok_s_b1']:8.1f}")
        print(f"{'':<40}native / fp32: resident {row['resident_native_over_fp32']:.2f}x, decode {row['decode_native_over_fp32']:.2f}x")
    write_json(RESULTS / "formats.json", results)


def _cpu() -> str:
    import tvm

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    return f"{model}, {os.cpu_count()} cores, mcpu {tvm.get_global_func('target.llvm_get_system_cpu')()}"


if __name__ == "__main__":
    main()

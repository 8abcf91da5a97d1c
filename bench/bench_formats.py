"""Formats benchmark: each stored form served natively against the same file widened to fp32.

For every GGUF file asked for (default: the default model as shipped, Q4_1, the same weights
written as F16, and with ``--llama-cpp-quantize`` that F16 file quantized by llama.cpp's own
quantizer), three processes each load it: ``load_model`` (the CLI's path) with ``--weights
native`` and ``fp32`` from a fresh store, and llama-cpp-python (the ``bench`` extra). Each reports
its resident memory after loading (the steady state a node serves from), batch-1 decode tokens/s
on the same prompt, and its greedy continuation, compared token by token. The fp32 path is what
the node did with every non-legacy type before the native kernels: the same-run baseline.
Prints a table and writes JSON (``bench/results/formats.json``). Never a timed assertion.

    python -m bench.bench_formats [--tokens 64] [--threads 2] [--llama-cpp-quantize Q4_K_M,Q6_K] [FILE.gguf ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.report import RESULTS, machine, resident_mb, write_json

PROMPT = "The history of the printing press begins in"


def write_f16_copy(source: Path, target: Path) -> Path:
    """``source`` with every quantized matrix dequantized and stored as F16 (1-D tensors F32): the
    16-bit file of the same weights, as llama.cpp's ``--outtype f16`` would hold them."""
    import gguf
    from gguf.quants import dequantize

    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
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


LLAMA_CPP_FTYPES = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M")  # files of the default model made by llama.cpp's quantizer


def llama_cpp_quantize(source: Path, target: Path, ftype: str) -> Path:
    """``source`` (an F16 GGUF) quantized by llama.cpp's own quantizer (llama-cpp-python's
    ``llama_model_quantize``, the ``bench`` extra) into ``ftype`` (e.g. ``Q4_K_M``)."""
    import ctypes

    import llama_cpp

    if target.exists():
        return target
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(source).encode(), (str(target) + ".part").encode(), ctypes.byref(params)):
        raise SystemExit(f"llama.cpp could not quantize {source} to {ftype}")
    os.replace(str(target) + ".part", target)
    return target


def llama_cpp_measure(path: Path, tokens: int, threads: int) -> dict:
    """llama-cpp-python on the same file: its own process, the same prompt, batch-1 decode as a bare
    eval loop (bench_inference's), and its greedy continuation for the agreement column."""
    from llama_cpp import Llama

    from bench.llama_cpp_baseline import last_logits

    llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True, special=False)[:16]  # BOS where the vocabulary asks for one

    best, greedy = 0.0, []
    for _ in range(3):
        llm.reset()
        llm.eval(prompt)
        greedy = []
        t = time.perf_counter()
        for _ in range(tokens):
            greedy.append(int(np.argmax(last_logits(llm))))
            llm.eval([greedy[-1]])
        best = max(best, tokens / (time.perf_counter() - t))
    return {"decode_tok_s_b1": best, "resident_mb": resident_mb(), "prompt": prompt, "greedy": greedy}


def measure(path: Path, weights: str, tokens: int) -> dict:
    """One file, one weights mode, in this (fresh) process."""
    from bench.bench_inference import raw_decode_rate
    from bench.check_reference import greedy as greedy_continuation
    from node.runtime.allocator import keep_freed_memory
    from node.runtime.loading import load_model

    keep_freed_memory()  # as the CLI does
    model = load_model(str(path), device="cpu", weights=weights, progress=lambda m: None)
    rt = model.runtime
    prompt = model.tokenizer.encode_prompt(PROMPT)[:16]
    raw_decode_rate(rt, prompt, 1, 8)  # warm-up
    rate = max(raw_decode_rate(rt, prompt, 1, tokens) for _ in range(3))
    greedy, _ = greedy_continuation(rt, prompt, tokens)
    return {"resident_mb": resident_mb(), "weight_mb": rt.weight_bytes / 2**20, "kv_cache_mb": rt.kv_cache_bytes / 2**20,
            "decode_tok_s_b1": rate, "backend": model.backend, "layout": sorted(set(model.weight_layout.values())),
            "prompt": prompt, "greedy": greedy}


def run_child(path: Path, backend: str, tokens: int, threads: int, home: Path) -> dict:
    env = {**os.environ, "PROOFMESH_HOME": str(home), "TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    child = subprocess.run([sys.executable, "-m", "bench.bench_formats", "--only", backend, "--tokens", str(tokens),
                            "--threads", str(threads), str(path)], capture_output=True, text=True, env=env)
    if child.returncode:
        if backend == "llama_cpp":  # a missing or broken baseline must not cost the run
            return {"skipped": child.stderr.strip().splitlines()[-1][:200] if child.stderr.strip() else f"exit {child.returncode}"}
        raise SystemExit(f"{path.name} {backend} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def agreement(a: list[int], b: list[int]) -> int:
    """Tokens two greedy continuations share before they first differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1)))
    ap.add_argument("--llama-cpp-quantize", default="", help=f"also bench the default model quantized by llama.cpp "
                    f"into these types (comma-separated, e.g. {','.join(LLAMA_CPP_FTYPES)}; needs the bench extra)")
    ap.add_argument("--only", choices=("native", "fp32", "llama_cpp"), help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.only == "llama_cpp":
        print(json.dumps(llama_cpp_measure(args.files[0], args.tokens, args.threads)))
        return
    if args.only:
        print(json.dumps(measure(args.files[0], args.only, args.tokens)))
        return

    from compiled_models.registry import DEFAULT_MODEL
    from node.runtime import model_store

    files = args.files
    if not files:
        default = model_store.resolve(DEFAULT_MODEL)
        f16 = write_f16_copy(default, RESULTS / "work" / (default.stem.split(".")[0] + ".F16.gguf"))
        files = [default, f16] + [llama_cpp_quantize(f16, f16.with_name(f16.name.replace("F16", kind)), kind)
                                  for kind in args.llama_cpp_quantize.split(",") if kind]
    results: dict = {"threads": args.threads, "tokens": args.tokens, "machine": machine(), "files": {}}
    home = RESULTS / "work" / "store"  # compiled and prepared once (a node's warm start), kept between runs
    for path in files:
        row = {"file_mb": path.stat().st_size / 2**20}
        for weights in ("native", "fp32"):
            print(f"{path.name}: compiling and preparing ({weights}) ...", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-m", "node.cli", "compile", str(path), "--device", "cpu", "--weights", weights],
                           check=True, capture_output=True, env={**os.environ, "PROOFMESH_HOME": str(home)})
        for backend in ("native", "fp32", "llama_cpp"):
            print(f"{path.name}: {backend} ...", file=sys.stderr, flush=True)
            row[backend] = run_child(path, backend, args.tokens, args.threads, home)
        native, llama = row["native"], row["llama_cpp"]
        row["resident_native_over_fp32"] = native["resident_mb"] / row["fp32"]["resident_mb"]
        row["decode_native_over_fp32"] = native["decode_tok_s_b1"] / row["fp32"]["decode_tok_s_b1"]
        row["native_fp32_greedy_agree"] = agreement(native["greedy"], row["fp32"]["greedy"])
        if "greedy" in llama:
            row["decode_native_over_llama_cpp"] = native["decode_tok_s_b1"] / llama["decode_tok_s_b1"]
            row["native_llama_cpp_greedy_agree"] = agreement(native["greedy"], llama["greedy"])
            row["same_prompt_ids"] = native["prompt"] == llama["prompt"]
        results["files"][path.name] = row
    host = results["machine"]
    print(f"\n{args.threads} threads, {args.tokens} decode tokens at batch 1; {host['cpu']}, {host['cores']} cores, mcpu {host['mcpu']}")
    print(f"{'file':<40}{'MiB':>7}{'backend':>10}{'RSS MiB':>9}{'weights':>9}{'tok/s':>8}")
    for name, row in results["files"].items():
        for backend in ("native", "fp32", "llama_cpp"):
            r = row[backend]
            if "skipped" in r:
                print(f"{name:<40}{row['file_mb']:7.0f}{backend:>10}  skipped: {r['skipped']}")
                continue
            weights = f"{r['weight_mb']:9.0f}" if "weight_mb" in r else f"{'-':>9}"
            print(f"{name:<40}{row['file_mb']:7.0f}{backend:>10}{r['resident_mb']:9.0f}{weights}{r['decode_tok_s_b1']:8.1f}")
        line = (f"native / fp32: resident {row['resident_native_over_fp32']:.2f}x, decode {row['decode_native_over_fp32']:.2f}x, "
                f"greedy agree {row['native_fp32_greedy_agree']}/{args.tokens}")
        if "decode_native_over_llama_cpp" in row:
            line += (f"; native / llama.cpp decode {row['decode_native_over_llama_cpp']:.2f}x, greedy agree "
                     f"{row['native_llama_cpp_greedy_agree']}/{args.tokens}" + ("" if row["same_prompt_ids"] else " (other prompt ids)"))
        print(f"{'':<40}{line}")
    write_json(RESULTS / "formats.json", results)


if __name__ == "__main__":
    main()

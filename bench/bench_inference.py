"""Inference benchmark: the default model on TVM (quantized weights served natively, and the
fp32 path) against PyTorch eager and llama.cpp on the same GGUF file.

Same machine, same run, same thread count; every backend runs in its own subprocess so its
resident memory is its own. Prints a table and writes JSON (``bench/results/inference.json``).
Baselines are skipped, with a note, when their packages (the ``bench`` extra) are missing. The
bandwidth bound is the bytes of weights one decode step reads divided by the memory bandwidth
measured here (numpy streaming sums, 1 and N threads). Never a timed assertion.

    python -m bench.bench_inference [--tokens 64] [--threads 2] [--skip-torch] [--skip-llamacpp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from compiled_models.registry import DEFAULT_MODEL
from node.runtime import model_store
from node.models.llama.load import load_checkpoint  # numpy and gguf only: no TVM in the baselines' processes
from node.runtime.allocator import keep_freed_memory
from bench.llama_cpp_baseline import last_logits
from bench.report import RESULTS, resident_mb, write_json

PROMPT = "The history of the printing press begins in"
BACKENDS = ("tvm_native", "tvm_fp32", "torch_eager_fp32", "llama_cpp")


def _prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode_prompt(PROMPT * 64)
    return ids[:n]


def memory_bandwidth_gb_s(threads: int, size_mb: int = 512) -> float:
    """Streaming read bandwidth: numpy sums over ``size_mb`` of float32, split over ``threads``."""
    chunks = np.array_split(np.ones(size_mb * 2**20 // 4, np.float32), threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            t = time.perf_counter()
            list(pool.map(np.sum, chunks))
            best = max(best, size_mb * 2**20 / (time.perf_counter() - t) / 1e9)
    return best


def raw_decode_rate(rt, prompt: list[int], batch: int, tokens: int, with_prefill: bool = False) -> float:
    """Tokens/s of the bare loop on a runtime: ``batch`` sequences after ``prompt``, one batched
    decode and a numpy argmax per step. ``with_prefill``: the clock also covers the prefills (one
    sequence at a time, as the engine admits them), whose logits give each sequence its first of
    ``tokens`` tokens: the same work as an engine's answers of ``max_tokens = tokens``."""
    ids = list(range(1000, 1000 + batch))
    last = 0
    t = time.perf_counter()
    for s in ids:
        rt.add_sequence(s)
        last = int(np.argmax(rt.prefill(s, prompt)[-1]))
    toks = [last] * batch
    if not with_prefill:
        t = time.perf_counter()
    for _ in range(tokens - 1 if with_prefill else tokens):
        toks = [int(i) for i in np.argmax(rt.decode(ids, toks), axis=-1)]
    rate = batch * tokens / (time.perf_counter() - t)
    for s in ids:
        rt.remove_sequence(s)
    return rate


def bench_tvm(weights: str, tokens: int, prefill_len: int, threads: int) -> dict:
    """Cold start in a fresh store (compile + prepare, its own process), then warm start and the
    runs in this process from that store: its caches are now filled."""
    out: dict = {}
    model_path = model_store.resolve(DEFAULT_MODEL)
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    (root / "models").mkdir()
    shutil.copytree(model_path.parent, root / "models" / DEFAULT_MODEL)
    os.environ["PROOFMESH_HOME"] = str(root)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "node.cli", "compile", DEFAULT_MODEL, "--device", "cpu", "--weights", weights],
                   check=True, capture_output=True)
    out["cold_start_s"] = time.perf_counter() - t
    from node.runtime.loading import load_model  # TVM only in its own child: its OpenMP and llama.cpp's clash

    rss_before = resident_mb()
    t = time.perf_counter()
    model = load_model(DEFAULT_MODEL, device="cpu", weights=weights, progress=lambda m: None)
    out["warm_start_s"] = time.perf_counter() - t
    out["cold_start_s"] += out["warm_start_s"]
    rt = model.runtime
    out["weight_bytes"] = rt.weight_bytes  # what one decode step reads
    prompt = _prompt_ids(model.tokenizer, 16)

    raw_decode_rate(rt, prompt, 1, tokens)  # warm-up
    for b in (1, 4, 16):
        out[f"decode_tok_s_b{b}"] = max(raw_decode_rate(rt, prompt, b, tokens) for _ in range(2))
    long = _prompt_ids(model.tokenizer, prefill_len)
    rt.add_sequence(1)
    t = time.perf_counter()
    rt.prefill(1, long)
    out["prefill_tok_s"] = len(long) / (time.perf_counter() - t)
    rt.remove_sequence(1)
    t = time.perf_counter()
    rt.score(long)
    out["score_all_positions_tok_s"] = len(long) / (time.perf_counter() - t)
    out["backend"] = model.backend
    out["resident_mb"] = resident_mb()
    out["resident_model_mb"] = out["resident_mb"] - rss_before
    out["kv_cache_mb"] = rt.kv_cache_bytes / 2**20
    tmp.cleanup()
    return out


def build_torch_llama(ckpt):
    """The checkpoint as a transformers LlamaForCausalLM in eval mode (PyTorch eager, fp32)."""
    import torch
    import transformers

    c = ckpt.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings,
        max_position_embeddings=c.max_position_embeddings,
    )
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in ckpt.weights.items()}, strict=False)
    if c.tie_word_embeddings:
        model.tie_weights()
    return model


def bench_torch(tokens: int, prefill_len: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    ckpt = load_checkpoint(model_store.resolve(DEFAULT_MODEL))
    model = build_torch_llama(ckpt)
    prompt = _prompt_ids(ckpt.tokenizer, 16)
    out = {}

    @torch.inference_mode()
    def decode_run(batch: int) -> float:
        ids = torch.tensor([prompt] * batch)
        res = model(ids, use_cache=True)
        past, nxt = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(tokens):
            res = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True)
        return batch * tokens / (time.perf_counter() - t)

    decode_run(1)
    for b in (1, 4, 16):
        out[f"decode_tok_s_b{b}"] = decode_run(b)
    long = torch.tensor([_prompt_ids(ckpt.tokenizer, prefill_len)])
    with torch.inference_mode():
        t = time.perf_counter()
        model(long)
        out["prefill_tok_s"] = long.shape[1] / (time.perf_counter() - t)
    out["resident_mb"] = resident_mb()
    return out


def bench_llamacpp(tokens: int, prefill_len: int, threads: int) -> dict:
    from llama_cpp import Llama

    path = model_store.resolve(DEFAULT_MODEL)
    llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=2048, verbose=False)
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True)[:16]
    out = {}
    for _ in range(2):  # first run warms up
        llm.reset()
        llm.eval(prompt)
        t = time.perf_counter()
        for _ in range(tokens):
            nxt = int(np.argmax(last_logits(llm)))
            llm.eval([nxt])
        out["decode_tok_s_b1"] = tokens / (time.perf_counter() - t)
    long = llm.tokenize((PROMPT * 64).encode(), add_bos=True)[:prefill_len]
    llm.reset()
    t = time.perf_counter()
    llm.eval(long)
    out["prefill_tok_s"] = len(long) / (time.perf_counter() - t)
    out["resident_mb"] = resident_mb()
    out["weight_bytes"] = path.stat().st_size
    return out


def run_backend(name: str, args: argparse.Namespace) -> dict:
    """One backend, in this process (the child side of ``main``)."""
    if name.startswith("tvm_"):
        return bench_tvm(name.removeprefix("tvm_"), args.tokens, args.prefill_len, args.threads)
    fn = {"torch_eager_fp32": bench_torch, "llama_cpp": bench_llamacpp}[name]
    try:
        return fn(args.tokens, args.prefill_len, args.threads)
    except ImportError as exc:
        return {"skipped": f"not installed: {exc.name} (pip install '.[bench]')"}


def _row(name: str, values: dict, keys: list[str]) -> str:
    cells = [f"{values[k]:10.1f}" if isinstance(values.get(k), float) else f"{'-':>10}" for k in keys]
    return f"{name:<18}" + "".join(cells)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1)))
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--only", choices=BACKENDS, help=argparse.SUPPRESS)  # child process: one backend, JSON out
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    keep_freed_memory()  # as the CLI does for every command that runs TVM
    if args.only:
        print(json.dumps(run_backend(args.only, args)))
        return

    results: dict = {"threads": args.threads, "tokens": args.tokens, "prefill_len": args.prefill_len}
    skipped = {"torch_eager_fp32": args.skip_torch, "llama_cpp": args.skip_llamacpp}
    for name in BACKENDS:
        if skipped.get(name):
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        child = subprocess.run([sys.executable, "-m", "bench.bench_inference", "--only", name, "--tokens", str(args.tokens),
                                "--prefill-len", str(args.prefill_len), "--threads", str(args.threads)],
                               capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if child.returncode == 0:
            results[name] = json.loads(child.stdout.strip().splitlines()[-1])
        elif name.startswith("tvm_"):
            raise SystemExit(f"{name} failed:\n{child.stderr[-3000:]}")
        else:  # a broken baseline build (e.g. llama.cpp's AMX kernels) must not cost the whole run
            print(f"{name} failed (exit {child.returncode}):\n{child.stderr[-1500:]}", file=sys.stderr)
            results[name] = {"skipped": f"failed with exit code {child.returncode}"}
    bandwidth = {f"{t}_threads": memory_bandwidth_gb_s(t) for t in sorted({1, args.threads})}
    results["memory_bandwidth_gb_s"] = bandwidth
    best_bw = max(bandwidth.values())

    native, llama = results["tvm_native"], results.get("llama_cpp", {})
    native["bandwidth_bound_tok_s"] = best_bw * 1e9 / native["weight_bytes"]
    ratios = {"native_b1_share_of_bandwidth_bound": native["decode_tok_s_b1"] / native["bandwidth_bound_tok_s"]}
    for base in ("tvm_fp32", "torch_eager_fp32", "llama_cpp"):
        for key in ("decode_tok_s_b1", "decode_tok_s_b4", "decode_tok_s_b16", "prefill_tok_s"):
            if key in results.get(base, {}):
                ratios[f"native_over_{base}_{key.removesuffix('_tok_s').removeprefix('decode_tok_s_')}"] = native[key] / results[base][key]
    results["ratios"] = ratios

    keys = ["decode_tok_s_b1", "decode_tok_s_b4", "decode_tok_s_b16", "prefill_tok_s", "resident_mb"]
    print(f"\nSmolLM2-135M-Instruct, {args.threads} threads, {args.tokens} decode tokens (tokens/s; resident MiB)")
    print(f"{'backend':<18}{'dec b1':>10}{'dec b4':>10}{'dec b16':>10}{'prefill':>10}{'RSS MiB':>10}")
    for name in BACKENDS:
        if name in results:
            print(_row(name, results[name], keys) + ("  " + results[name]["skipped"] if "skipped" in results[name] else ""))
    gguf_mb = model_store.resolve(DEFAULT_MODEL).stat().st_size / 2**20
    print(f"memory bandwidth {', '.join(f'{v:.1f} GB/s ({k})' for k, v in bandwidth.items())}; native weights "
          f"{native['weight_bytes'] / 2**20:.1f} MiB per token -> bound {native['bandwidth_bound_tok_s']:.0f} tok/s")
    native["resident_over_target"] = native["resident_mb"] / (2 * gguf_mb + native["kv_cache_mb"])
    print(f"native resident {native['resident_mb']:.0f} MiB (Python + TVM {native['resident_mb'] - native['resident_model_mb']:.0f}, "
          f"model + touched KV pages {native['resident_model_mb']:.0f}) vs target 2 x GGUF ({gguf_mb:.0f} MiB) + KV reserve "
          f"({native['kv_cache_mb']:.0f} MiB): {native['resident_over_target']:.2f}x; "
          f"cold start {native['cold_start_s']:.1f} s, warm {native['warm_start_s']:.2f} s")
    for k, v in ratios.items():
        print(f"{k:<44} {v:6.2f}x")
    if llama and "decode_tok_s_b1" in llama:
        print(f"(llama.cpp weight bytes: the whole GGUF file, {llama['weight_bytes'] / 2**20:.0f} MiB)")
    write_json(RESULTS / "inference.json", results)


if __name__ == "__main__":
    main()

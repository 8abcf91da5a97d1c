"""Inference benchmark: the default model on TVM against PyTorch eager and llama.cpp.

Same machine, same run, same thread count. Prints a table and writes JSON
(``bench/results/inference.json``). Baselines are skipped, with a note, when their packages
(the ``bench`` extra) are missing. Never a timed assertion: ratios are for people to read.

    python -m bench.bench_inference [--tokens 64] [--threads 2] [--skip-torch] [--skip-llamacpp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from compiled_models.registry import DEFAULT_MODEL
from node import model_store
from node.loaded_model import load_model
from node.models.llama.checkpoint import load_checkpoint

RESULTS = Path(__file__).parent / "results"
PROMPT = "The history of the printing press begins in"


def _prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode_prompt(PROMPT * 64)
    return ids[:n]


def bench_tvm(tokens: int, prefill_len: int) -> dict:
    out: dict = {}
    model_path = model_store.resolve(DEFAULT_MODEL)
    with tempfile.TemporaryDirectory() as tmp:  # cold: empty library cache
        root = Path(tmp)
        (root / "models").mkdir()
        shutil.copytree(model_path.parent, root / "models" / DEFAULT_MODEL)
        t = time.perf_counter()
        load_model(DEFAULT_MODEL, device="cpu", root=root, progress=lambda m: None)
        out["cold_start_s"] = time.perf_counter() - t
    t = time.perf_counter()
    model = load_model(DEFAULT_MODEL, device="cpu", progress=lambda m: None)  # warm: cached library
    out["warm_start_s"] = time.perf_counter() - t
    rt = model.runtime
    prompt = _prompt_ids(model.tokenizer, 16)

    def decode_run(batch: int) -> float:
        ids = list(range(1000, 1000 + batch))
        for s in ids:
            rt.add_sequence(s)
            last = int(np.argmax(rt.prefill(s, prompt)[-1]))
        toks = [last] * batch
        t = time.perf_counter()
        for _ in range(tokens):
            logits = rt.decode(ids, toks)
            toks = [int(i) for i in np.argmax(logits, axis=-1)]
        dt = time.perf_counter() - t
        for s in ids:
            rt.remove_sequence(s)
        return batch * tokens / dt

    decode_run(1)  # warm-up
    for b in (1, 4, 16):
        out[f"decode_tok_s_b{b}"] = decode_run(b)
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
    out["decode_tok_s_b1"] = decode_run(1)
    out["decode_tok_s_b16"] = decode_run(16)
    long = torch.tensor([_prompt_ids(ckpt.tokenizer, prefill_len)])
    with torch.inference_mode():
        t = time.perf_counter()
        model(long)
        out["prefill_tok_s"] = long.shape[1] / (time.perf_counter() - t)
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
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([nxt])
        out["decode_tok_s_b1"] = tokens / (time.perf_counter() - t)
    long = llm.tokenize((PROMPT * 64).encode(), add_bos=True)[:prefill_len]
    llm.reset()
    t = time.perf_counter()
    llm.eval(long)
    out["prefill_tok_s"] = len(long) / (time.perf_counter() - t)
    return out


def _row(name: str, values: dict, keys: list[str]) -> str:
    cells = [f"{values[k]:10.1f}" if isinstance(values.get(k), float) else f"{'-':>10}" for k in keys]
    return f"{name:<22}" + "".join(cells)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1)))
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--skip-llamacpp", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))

    results: dict = {"threads": args.threads, "tokens": args.tokens, "tvm": bench_tvm(args.tokens, args.prefill_len)}
    for name, fn, skip in (("torch_eager_fp32", bench_torch, args.skip_torch), ("llama_cpp_q4_1", bench_llamacpp, args.skip_llamacpp)):
        if skip:
            continue
        try:
            results[name] = fn(args.tokens, args.prefill_len, args.threads)
        except ImportError as exc:
            results[name] = {"skipped": f"not installed: {exc.name} (pip install '.[bench]')"}

    tvm_r, torch_r = results["tvm"], results.get("torch_eager_fp32", {})
    ratios = {}
    if "decode_tok_s_b1" in torch_r:
        ratios["tvm_b1_over_torch_b1"] = tvm_r["decode_tok_s_b1"] / torch_r["decode_tok_s_b1"]
        ratios["tvm_b16_over_torch_b16"] = tvm_r["decode_tok_s_b16"] / torch_r["decode_tok_s_b16"]
    if "decode_tok_s_b1" in results.get("llama_cpp_q4_1", {}):
        ratios["tvm_b1_over_llamacpp_b1"] = tvm_r["decode_tok_s_b1"] / results["llama_cpp_q4_1"]["decode_tok_s_b1"]
    ratios["tvm_b16_over_tvm_b1"] = tvm_r["decode_tok_s_b16"] / tvm_r["decode_tok_s_b1"]
    results["ratios"] = ratios

    keys = ["decode_tok_s_b1", "decode_tok_s_b4", "decode_tok_s_b16", "prefill_tok_s"]
    print(f"\nSmolLM2-135M-Instruct, {args.threads} threads, {args.tokens} decode tokens (tokens/s)")
    print(f"{'backend':<22}{'dec b1':>10}{'dec b4':>10}{'dec b16':>10}{'prefill':>10}")
    for name in ("tvm", "torch_eager_fp32", "llama_cpp_q4_1"):
        if name in results:
            print(_row(name, results[name], keys) + ("  " + results[name]["skipped"] if "skipped" in results[name] else ""))
    print(f"TVM cold start {tvm_r['cold_start_s']:.1f} s, warm start {tvm_r['warm_start_s']:.2f} s, "
          f"teacher-forced scoring {tvm_r['score_all_positions_tok_s']:.0f} tok/s")
    for k, v in ratios.items():
        print(f"{k:<28} {v:6.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "inference.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {RESULTS / 'inference.json'}")


if __name__ == "__main__":
    main()

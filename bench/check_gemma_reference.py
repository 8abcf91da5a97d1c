"""Gemma 3 270M (the Q4_K_M GGUF, DESIGN.md's "Models these machines can reach") in TVM against the
independent float64 numpy reference (``node.models.gemma3.reference``).

For each prompt (the GGUF's own SentencePiece tokenizer, BOS first as its metadata says) and each
backend (``fp32``: every weight dequantized at load; ``native``: the K-quant, Q5_0 and Q8_0 blocks
computed on in place), TVM decodes 64 greedy tokens the way the engine does (one prefill in
128-token chunks, then one decode step per token). The reference then runs one causal pass over
prompt + continuation: the continuations agree wherever TVM's token is the reference's argmax at
that step (then the reference's own greedy continuation is the same), and the logits of every
decode step and of a teacher-forced ``score`` over the same ids are compared with the reference's.
One prompt is longer than the 512-token sliding window, so the window and the per-layer RoPE bases
are checked on the real model; for it the table also shows how far the reference moves when the
window is ignored (what a backend that ignored it would be off by).

    python -m bench.check_gemma_reference --gguf gemma-3-270m-q4_k_m.gguf [--tokens 64] [--out gemma_check.json]

Prints a table and writes the figures as JSON. Not a test: it needs the 237 MB file and minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from node.compiler.build import compile_model
from node.compiler.targets import detect
from node.models.gemma3.reference import NumpyGemma3
from node.models.llama.load import load_checkpoint
from node.models.llama.model import fuse_hf_weights, native_params
from node.runtime.model_runtime import CacheLimits, ModelRuntime

log = logging.getLogger("check_gemma_reference")

SHORT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, there was a little",
    "The best way to learn a new language is to",
)
LONG_TEXT = ("The river runs through the old town, past the market and the church, and every "
             "morning the people walk along it to work. ")
LIMITS = CacheLimits(max_batch_size=1, max_total_tokens=2048, prefill_chunk=128)


def greedy(rt: ModelRuntime, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """n greedy tokens as the engine makes them, and the logits each was drawn from (n, vocab)."""
    rt.add_sequence(0)
    try:
        rows = [rt.prefill(0, prompt)[-1]]
        out = [int(np.argmax(rows[-1]))]
        while len(out) < n:
            rows.append(rt.decode([0], [out[-1]])[0])
            out.append(int(np.argmax(rows[-1])))
    finally:
        rt.remove_sequence(0)
    return out, np.stack(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--long-repeats", type=int, default=20, help="repeats of a 30-token sentence in the long prompt")
    ap.add_argument("--store", type=Path, default=None, help="compiled-library cache (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=Path("gemma_check.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    start = time.perf_counter()
    ckpt = load_checkpoint(args.gguf, keep_quantized=True)
    cfg, tok = ckpt.config, ckpt.tokenizer
    fp32 = ckpt.dequantized().weights
    log.info("read %s (%s) in %.1f s", args.gguf.name, ckpt.weight_format, time.perf_counter() - start)
    device = detect("cpu")
    store = args.store or Path(tempfile.mkdtemp(prefix="gemma-check-"))
    params, layout = native_params(fuse_hf_weights(cfg, ckpt.weights))
    backends = {
        "fp32": ModelRuntime(cfg, compile_model(cfg, device.target, store), fuse_hf_weights(cfg, fp32), device, LIMITS),
        "native": ModelRuntime(cfg, compile_model(cfg, device.target, store, layout=layout), params, device, LIMITS),
    }
    reference = NumpyGemma3(cfg, fp32)  # float64
    unwindowed = NumpyGemma3(dataclasses.replace(cfg, sliding_window=10**9), fp32)

    prompts = [("short", tok.encode_prompt(p)) for p in SHORT_PROMPTS]
    prompts.append(("long", tok.encode_prompt(LONG_TEXT * args.long_repeats)))
    results = []
    for kind, prompt in prompts:
        first = len(prompt) - 1  # the row that predicts the first generated token
        for name, rt in backends.items():
            t0 = time.perf_counter()
            out, decode_rows = greedy(rt, prompt, args.tokens)
            ids = prompt + out
            ref_rows = reference.logits(ids, from_position=first)[: args.tokens]  # (n, vocab), float64
            scored = rt.score(ids, from_position=first)[: args.tokens]
            agree = ref_rows.argmax(axis=1) == np.asarray(out)
            top2 = np.sort(ref_rows, axis=1)[:, -2:]
            window_effect = None
            if len(ids) > cfg.sliding_window:
                ignored = unwindowed.logits(ids, from_position=first)[: args.tokens]
                window_effect = float(np.abs(ignored - ref_rows).max())
            row = {
                "prompt": kind, "backend": name, "prompt_tokens": len(prompt), "generated": len(out),
                "greedy_agree": int(agree.sum()), "first_disagreement": None if agree.all() else int(np.argmin(agree)),
                "min_reference_margin": float((top2[:, 1] - top2[:, 0]).min()),
                "max_abs_diff_decode": float(np.abs(decode_rows - ref_rows).max()),
                "max_abs_diff_teacher_forced": float(np.abs(scored - ref_rows).max()),
                "max_abs_logit": float(np.abs(ref_rows).max()),
                "window_effect": window_effect,
                "text": tok.decode(out),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            results.append(row)
            log.info("%s", row)
    print(f"{'prompt':6} {'backend':7} {'tokens':>6} {'agree':>9} {'min margin':>10} {'decode |d|':>11} "
          f"{'scored |d|':>11} {'no window':>10}  continuation")
    for r in results:
        effect = f"{r['window_effect']:10.2f}" if r["window_effect"] is not None else f"{'-':>10}"
        print(f"{r['prompt']:6} {r['backend']:7} {r['prompt_tokens']:6d} {r['greedy_agree']:4d}/{r['generated']:<4d} "
              f"{r['min_reference_margin']:10.4f} {r['max_abs_diff_decode']:11.2e} "
              f"{r['max_abs_diff_teacher_forced']:11.2e} {effect}  {r['text'][:50]!r}")
    args.out.write_text(json.dumps({"model": str(args.gguf), "weight_format": ckpt.weight_format,
                                    "device": device.description, "results": results}, indent=1))


if __name__ == "__main__":
    main()

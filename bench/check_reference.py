"""A GGUF file of any supported architecture in TVM against the independent float64 numpy
reference of its architecture (``node.models.architectures``: the numpy forward over the ``gguf``
package's dequantized weights, no TVM in it), on both backends: ``fp32`` (every weight dequantized
at load) and ``native`` (the K-quant, Q5_x, legacy blocks or 16-bit floats computed on in place).

For each of ten prompts (the file's own tokenizer and BOS rule) TVM decodes 64 greedy tokens the
way the engine does (one prefill in 128-token chunks, then one decode step per token). The
reference then runs one causal pass over prompt + continuation: the continuations agree wherever
TVM's token is the reference's argmax at that step (then the reference's own greedy continuation
is the same). The issue's rule: equal up to the first position whose reference top-2 margin is
under ``--near-tie`` (1e-3; past a near-tie rounding may pick either, and both continuations are
honest), and a teacher-forced ``score`` over the same ids within 1e-4 of the reference's logits.
One prompt is longer than a sliding window where the model has one: for it the table also shows
how far the reference moves when the window is ignored (what a backend that ignored it would be
off by).

    python -m bench.check_reference FILE.gguf [FILE.gguf ...] [--tokens 64] [--out reference_check.json]

Prints a table and writes the figures as JSON. Not a test: it needs real files and minutes.
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
from node.models import architectures
from node.models.llama.load import load_checkpoint
from node.models.llama.model import fuse_hf_weights, native_params
from node.runtime.model_runtime import CacheLimits, ModelRuntime

log = logging.getLogger("check_reference")

SHORT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, there was a little",
    "The best way to learn a new language is to",
    "def fibonacci(n):\n    ",
    "In 1969, the first humans",
    "Water boils at a temperature of",
    "The three primary colors are",
    "Le petit chat noir",
    "A recipe for pancakes: first,",
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
    ap.add_argument("gguf", type=Path, nargs="+")
    ap.add_argument("--near-tie", type=float, default=1e-3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--long-repeats", type=int, default=20, help="repeats of a 30-token sentence in the long prompt")
    ap.add_argument("--store", type=Path, default=None, help="compiled-library cache (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=Path("reference_check.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    report = [check_file(path, args) for path in args.gguf]
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


def check_file(gguf: Path, args: argparse.Namespace) -> dict:
    """Both backends of one file against the reference, every prompt: a row each."""

    start = time.perf_counter()
    ckpt = load_checkpoint(gguf, keep_quantized=True)
    cfg, tok = ckpt.config, ckpt.tokenizer
    fp32 = ckpt.dequantized().weights
    log.info("read %s (%s) in %.1f s", gguf.name, ckpt.weight_format, time.perf_counter() - start)
    device = detect("cpu")
    store = args.store or Path(tempfile.mkdtemp(prefix="gemma-check-"))
    params, layout = native_params(fuse_hf_weights(cfg, ckpt.weights))
    backends = {
        "fp32": ModelRuntime(cfg, compile_model(cfg, device.target, store), fuse_hf_weights(cfg, fp32), device, LIMITS),
        "native": ModelRuntime(cfg, compile_model(cfg, device.target, store, layout=layout), params, device, LIMITS),
    }
    reference_class = architectures.of_config(cfg).reference
    reference = reference_class(cfg, fp32)  # float64
    window = getattr(cfg, "sliding_window", None)
    unwindowed = reference_class(dataclasses.replace(cfg, sliding_window=10**9), fp32) if window else None

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
            if unwindowed is not None and len(ids) > window:
                ignored = unwindowed.logits(ids, from_position=first)[: args.tokens]
                window_effect = float(np.abs(ignored - ref_rows).max())
            margins = top2[:, 1] - top2[:, 0]
            first_disagreement = None if agree.all() else int(np.argmin(agree))
            near_ties = np.flatnonzero(margins < args.near_tie)
            first_near_tie = int(near_ties[0]) if near_ties.size else None
            scored_diff = float(np.abs(scored - ref_rows).max())
            row = {
                "prompt": kind, "backend": name, "prompt_tokens": len(prompt), "generated": len(out),
                "greedy_agree": int(agree.sum()), "first_disagreement": first_disagreement,
                "first_near_tie": first_near_tie,
                "meets_target": (first_disagreement is None or (first_near_tie is not None and first_disagreement >= first_near_tie))
                                and scored_diff <= 1e-4,
                "min_reference_margin": float(margins.min()),
                "max_abs_diff_decode": float(np.abs(decode_rows - ref_rows).max()),
                "max_abs_diff_teacher_forced": scored_diff,
                "max_abs_logit": float(np.abs(ref_rows).max()),
                "window_effect": window_effect,
                "text": tok.decode(out),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            results.append(row)
            log.info("%s", row)
    print(f"\n{gguf.name} ({ckpt.weight_format}) on {device.description}")
    print(f"{'prompt':6} {'backend':7} {'tokens':>6} {'agree':>9} {'1st tie':>7} {'min margin':>10} {'decode |d|':>11} "
          f"{'scored |d|':>11} {'no window':>10} {'target':>6}  continuation")
    for r in results:
        effect = f"{r['window_effect']:10.2f}" if r["window_effect"] is not None else f"{'-':>10}"
        tie = f"{r['first_near_tie']:7d}" if r["first_near_tie"] is not None else f"{'-':>7}"
        print(f"{r['prompt']:6} {r['backend']:7} {r['prompt_tokens']:6d} {r['greedy_agree']:4d}/{r['generated']:<4d} {tie} "
              f"{r['min_reference_margin']:10.4f} {r['max_abs_diff_decode']:11.2e} "
              f"{r['max_abs_diff_teacher_forced']:11.2e} {effect} {'met' if r['meets_target'] else 'NOT':>6}  {r['text'][:40]!r}")
    return {"model": str(gguf), "weight_format": ckpt.weight_format, "device": device.description, "results": results}


if __name__ == "__main__":
    main()

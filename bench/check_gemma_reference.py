"""Gemma 3 270M (the Q4_K_M GGUF, DESIGN.md's "Models these machines can reach") in TVM against the
independent float64 numpy reference (``node.models.gemma3.reference``), on the fp32 path.

For each prompt (token ids: the Gemma tokenizer is not in this tree yet, so prompts are spelled
from the GGUF vocabulary's whole-word pieces), TVM decodes 64 greedy tokens the way the engine does
(one prefill in 128-token chunks, then one decode step per token). The reference then runs one
causal pass over prompt + continuation: the continuations agree wherever TVM's token is the
reference's argmax at that step (then the reference's own greedy continuation is the same), and
the logits of every decode step and of a teacher-forced ``score`` over the same ids are compared
with the reference's. One prompt is longer than the 512-token sliding window, so the window and the
per-layer RoPE bases are checked on the real model.

    python -m bench.check_gemma_reference --gguf gemma-3-270m-q4_k_m.gguf [--tokens 64] [--out gemma_check.json]

Prints a table and writes the figures as JSON. Not a test: it needs the 237 MB file and minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from node.compiler.build import compile_model
from node.compiler.targets import detect
from node.models.gemma3.reference import NumpyGemma3
from node.models.llama.gguf_loader import read_gguf_weights
from node.models.llama.model import fuse_hf_weights
from node.models.quant.blocks import QuantizedTensor
from node.runtime.model_runtime import CacheLimits, ModelRuntime

log = logging.getLogger("check_gemma_reference")

SHORT_PROMPTS = (
    "The capital of France is",
    "Once upon a time , there was a little",
    "The best way to learn a new language is to",
)
LONG_TEXT = ("The river runs through the old town , past the market and the church , and every "
             "morning the people walk along it to work . ")


def ids_of(text: str, tokens: list[str], bos: int) -> list[int]:
    """Token ids of space-separated words as SentencePiece pieces (``▁word``; the first word without
    the space marker, as Gemma's tokenizer has no space prefix), BOS first."""
    index = {t: i for i, t in enumerate(tokens)}
    out = [bos]
    for n, word in enumerate(text.split()):
        piece = word if n == 0 or word in ",." else "\u2581" + word
        if piece not in index:
            raise KeyError(f"no vocabulary piece {piece!r}")
        out.append(index[piece])
    return out


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
    ap.add_argument("--long-words", type=int, default=600, help="words in the prompt longer than the window")
    ap.add_argument("--store", type=Path, default=None, help="compiled-library cache (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=Path("gemma_check.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    start = time.perf_counter()
    model = read_gguf_weights(args.gguf)
    cfg = model.config
    weights = {n: w.dequantize() if isinstance(w, QuantizedTensor) else w for n, w in model.weights.items()}
    log.info("read %s (%s) in %.1f s", args.gguf.name, model.weight_format, time.perf_counter() - start)
    device = detect("cpu")
    store = args.store or Path(tempfile.mkdtemp(prefix="gemma-check-"))
    start = time.perf_counter()
    library = compile_model(cfg, device.target, store)
    log.info("library ready in %.1f s", time.perf_counter() - start)
    rt = ModelRuntime(cfg, library, fuse_hf_weights(cfg, weights), device,
                      CacheLimits(max_batch_size=1, max_total_tokens=2048, prefill_chunk=128))
    reference = NumpyGemma3(cfg, weights)

    tokens, bos = model.meta["tokenizer.ggml.tokens"], int(model.meta["tokenizer.ggml.bos_token_id"])
    long_words = (LONG_TEXT.split() * (args.long_words // len(LONG_TEXT.split()) + 1))[: args.long_words]
    prompts = [("short", ids_of(p, tokens, bos)) for p in SHORT_PROMPTS] + [("long", ids_of(" ".join(long_words), tokens, bos))]
    results = []
    for kind, prompt in prompts:
        t0 = time.perf_counter()
        out, decode_rows = greedy(rt, prompt, args.tokens)
        ids = prompt + out
        first = len(prompt) - 1  # the row that predicts the first generated token
        ref_rows = reference.logits(ids, from_position=first)[: args.tokens]  # (n, vocab), float64
        scored = rt.score(ids, from_position=first)[: args.tokens]
        ref_argmax = ref_rows.argmax(axis=1)
        agree = ref_argmax == np.asarray(out)
        top2 = np.sort(ref_rows, axis=1)[:, -2:]
        row = {
            "kind": kind, "prompt_tokens": len(prompt), "generated": len(out),
            "greedy_agree": int(agree.sum()), "first_disagreement": int(np.argmin(agree)) if not agree.all() else None,
            "min_reference_margin": float((top2[:, 1] - top2[:, 0]).min()),
            "max_abs_diff_decode": float(np.abs(decode_rows - ref_rows).max()),
            "max_abs_diff_teacher_forced": float(np.abs(scored - ref_rows).max()),
            "max_abs_logit": float(np.abs(ref_rows).max()),
            "text": "".join(tokens[i] for i in out).replace("\u2581", " "),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        results.append(row)
        log.info("%s", row)
    print(f"{'prompt':6} {'tokens':>6} {'agree':>9} {'min margin':>10} {'decode |d|':>11} {'scored |d|':>11}  continuation")
    for r in results:
        print(f"{r['kind']:6} {r['prompt_tokens']:6d} {r['greedy_agree']:4d}/{r['generated']:<4d} "
              f"{r['min_reference_margin']:10.4f} {r['max_abs_diff_decode']:11.2e} "
              f"{r['max_abs_diff_teacher_forced']:11.2e}  {r['text'][:60]!r}")
    args.out.write_text(json.dumps({"model": str(args.gguf), "weight_format": model.weight_format,
                                    "backend": device.description, "results": results}, indent=1))


if __name__ == "__main__":
    main()

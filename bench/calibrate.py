"""Calibrate the verifier's tolerances (eps, tau) by measurement across honest backends.

Honest answers are generated on several backends and each is re-checked on backends that
differ from it; the largest honest fingerprint difference and the most negative honest sampling
lead set ``tau`` and ``eps`` with a safety factor. A false fraud verdict against an honest node is
as bad as a missed cheat, so the table also shows how far the cheats sit above the tolerances
(``bench/bench_cheats.py``).

Generation backends: TVM for the host's own mcpu with the engine at batch 1 and at batch 8, and
TVM for a generic x86-64 target at batch 8. Verifiers: TVM host (2 threads), TVM generic x86-64
with 1 thread and TVM host with 1 thread (each in a subprocess: TVM's thread count is fixed per
process), and the independent float64 numpy reference. Quantized models run natively on every
TVM backend (kernels over the GGML blocks); for them the dequantized fp32 path (``host-fp32``)
is one more generator (batch 8) and one more verifier, so native and fp32 check each other. Models, one row group per weight dtype:
the default model (GGUF Q4_1/Q8_0, or the real models given with ``--model``) and tiny random
models (fp32 and bf16 safetensors, GGUF Q8_0, and a Q4_K_M-like mix of Q4_K, Q6_K, Q5_0, Q8_0).

A share of the honest answers (``--grammar-share``, default a quarter) are structured output
drawn under a grammar's mask (``tests.node.verification.harness.STRUCTURED``: JSON mode, a JSON
schema, a forced tool call; the tiny models' 256-token context holds no tool prompt, so they get the first two):
the table repeats their statistics on their own, with the false fraud verdicts the product's
tolerances (``verify.verifier.Tolerances``, finish rules included) would give.

    python -m bench.calibrate [--default-answers 80] [--tiny-answers 1200] [--grammar-share 0.25] [--out bench/calibration]
                              [--tiny-models tiny-q4_k_m,...] [--model LABEL=MODEL ...]

Writes ``calibration.json`` (every pair's statistics and the chosen tolerances) and
``calibration.md`` (the table) under ``--out``; both are committed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tests.node.verification.harness import (STRUCTURED, Generator, NumpyBackend, request_mix,
                                             structured_grammar)
from compiled_models.registry import DEFAULT_MODEL
from node.runtime import model_store
from node.runtime.loading import LoadedModel, load_checkpoint_cached, load_model
from node.models import architectures
from node.runtime.model_runtime import CacheLimits
from node.compiler.targets import GENERIC_X86_CPU, DeviceTarget, cpu_target, detect
from verify.evidence import AnswerFile
from verify.finish import finish_failures
from verify.identity import NodeKey
from verify.verifier import Tolerances, check_positions

SAFETY_FACTOR = 10.0
NUDGE_EPS = 1e-3  # slack for a token honest rounding pushed out of top-k/top-p (see verifier)
LIMITS = CacheLimits(max_batch_size=8, max_total_tokens=8192, prefill_chunk=512)
OUT = Path(__file__).parent / "calibration"


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _device(target: str) -> DeviceTarget:
    return DeviceTarget("cpu", cpu_target(GENERIC_X86_CPU)) if target == "generic" else detect("cpu")


def _load(model: str, target: str, root: Path, weights: str = "native") -> LoadedModel:
    return load_model(model, device=_device(target), limits=LIMITS, root=root, weights=weights, progress=lambda m: None)


def answer_stats(answers: list[AnswerFile], backend) -> list[dict]:
    """Per answer: every position's fingerprint difference and sampling lead on ``backend``,
    whether it was drawn under a grammar, and whether the product's tolerances and the finish
    rules would call it fraud (a false verdict: every answer here is honest)."""
    out, tol = [], Tolerances()
    kinds = {structured_grammar(kind): kind for kind in STRUCTURED}
    for a in answers:
        ev = a.evidence
        checks = check_positions(a, backend, NUDGE_EPS)
        finish = finish_failures(ev.output_ids, ev.sampling, a.receipt.finish_reason, backend.eos_token_ids, backend.decode)
        fraud = bool(finish) or bool((checks.margins < -tol.eps).any()) or bool((checks.logit_diffs > tol.tau).any())
        out.append({"temperature": ev.sampling.temperature, "n": len(ev.output_ids), "constrained": ev.sampling.grammar is not None,
                    "kind": kinds.get(ev.sampling.grammar, "other") if ev.sampling.grammar is not None else None,
                    "false_fraud": fraud, "diffs": checks.logit_diffs.tolist(), "margins": checks.margins.tolist()})
    return out


def verify_in_subprocess(model: str, root: Path, target: str, threads: int, answers_path: Path) -> list[dict]:
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "bench.calibrate", "--verify-files", str(answers_path), "--verify-model", model,
           "--target", target, "--root", str(root)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def summarize(stats: list[dict], with_constrained: bool = True) -> dict:
    """One row's statistics; with ``with_constrained`` also those of its constrained answers
    alone (under ``constrained``; None when it has none)."""
    diffs = np.concatenate([np.asarray(s["diffs"]) for s in stats])
    margins = np.concatenate([np.asarray(s["margins"]) for s in stats])
    negative = margins[margins < 0]
    extra = {}
    if with_constrained:
        constrained = [s for s in stats if s.get("constrained")]
        extra["constrained"] = summarize(constrained, with_constrained=False) if constrained else None
        if constrained:
            extra["constrained"]["kinds"] = {k: sum(s["kind"] == k for s in constrained) for k in sorted({s["kind"] for s in constrained})}
    return {
        "answers": len(stats),
        "positions": int(diffs.size),
        "diff_p50": float(np.quantile(diffs, 0.5)),
        "diff_p99": float(np.quantile(diffs, 0.99)),
        "diff_max": float(diffs.max()),
        "sampled_positions": int(sum(s["n"] for s in stats if s["temperature"] > 0)),
        "margin_min": float(margins.min()),
        "flips": int(negative.size),  # honest positions where the verifier's draw disagreed
        "flip_worst": float(negative.min()) if negative.size else 0.0,
        "near_ties_below_1e-4": int(np.sum(np.abs(margins) < 1e-4)),
        "false_fraud": int(sum(bool(s.get("false_fraud")) for s in stats)),
        **extra,
    }


def calibrate_model(label: str, model: str, dtype: str, root: Path, n_answers: int, lengths: tuple[int, ...], seed: int,
                    grammar_share: float = 0.0) -> list[dict]:
    """Every (generation backend, verifier) pair of one model; one summary row each."""
    key = NodeKey.generate()
    host, generic = _load(model, "host", root), _load(model, "generic", root)
    fp32 = _load(model, "host", root, weights="fp32") if host.weight_layout else None
    ckpt = load_checkpoint_cached(host.path, root, progress=lambda m: None)
    reference = NumpyBackend(host, architectures.of_config(ckpt.config).reference.from_checkpoint(ckpt))  # the model's own float64 forward
    requests = request_mix(host.tokenizer, n_answers, seed=seed, lengths=lengths, grammar_share=grammar_share,
                           max_context=host.max_context)
    generators = {"host-b1": (host, 1), "generic-b8": (generic, 8)} | ({"host-fp32-b8": (fp32, 8)} if fp32 else {})
    shares = {name: n_answers // 5 for name in generators}
    shares["host-b8"] = n_answers - sum(shares.values())
    generators["host-b8"] = (host, 8)
    rows, start = [], 0
    for gen_name, count in shares.items():
        backend, concurrency = generators[gen_name]
        t = time.perf_counter()
        answers = Generator.of(backend).answers(requests[start : start + count], key, concurrency=concurrency)
        start += count
        _progress(f"[{label}] {gen_name}: {len(answers)} answers, {sum(len(a.evidence.output_ids) for a in answers)} tokens "
                  f"in {time.perf_counter() - t:.0f} s")
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
            f.write("\n".join(a.model_dump_json() for a in answers))
        verifiers = {
            "host-2t": lambda: answer_stats(answers, host),
            "host-1t": lambda: verify_in_subprocess(model, root, "host", 1, Path(f.name)),
            "generic-1t": lambda: verify_in_subprocess(model, root, "generic", 1, Path(f.name)),
            "numpy-f64": lambda: answer_stats(answers, reference),
        } | ({"host-fp32-2t": lambda: answer_stats(answers, fp32)} if fp32 else {})
        for ver_name, run in verifiers.items():
            t = time.perf_counter()
            row = {"model": label, "weights": dtype, "generated_on": gen_name, "verified_on": ver_name, **summarize(run())}
            rows.append(row)
            c = row["constrained"] or {}
            _progress(f"[{label}] {gen_name} -> {ver_name}: max diff {row['diff_max']:.2e}, min lead {row['margin_min']:.2e}, "
                      f"flips {row['flips']}, false fraud {row['false_fraud']}; constrained: {c.get('answers', 0)} answers, "
                      f"max diff {c.get('diff_max', 0):.2e}, min lead {c.get('margin_min', 0):.2e}, false fraud "
                      f"{c.get('false_fraud', 0)} ({time.perf_counter() - t:.0f} s)")
        os.unlink(f.name)
    return rows


def round_up(x: float) -> float:
    """The smallest of 1, 2, 5 x 10^k that is >= x."""
    exponent = math.floor(math.log10(x))
    for m in (1, 2, 5, 10):
        if m * 10**exponent >= x * (1 - 1e-12):
            return float(m * 10**exponent)
    raise AssertionError("unreachable")


def choose_tolerances(rows: list[dict]) -> dict:
    worst_diff = max(r["diff_max"] for r in rows)
    worst_flip = max(abs(r["flip_worst"]) for r in rows)
    return {
        "safety_factor": SAFETY_FACTOR,
        "honest_diff_max": worst_diff,
        "honest_flip_max": worst_flip,
        "tau": round_up(SAFETY_FACTOR * worst_diff),
        # A flip needs a near-tie smaller than the logit noise, so eps follows the same noise.
        "eps": round_up(SAFETY_FACTOR * max(worst_diff, worst_flip)),
    }


def _kinds(summary: dict) -> str:
    return " / ".join(str(summary.get("kinds", {}).get(k, 0)) for k in STRUCTURED)


def markdown(rows: list[dict], chosen: dict) -> str:
    head = ("| model | weights | generated on | verified on | answers | positions | diff p50 | diff p99 | diff max "
            "| min lead | flips (worst) | false fraud |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    body = "".join(
        f"| {r['model']} | {r['weights']} | {r['generated_on']} | {r['verified_on']} | {r['answers']} | {r['positions']} "
        f"| {r['diff_p50']:.1e} | {r['diff_p99']:.1e} | {r['diff_max']:.1e} | {r['margin_min']:.1e} "
        f"| {r['flips']} ({r['flip_worst']:.1e}) | {r.get('false_fraud', '-')} |\n" for r in rows)
    total = sum(r["answers"] for r in rows)
    text = (
        "# Verifier calibration\n\nMade by `python -m bench.calibrate`; every honest answer re-checked on a backend that "
        "differs from the one that generated it.\n`diff` = |committed top-8 logit - verifier's logit| per position; "
        "`lead` = the claimed token's lead in the seeded draw, logit units (< 0 = a flip); `false fraud` = honest answers "
        "the product's tolerances and finish rules would call fraud.\n\n"
        + head + body
        + f"\n{total} answer checks. Largest honest fingerprint difference {chosen['honest_diff_max']:.2e}, "
        f"worst honest flip {chosen['honest_flip_max']:.2e}; with a safety factor of {chosen['safety_factor']:g}: "
        f"**tau = {chosen['tau']:g}, eps = {chosen['eps']:g}**.\n"
    )
    constrained = [(r, r["constrained"]) for r in rows if r.get("constrained")]
    if constrained:
        text += ("\nConstrained answers alone (drawn under a grammar's mask: JSON mode, a JSON schema, a forced tool call); "
                 "`min lead` is over the tokens the grammar allows (+1e9 where it allows one token only):\n\n"
                 "| model | generated on | verified on | answers (JSON mode / schema / tool call) | positions | diff p99 | diff max "
                 "| min lead | flips | false fraud |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
        text += "".join(f"| {r['model']} | {r['generated_on']} | {r['verified_on']} | {c['answers']} ({_kinds(c)}) | {c['positions']} "
                        f"| {c['diff_p99']:.1e} | {c['diff_max']:.1e} | {c['margin_min']:.1e} | {c['flips']} | {c['false_fraud']} |\n"
                        for r, c in constrained)
        cs = [c for _, c in constrained]
        text += (f"\n{sum(c['answers'] for c in cs)} constrained answer checks ({sum(c['positions'] for c in cs)} positions): "
                 f"largest fingerprint difference {max(c['diff_max'] for c in cs):.2e}, smallest sampling lead "
                 f"{min(c['margin_min'] for c in cs):.2e}, {sum(c['flips'] for c in cs)} flips, "
                 f"**{sum(c['false_fraud'] for c in cs)} false fraud verdicts**.\n")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--default-answers", type=int, default=80)
    ap.add_argument("--tiny-answers", type=int, default=1200)
    ap.add_argument("--grammar-share", type=float, default=0.25, help="share of requests for structured output")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--tiny-models", help="comma-separated tiny models to run (default: all; '' for none)")
    ap.add_argument("--model", action="append", metavar="LABEL=MODEL",
                    help="a real model (registry name or path) to calibrate with --default-answers answers; "
                         "repeatable (default: the default model)")
    ap.add_argument("--verify-files", type=Path, help=argparse.SUPPRESS)  # subprocess mode
    ap.add_argument("--verify-model", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.verify_files:
        answers = [AnswerFile.model_validate_json(line) for line in args.verify_files.read_text().splitlines()]
        print(json.dumps(answer_stats(answers, _load(args.verify_model, args.target, args.root))))
        return

    from tests.models_fixtures import make_tiny_gguf, make_tiny_hf_checkpoint

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_root = Path(tmp)
        tiny = {
            "tiny-fp32": lambda: (make_tiny_hf_checkpoint(tmp_root / "fp32", seed=0), "safetensors:f32"),
            "tiny-bf16": lambda: (make_tiny_hf_checkpoint(tmp_root / "bf16", seed=1, dtype="bfloat16"), "safetensors:bf16"),
            "tiny-q8_0": lambda: (make_tiny_gguf(tmp_root / "q8.gguf", quant_types=("Q8_0",), seed=2).path, "gguf:Q8_0"),
            "tiny-q4_k_m": lambda: (make_tiny_gguf(tmp_root / "q4km.gguf", quant_types=("Q4_K", "Q6_K", "Q5_0", "Q8_0"), seed=3,
                                                   hidden=256, intermediate=512).path, "gguf:F32+Q4_K+Q5_0+Q6_K+Q8_0"),
        }
        chosen_tiny = [t for t in (args.tiny_models.split(",") if args.tiny_models else tiny) if t]
        for i, label in enumerate(chosen_tiny):
            path, dtype = tiny[label]()
            rows += calibrate_model(label, str(path), dtype, tmp_root / "store", args.tiny_answers // len(chosen_tiny),
                                    (16, 64, 128), seed=i, grammar_share=args.grammar_share)
        for i, spec in enumerate(args.model or [f"smollm2-135m={DEFAULT_MODEL}"] if args.default_answers else []):
            label, model = spec.split("=", 1)
            path = model_store.resolve(model)
            dtype = load_checkpoint_cached(path, model_store.store_root(), progress=lambda m: None, keep_quantized=True).weight_format
            rows += calibrate_model(label, model, dtype, model_store.store_root(), args.default_answers, (16, 64, 256, 512),
                                    seed=99 + i, grammar_share=args.grammar_share)
    chosen = choose_tolerances(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.json").write_text(json.dumps({"rows": rows, "tolerances": chosen}, indent=1))
    table = markdown(rows, chosen)
    (args.out / "calibration.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

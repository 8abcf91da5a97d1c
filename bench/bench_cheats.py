"""Cheat detection on the default model: for every cheat in ``tests/node/verification/cheats.py``,
the share of its answers the verifier flags, using only the first L tokens of each answer (verification is
per position, so a prefix of an answer is checked by the same verdict's failures below L).

Also shows the share of positions each cheat fails, and how far it sits from the tolerances:
the median over answers of its largest fingerprint difference and of its most negative
sampling lead, against tau and eps. Two honest rows are the controls: plain answers, and
structured answers drawn under a grammar (JSON mode, a schema, a forced tool call: the
requests of the grammar cheat); both must show zero detections.

Binding cheats (an operator between the client and its honest node: the prompt swapped, the
text swapped, the parameters swapped) are checked by ``verify.binding`` from the request and the
response alone, before any model work; the same run times the binding check against the
generation time of the answers it checks (what the verifier sidecar adds to every answer).

    python -m bench.bench_cheats [--answers 24] [--tokens 64] [--only NAME ...] [--model gemma-3-270m]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np

from tests.node.verification.cheats import (CHEATS, EXPECTED, SAMPLING_CHEATS, CheatContext, cheap_generator,
                                            honest_answers, honest_constrained_answers, skip_layers)
from tests.node.verification.harness import request_mix
from compiled_models.registry import DEFAULT_MODEL
from node.runtime import model_store
from node.runtime.engine import GenerationRequest
from node.runtime.loading import load_model
from verify.binding import asked_of, bind_answers
from verify.finish import visible_text
from verify.identity import NodeKey
from verify.verifier import Tolerances, verify_answer
from bench.report import RESULTS, write_json

CONTROLS = {"honest": honest_answers, "honest-constrained": honest_constrained_answers}
PREFIXES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def detection_by_prefix(verdicts, max_tokens: int) -> dict[int, float]:
    """Share flagged when only the first L tokens are checked (commitment failures: any L)."""
    out = {}
    for prefix in [p for p in PREFIXES if p <= max_tokens]:
        flagged = [bool(v.reasons and not v.failures) or any(f.position < prefix for f in v.failures) for v in verdicts]
        out[prefix] = float(np.mean(flagged))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--answers", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--only", nargs="*", help="run just these cheats")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="the model answers claim (default: the default model; "
                    "another one also gets the default model's text claimed under its id)")
    args = ap.parse_args()
    root = model_store.store_root()
    model = load_model(args.model, device="cpu", progress=lambda m: None)
    keep = list(range(0, model.config.num_hidden_layers, 2))  # a cheaper model: every other layer
    cheap = cheap_generator(model, skip_layers(*[i for i in range(model.config.num_hidden_layers) if i not in keep]), root)
    other = load_model(DEFAULT_MODEL, device="cpu", progress=lambda m: None) if args.model != DEFAULT_MODEL else None
    ctx = CheatContext(model=model, key=NodeKey.generate(), root=root, cheap=cheap, rng=random.Random(0), other=other)
    tol = Tolerances()

    names = list(CONTROLS) + [n for n in CHEATS if not args.only or n in args.only]
    results = {}
    for name in names:
        temperatures = (0.7, 1.0, 1.5) if name in SAMPLING_CHEATS else (0.0, 0.7, 1.0)
        requests = request_mix(model.tokenizer, args.answers, seed=7, temperatures=temperatures, lengths=(args.tokens,), extras=False)
        t = time.perf_counter()
        run = CHEATS.get(name) or CONTROLS[name]
        answers = run(ctx, requests)
        if not answers:  # a cheat this model cannot be put to (another model's text on the default model)
            continue
        verdicts = [verify_answer(a, model, tol) for a in answers]
        lengths = [len(a.evidence.output_ids) for a in answers]
        diffs = [v.max_logit_diff for v in verdicts if v.max_logit_diff is not None]
        leads = [v.min_margin for v in verdicts if v.min_margin is not None]
        results[name] = {
            "answers": len(answers),
            "mean_tokens": float(np.mean(lengths)),
            "flagged": float(np.mean([v.verdict != "pass" for v in verdicts])),
            "as_expected": float(np.mean([v.verdict == ("pass" if name in CONTROLS else EXPECTED.get(name, "fraud")) for v in verdicts])),
            "constrained": sum(a.evidence.sampling.grammar is not None for a in answers),
            "verdicts": {k: sum(v.verdict == k for v in verdicts) for k in ("pass", "fraud", "malformed", "unattributable")},
            # Share of all positions that fail a check: per-answer detection at length L is
            # about 1 - (1 - rate)^L when positions fail independently.
            "positions_flagged": float(sum(len({f.position for f in v.failures}) for v in verdicts) / max(sum(lengths), 1)),
            "by_prefix": detection_by_prefix(verdicts, args.tokens),
            "max_diff_median": float(np.median(diffs)) if diffs else None,
            "min_lead_median": float(np.median(leads)) if leads else None,
            "seconds": time.perf_counter() - t,
        }
        print(f"{name}: flagged {results[name]['flagged']:.0%} ({time.perf_counter() - t:.0f} s)", flush=True)

    prefixes = [p for p in PREFIXES if p <= args.tokens]
    print(f"\ntau = {tol.tau:g}, eps = {tol.eps:g}; {args.answers} answers of up to {args.tokens} tokens per row")
    print(f"{'cheat':<32}{'tokens':>7}" + "".join(f"{'L=' + str(p):>7}" for p in prefixes) + f"{'pos. rate':>10}{'max diff':>11}{'min lead':>11}")
    for name, r in results.items():
        fmt = lambda x: f"{x:>11.1e}" if x is not None else f"{'-':>11}"  # noqa: E731
        print(f"{name:<32}{r['mean_tokens']:>7.1f}" + "".join(f"{r['by_prefix'][p]:>7.0%}" for p in prefixes)
              + f"{r['positions_flagged']:>10.1%}" + fmt(r["max_diff_median"]) + fmt(r["min_lead_median"]))
    # binding is of chat answers: a base model (no chat template) has none
    binding = binding_rows(ctx, args.answers, args.tokens) if model.tokenizer.chat_template is not None else None
    name = "cheats.json" if args.model == DEFAULT_MODEL else f"cheats-{Path(args.model).name}.json"
    write_json(RESULTS / name, {"model": args.model, "model_id": model.model_id, "tau": tol.tau, "eps": tol.eps,
                                "results": results, "binding": binding})


QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
             "List three prime numbers.", "Who wrote Hamlet?", "Give me a tip for learning Python."]


def binding_rows(ctx: CheatContext, count: int, tokens: int) -> dict:
    """Binding cheats caught from request + response alone, and the binding check's cost per
    answer against the generation time of those answers (same run)."""
    model, tok = ctx.model, ctx.model.tokenizer
    bodies = [{"model": "m", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], "max_tokens": tokens,
               "temperature": (0.0, 0.7, 1.0)[i % 3], "seed": 1000 + i} for i in range(count)]
    asked = [asked_of("chat", b, tok, model.max_context) for b in bodies]
    requests = [GenerationRequest(a.prompts[0], a.choices[0], a.seed_source) for a in asked]
    t = time.perf_counter()
    answers = honest_answers(ctx, requests)  # concurrency 8, as a loaded node runs
    generation_s = (time.perf_counter() - t) / len(answers)

    def response(answer, text=None) -> dict:
        r = answer.receipt
        proof = {"receipt": r.model_dump(mode="json"), "signature": answer.signature, "public_key": answer.public_key}
        shown = visible_text(answer.evidence.output_ids, answer.evidence.sampling, tok.eos_token_ids, tok.decode)
        return {"choices": [{"index": 0, "message": {"content": shown if text is None else text},
                             "finish_reason": r.finish_reason, "proofmesh": proof}]}

    cases = {
        "honest (control)": lambda b, a: (b, response(a)),
        "prompt swapped": lambda b, a: ({**b, "messages": [{"role": "user", "content": "Hi"}]}, response(a)),
        "text swapped": lambda b, a: (b, response(a, text="Something else.")),
        "temperature swapped": lambda b, a: ({**b, "temperature": 0.9 if b["temperature"] != 0.9 else 0.1}, response(a)),
        "max_tokens swapped": lambda b, a: ({**b, "max_tokens": tokens * 2}, response(a)),
    }
    rows = {}
    for name, make in cases.items():
        caught, seconds = [], []
        for body, answer in zip(bodies, answers):
            sent, got = make(body, answer)
            t = time.perf_counter()  # the request's conversion (templating, tokenizing) is binding's work too
            report = bind_answers(asked_of("chat", sent, tok, model.max_context), got, {answer.receipt.receipt_id: answer}, tok)
            seconds.append(time.perf_counter() - t)
            caught.append(not report.ok)
        rows[name] = {"caught": float(np.mean(caught)), "ms_per_answer": 1000 * float(np.mean(seconds))}
    mean_tokens = float(np.mean([len(a.evidence.output_ids) for a in answers]))
    cost = rows["honest (control)"]["ms_per_answer"] / 1000 / generation_s
    print(f"\nbinding ({len(answers)} chat answers, {mean_tokens:.0f} tokens on average, generated at concurrency 8 "
          f"in {generation_s * 1000:.0f} ms each)")
    print(f"{'case':<24}{'caught':>8}{'ms/answer':>11}")
    for name, r in rows.items():
        print(f"{name:<24}{r['caught']:>8.0%}{r['ms_per_answer']:>11.2f}")
    print(f"binding cost: {cost:.2%} of generation time per answer (tokens until caught: 0, no model work)")
    return {"rows": rows, "generation_ms_per_answer": generation_s * 1000, "mean_tokens": mean_tokens, "cost_share": cost}


if __name__ == "__main__":
    main()

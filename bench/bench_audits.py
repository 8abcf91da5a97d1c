"""Audit overhead on the default model: the compute that sampled audits add to serving.

Same run, same process: answers generated at batch 1 on the fp32 path and on native quantized
weights, one after another in one engine (as a node serves them), each timed; every answer then re-checked by the verifier (teacher-forced prefill on the
fp32 path, as a sidecar would), timed. For audit rates P = 1 %, 5 %, 20 % the overhead is the
audits' share of all compute, ``P sum(verify) / (sum(generate) + P sum(verify))`` (the expected
value over which answers get audited), beside what ``proofmesh posp`` predicts from its
verification-cost ratio (``P rho / (1 + P rho)``, ``rho = VERIFY_COST_RATIO``), and beside one
realized HMAC draw (``node.sidecar.audit_draw``) over these answers. Prints a table, writes
``bench/results/audits_overhead.json``; nothing is asserted.

    python -m bench.bench_audits [--answers 24] [--tokens 64]
"""

from __future__ import annotations

import argparse
import secrets
import time

from tests.node.verification.harness import Generator, request_mix
from compiled_models.registry import DEFAULT_MODEL
from node.runtime.loading import load_model
from node.sidecar.auditor import audit_draw
from node.compiler.targets import configure_threads
from node.runtime.allocator import keep_freed_memory
from verify.audit_policy import GameParams, audit_overhead
from verify.identity import NodeKey
from verify.verifier import verify_answer
from bench.report import RESULTS, write_json

RATES = (0.01, 0.05, 0.2)
GAME = GameParams(reward=1.0, cost=1.0, penalty=0.0)  # only rho and k = 1 matter for the overhead


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--answers", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    configure_threads(None)  # as the CLI does for every command that runs TVM: a pool on every core
    keep_freed_memory()
    key = NodeKey.generate()
    verifier = load_model(DEFAULT_MODEL, device="cpu", weights="fp32")
    requests = request_mix(verifier.tokenizer, args.answers, seed=5, lengths=(args.tokens,), extras=False)
    secret = secrets.token_bytes(32)
    results: dict = {"answers": args.answers, "tokens": args.tokens, "verifier": verifier.backend, "paths": {}}
    for weights in ("fp32", "native"):
        model = verifier if weights == "fp32" else load_model(DEFAULT_MODEL, device="cpu", weights="native")
        timed = Generator.of(model).timed_answers(requests, key)
        answers, gen_s = [a for a, _ in timed], [s for _, s in timed]
        verify_s = []
        for answer in answers:
            t = time.perf_counter()
            verdict = verify_answer(answer, verifier)
            verify_s.append(time.perf_counter() - t)
            assert verdict.verdict == "pass", verdict  # an honest answer; anything else voids the figures
        rho = sum(verify_s) / sum(gen_s)
        rows = []
        for p in RATES:
            drawn = [v for a, v in zip(answers, verify_s) if audit_draw(secret, a.receipt.receipt_id) < p]
            rows.append({
                "audit_rate": p,
                "overhead_expected": p * sum(verify_s) / (sum(gen_s) + p * sum(verify_s)),
                "overhead_posp_predicts": audit_overhead(GAME, p),
                "audited_in_draw": len(drawn),
                "overhead_in_draw": sum(drawn) / (sum(gen_s) + sum(drawn)),
            })
        results["paths"][weights] = {"generate_s": sum(gen_s), "verify_s": sum(verify_s), "rho": rho, "rates": rows,
                                     "tokens_generated": sum(len(a.evidence.output_ids) for a in answers)}
        print(f"\n{weights} generation ({model.backend}), {args.answers} answers of {args.tokens} tokens at batch 1: "
              f"generate {sum(gen_s):.1f} s, verify {sum(verify_s):.1f} s, rho = {rho:.3f}")
        print(f"{'P':>6}{'overhead':>11}{'posp says':>11}{'drawn':>7}{'in draw':>10}")
        for r in rows:
            print(f"{r['audit_rate']:>6.0%}{r['overhead_expected']:>11.3%}{r['overhead_posp_predicts']:>11.3%}"
                  f"{r['audited_in_draw']:>7}{r['overhead_in_draw']:>10.3%}")
    write_json(RESULTS / "audits_overhead.json", results)


if __name__ == "__main__":
    main()

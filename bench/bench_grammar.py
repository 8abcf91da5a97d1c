"""What structured output costs per token on the default model, against a decode step.

For three grammars (``tests.node.verification.harness.STRUCTURED``: JSON mode, a JSON schema with
typed fields, a forced tool call built by ``verify.structured.request_grammar``), a batch-1 generation loop
that does what the engine does per token, each part timed in the same loop, so every figure
is a ratio within one run:

* ``mask``: the grammar's work, ``GrammarState.allowed()`` (llguidance's bitmask, unpacked over
  the 49k vocabulary) + ``advance(token)``;
* ``apply``: what the mask adds to the seeded draw, ``sample_token`` with the mask minus
  ``sample_token`` without it on the same logits (negative when the mask leaves fewer tokens
  for the Gumbel noise to be computed on);
* ``decode``: one batch-1 decode step of the runtime (``ModelRuntime.decode``).

Then the engine end to end (``node.runtime.engine.Engine``, batch 1): tokens/s for each
grammar's prompt with and without the grammar, greedy and T = 0.8, the unconstrained run
capped at the constrained answer's length (it may still end sooner: compare the decode
rates, the whole-answer rates carry the same prefill over fewer tokens then). And the
verifier's side: the masks rebuilt while re-checking those answers, against the whole
``verify_answer``. Prints tables and writes ``bench/results/grammar.json``. Ratios only;
nothing is asserted.

    python -m bench.bench_grammar [--answers 4] [--max-tokens 96] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import numpy as np
from bench.report import RESULTS, machine, write_json

TEMPERATURES = (0.0, 0.8)


def _stats(values: list[float]) -> dict:
    a = np.asarray(values) * 1000
    return {"mean_ms": float(a.mean()), "p50_ms": float(np.median(a)), "p99_ms": float(np.quantile(a, 0.99)),
            "max_ms": float(a.max())}


def step_costs(model, prompt_ids, params, request_hash: bytes) -> dict:
    """One batch-1 answer token by token, as the engine makes it, each part timed."""
    from verify.sampling import sample_token

    rt, eos = model.runtime, set(model.eos_token_ids)
    t = time.perf_counter()
    state = model.grammar_vocabulary().state(params.grammar)
    compile_s = time.perf_counter() - t
    seq = -(10**6) - 7  # a sequence id nobody else uses
    rt.add_sequence(seq)
    parts: dict[str, list[float]] = {k: [] for k in ("allowed", "advance", "sample_masked", "sample_plain", "decode")}
    tokens: list[int] = []
    try:
        logits = rt.prefill(seq, list(prompt_ids))[-1]
        for step in range(params.max_tokens):
            t0 = time.perf_counter()
            allowed = state.allowed()
            t1 = time.perf_counter()
            draws = [lambda: sample_token(logits, params, request_hash, step, tokens, allowed),
                     lambda: sample_token(logits, params, request_hash, step, tokens)]
            timed = {}
            for i in ((0, 1) if step % 2 else (1, 0)):  # alternate the order: neither draw gets the warmer cache
                ts = time.perf_counter()
                result = draws[i]()
                timed[i] = (time.perf_counter() - ts, result)
            token = timed[0][1]
            t2 = time.perf_counter()
            state.advance(token)
            t3 = time.perf_counter()
            parts["allowed"].append(t1 - t0)
            parts["advance"].append(t3 - t2)
            parts["sample_masked"].append(timed[0][0])
            parts["sample_plain"].append(timed[1][0])
            tokens.append(token)
            if token in eos or step + 1 == params.max_tokens:
                break
            t4 = time.perf_counter()
            logits = rt.decode([seq], [token])[0]
            parts["decode"].append(time.perf_counter() - t4)
    finally:
        rt.remove_sequence(seq)
    return {"compile_s": compile_s, "tokens": tokens, **parts}


def per_token_rows(model, kinds: list[str], answers: int, max_tokens: int) -> list[dict]:
    from tests.node.verification.harness import STRUCTURED, structured_prompt
    from verify.canonical import request_hash
    from verify.sampling import SamplingParams

    rows = []
    for kind in kinds:
        for temperature in TEMPERATURES:
            runs = []
            for i in range(answers):
                questions = STRUCTURED[kind][1]
                prompt, grammar = structured_prompt(model.tokenizer, kind, questions[i % len(questions)])
                params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=1000 + i, grammar=grammar)
                rh = bytes.fromhex(request_hash(model.model_id, list(prompt), params.to_canonical_dict()))
                runs.append(step_costs(model, prompt, params, rh))
            joined = {k: [x for r in runs for x in r[k]] for k in ("allowed", "advance", "sample_masked", "sample_plain", "decode")}
            mask = [a + b for a, b in zip(joined["allowed"], joined["advance"])]
            apply = [m - p for m, p in zip(joined["sample_masked"], joined["sample_plain"])]
            decode_mean = float(np.mean(joined["decode"]))
            rows.append({
                "grammar": kind, "temperature": temperature, "answers": answers,
                "tokens": sum(len(r["tokens"]) for r in runs),
                "texts": [model.decode(r["tokens"]) for r in runs],
                "grammar_state_ms": 1000 * float(np.mean([r["compile_s"] for r in runs])),
                "allowed": _stats(joined["allowed"]), "advance": _stats(joined["advance"]), "mask": _stats(mask),
                "sample_masked": _stats(joined["sample_masked"]), "sample_plain": _stats(joined["sample_plain"]),
                "apply_mean_ms": 1000 * float(np.mean(apply)),
                "decode": _stats(joined["decode"]),
                "mask_over_decode": float(np.mean(mask)) / decode_mean,
                "mask_p99_over_decode_mean": float(np.quantile(mask, 0.99)) / decode_mean,
                "mask_and_apply_over_decode": (float(np.mean(mask)) + float(np.mean(apply))) / decode_mean,
            })
            r = rows[-1]
            print(f"  {kind} T={temperature}: {r['tokens']} tokens, mask {r['mask']['mean_ms']:.3f} ms = "
                  f"{r['mask_over_decode']:.1%} of a decode step ({r['decode']['mean_ms']:.2f} ms)", flush=True)
    return rows


def engine_rows(model, kinds: list[str], answers: int, max_tokens: int, key) -> tuple[list[dict], list]:
    """Engine tokens/s per grammar and temperature, with and without the grammar (same prompt,
    the unconstrained answer capped at the constrained one's length); also the constrained
    answer files, for the verifier's side."""
    from tests.node.verification.harness import STRUCTURED, structured_prompt
    from node.api.service import answer_file
    from node.runtime.engine import Engine, GenerationRequest
    from verify.sampling import SamplingParams

    async def run():
        rows, files = [], []
        async with Engine(model.runtime, model.tokenizer, model.model_id, max_context=model.max_context) as engine:
            for kind in kinds:
                for temperature in TEMPERATURES:
                    sums = {"with": [0, 0.0, 0, 0.0], "without": [0, 0.0, 0, 0.0]}  # tokens, seconds, decode tokens, decode seconds
                    for i in range(answers):
                        questions = STRUCTURED[kind][1]
                        prompt, grammar = structured_prompt(model.tokenizer, kind, questions[i % len(questions)])
                        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=2000 + i, grammar=grammar)
                        constrained = await engine.complete(GenerationRequest(prompt, params))
                        files.append(answer_file(constrained, key, model_id=model.model_id, backend=model.backend))
                        n = len(constrained.output_ids)
                        free = await engine.complete(GenerationRequest(prompt, params.model_copy(update={"grammar": None, "max_tokens": n})))
                        for name, res in (("with", constrained), ("without", free)):
                            s = sums[name]
                            s[0] += len(res.output_ids)
                            s[1] += res.duration
                            s[2] += len(res.output_ids) - 1
                            s[3] += res.duration - res.time_to_first_token
                    row = {"grammar": kind, "temperature": temperature, "answers": answers}
                    for name, (n_tok, secs, n_dec, dec_secs) in sums.items():
                        row[f"tokens_{name}"] = n_tok
                        row[f"tok_s_{name}"] = n_tok / secs
                        row[f"decode_tok_s_{name}"] = n_dec / dec_secs if dec_secs > 0 else None
                    row["with_over_without"] = row["tok_s_with"] / row["tok_s_without"]
                    row["decode_with_over_without"] = (row["decode_tok_s_with"] / row["decode_tok_s_without"]
                                                       if row["decode_tok_s_with"] and row["decode_tok_s_without"] else None)
                    rows.append(row)
                    print(f"  engine {kind} T={temperature}: {row['tok_s_with']:.1f} tok/s with the grammar, "
                          f"{row['tok_s_without']:.1f} without ({row['with_over_without']:.2f}x)", flush=True)
        return rows, files

    return asyncio.run(run())


def verifier_row(model, files) -> dict:
    """The masks a verifier rebuilds (one GrammarState per answer, allowed + advance per
    position) against its whole re-check of the same answers."""
    from verify.verifier import verify_answer

    verify_s, mask_s, positions, verdicts = 0.0, 0.0, 0, []
    vocab = model.grammar_vocabulary()
    for answer in files:
        ev = answer.evidence
        t = time.perf_counter()
        verdicts.append(verify_answer(answer, model).verdict)
        verify_s += time.perf_counter() - t
        t = time.perf_counter()
        state = vocab.state(ev.sampling.grammar)
        for token in ev.output_ids:
            state.allowed()
            state.advance(token)
        mask_s += time.perf_counter() - t
        positions += len(ev.output_ids)
    return {"answers": len(files), "positions": positions, "verdicts": {v: verdicts.count(v) for v in sorted(set(verdicts))},
            "verify_ms_per_token": 1000 * verify_s / positions, "mask_ms_per_token": 1000 * mask_s / positions,
            "mask_share_of_verify": mask_s / verify_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--answers", type=int, default=4, help="answers per grammar and temperature")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1)))
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM sizes its pool

    from tests.node.verification.harness import STRUCTURED
    from compiled_models.registry import DEFAULT_MODEL
    from node.runtime.loading import load_model
    from verify.grammar import ENGINE
    from verify.identity import NodeKey

    model = load_model(DEFAULT_MODEL, device="cpu", progress=lambda m: None)
    t = time.perf_counter()
    model.grammar_vocabulary()  # built once per tokenizer
    vocabulary_s = time.perf_counter() - t
    kinds = list(STRUCTURED)
    host = machine()
    print(f"{host['cpu']} (mcpu {host['mcpu']}, AVX-512 {'yes' if host['avx512'] else 'no'}), {args.threads} threads; "
          f"{model.backend}; {ENGINE}; vocabulary {model.vocab_size} (grammar view built in {vocabulary_s * 1000:.0f} ms)", flush=True)
    per_token_rows(model, kinds[:1], 1, 16)  # warm-up: caches, the engine's first masks
    print("per token:", flush=True)
    rows = per_token_rows(model, kinds, args.answers, args.max_tokens)
    print("engine:", flush=True)
    engine, files = engine_rows(model, kinds, args.answers, args.max_tokens, NodeKey.generate())
    verifier = verifier_row(model, files)

    print(f"\nper token, batch 1 (means in ms; {args.answers} answers per row, up to {args.max_tokens} tokens)")
    print(f"{'grammar':<13}{'T':>5}{'tokens':>8}{'allowed':>9}{'advance':>9}{'mask':>8}{'mask p99':>10}{'apply':>8}"
          f"{'draw':>8}{'decode':>8}{'mask/decode':>13}{'+apply':>8}")
    for r in rows:
        print(f"{r['grammar']:<13}{r['temperature']:>5g}{r['tokens']:>8}{r['allowed']['mean_ms']:>9.3f}{r['advance']['mean_ms']:>9.3f}"
              f"{r['mask']['mean_ms']:>8.3f}{r['mask']['p99_ms']:>10.3f}{r['apply_mean_ms']:>8.3f}{r['sample_plain']['mean_ms']:>8.3f}"
              f"{r['decode']['mean_ms']:>8.2f}{r['mask_over_decode']:>13.1%}{r['mask_and_apply_over_decode']:>8.1%}")
    print("(mask = allowed + advance; apply = masked draw - unmasked draw on the same logits; draw = the unmasked draw; "
          "decode = one batch-1 decode step)")
    print("\nengine, batch 1, with and without the grammar (tokens/s; decode = after the first token, whole = prefill included)")
    print(f"{'grammar':<13}{'T':>5}{'decode w':>10}{'decode w/o':>11}{'ratio':>8}{'whole w':>9}{'whole w/o':>10}{'ratio':>8}"
          f"{'tokens w':>10}{'tokens w/o':>11}")
    for r in engine:
        print(f"{r['grammar']:<13}{r['temperature']:>5g}{r['decode_tok_s_with'] or 0:>10.1f}{r['decode_tok_s_without'] or 0:>11.1f}"
              f"{r['decode_with_over_without'] or 0:>8.2f}{r['tok_s_with']:>9.1f}{r['tok_s_without']:>10.1f}{r['with_over_without']:>8.2f}"
              f"{r['tokens_with']:>10}{r['tokens_without']:>11}")
    print("(without the grammar an answer may end sooner than the constrained one it is capped at: fewer tokens behind the same "
          "prefill, so compare the decode rates)")
    print(f"\nverifier: {verifier['answers']} constrained answers ({verifier['positions']} positions), verdicts {verifier['verdicts']}; "
          f"masks {verifier['mask_ms_per_token']:.3f} ms per position = {verifier['mask_share_of_verify']:.1%} of verify_answer "
          f"({verifier['verify_ms_per_token']:.2f} ms per position)")
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "grammar.json", {"machine": host, "backend": model.backend, "engine": ENGINE, "vocab_size": model.vocab_size,
                                          "grammar_vocabulary_ms": vocabulary_s * 1000, "answers": args.answers,
                                          "max_tokens": args.max_tokens, "per_token": rows, "engine_rows": engine, "verifier": verifier})


if __name__ == "__main__":
    main()

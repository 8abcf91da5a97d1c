"""Verification cost on the default model: how long re-checking an answer takes against
generating it, same machine, same run.

For answers of 64, 256 and 512 tokens: generation time on each path the node has (the engine
alone at batch 1; in a batch of 8, the batch's wall time per answer-length of tokens), the verifier's time (commitment
checks + one teacher-forced prefill + the per-position checks, each part timed), the
verifier's prefill rate against PyTorch eager on the same tokens and against the matmul peak
measured here (a 2048 x 2048 fp32 matmul), the cost of fingerprints + receipt against
generation, and receipt / evidence sizes. Prints a table and writes
``bench/results/verify.json``. Ratios only; nothing is asserted.

Physics: decode reads every weight per token (bandwidth-bound), the verifier's prefill is
compute-bound, so on a CPU the ratio cannot fall far below (bandwidth / FLOP rate) x (bytes per
weight); on a GPU it falls to about 1 %.

    python -m bench.bench_verify [--lengths 64 256 512] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import numpy as np

from tests.node.verification.harness import COMPLETIONS, Generator
from compiled_models.registry import DEFAULT_MODEL
from node.runtime.engine import GenerationRequest
from node.runtime.loading import LoadedModel, load_checkpoint_cached, load_model
from node.runtime import model_store
from node.runtime.allocator import keep_freed_memory
from verify.evidence import AnswerFile, position_fingerprint
from verify.evidence_store import encode_answer
from verify.identity import NodeKey
from verify.receipts import make_receipt
from verify.sampling import SamplingParams
from verify.verifier import check_positions, verify_answer
from bench.report import RESULTS, write_json



def matmul_peak_gflops(threads: int) -> tuple[float, str]:
    """Best of a few 2048^3 fp32 matmuls, in GFLOP/s (PyTorch if installed, else numpy)."""
    n = 2048
    try:
        import torch

        torch.set_num_threads(threads)
        a, b = torch.randn(n, n), torch.randn(n, n)
        run, how = (lambda: a @ b), "torch"
    except ImportError:
        a, b = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
        run, how = (lambda: a @ b), "numpy"
    run()
    best = min(_timed(run) for _ in range(5))
    return 2 * n**3 / best / 1e9, how


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def prefill_flops(model: LoadedModel, n_tokens: int, lm_head_rows: int) -> float:
    """Matmul FLOPs of a causal pass: 2 x weights per token, attention scores and values, and
    the vocabulary projection on the rows that need it."""
    c = model.config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    dense = 2 * per_layer * c.num_hidden_layers * n_tokens
    attention = 2 * 2 * c.num_hidden_layers * q * n_tokens * (n_tokens + 1) / 2
    return dense + attention + 2 * c.hidden_size * c.vocab_size * lm_head_rows


def _requests(generator: Generator, length: int, seeds: range) -> list[GenerationRequest]:
    prompt = tuple(generator.tokenizer.encode_prompt(COMPLETIONS[1]))
    return [GenerationRequest(prompt, SamplingParams(temperature=0.7, max_tokens=length, seed=s)) for s in seeds]


def answer_of_length(generator: Generator, key: NodeKey, length: int) -> tuple[AnswerFile, float]:
    """One answer of exactly ``length`` tokens at batch 1 and its wall time (seeds retried
    past an early end of text)."""
    for seed in range(16):
        t = time.perf_counter()
        (answer,) = generator.answers(_requests(generator, length, range(seed, seed + 1)), key)
        wall = time.perf_counter() - t
        if len(answer.evidence.output_ids) == length:
            return answer, wall
    raise RuntimeError(f"no seed gave a {length}-token answer")


def batched_seconds_per_answer(generator: Generator, key: NodeKey, length: int, batch: int = 8) -> float:
    """Wall time of ``batch`` concurrent answers, per ``length`` tokens of output."""
    t = time.perf_counter()
    answers = generator.answers(_requests(generator, length, range(100, 100 + batch)), key, concurrency=batch)
    wall = time.perf_counter() - t
    return wall * length / sum(len(a.evidence.output_ids) for a in answers)


def torch_prefill_timer(model: LoadedModel, threads: int) -> Callable[[list[int]], float] | None:
    """Seconds PyTorch eager takes to prefill some ids (model built once), or None without torch."""
    try:
        import torch

        from bench.bench_inference import build_torch_llama
    except ImportError:
        return None
    torch.set_num_threads(threads)
    net = build_torch_llama(load_checkpoint_cached(model.path, model_store.store_root(), progress=lambda m: None))

    def seconds(ids: list[int]) -> float:
        x = torch.tensor([ids])
        with torch.inference_mode():
            net(x)
            return min(_timed(lambda: net(x)) for _ in range(2))

    return seconds


def bench_length(model: LoadedModel, key: NodeKey, length: int, peak: float, torch_prefill: Callable[[list[int]], float] | None) -> dict:
    generator = Generator.of(model)
    answer, wall_b1 = answer_of_length(generator, key, length)
    b8_per_answer = batched_seconds_per_answer(generator, key, length)
    ev = answer.evidence
    ids = ev.prompt_ids + ev.output_ids[:-1]
    first = len(ev.prompt_ids) - 1

    verify_s = min(_timed(lambda: verify_answer(answer, model)) for _ in range(2))
    verdict = verify_answer(answer, model)
    prefill_s = min(_timed(lambda: model.score(ids, first)) for _ in range(2))
    checks_s = _timed(lambda: check_positions(answer, model, 1e-3)) - prefill_s
    torch_s = torch_prefill(ids) if torch_prefill else None

    logits = model.score(ids, first)
    fingerprint_s = _timed(lambda: [position_fingerprint(row, token) for row, token in zip(logits, ev.output_ids)])
    fps = [(f.ids, f.logits) for f in ev.fingerprints]
    receipt_s = _timed(lambda: make_receipt(key, model_id=model.model_id, backend=model.backend, request_hash=answer.receipt.request_hash,
                                            seed=ev.sampling.seed, seed_source=answer.receipt.seed_source, prompt_ids=ev.prompt_ids,
                                            output_ids=ev.output_ids, fingerprints=fps, finish_reason="length",
                                            evidence_hash=ev.digest()))  # hashing the evidence is part of signing
    stored = len(encode_answer(answer))
    flops = prefill_flops(model, len(ids), len(ids) - first)
    return {
        "tokens": length,
        "verdict": verdict.verdict,
        "generate_b1_s": wall_b1,
        "generate_b8_per_answer_s": b8_per_answer,
        "verify_s": verify_s,
        "verify_prefill_s": prefill_s,
        "verify_checks_s": checks_s,
        "verify_over_generate_b1": verify_s / wall_b1,
        "verify_over_generate_b8": verify_s / b8_per_answer,
        "verifier_prefill_tok_s": len(ids) / prefill_s,
        "torch_prefill_tok_s": len(ids) / torch_s if torch_s else None,
        "verifier_over_torch": torch_s / prefill_s if torch_s else None,
        "verifier_gflops": flops / prefill_s / 1e9,
        "fraction_of_matmul_peak": flops / prefill_s / 1e9 / peak,
        "fingerprint_and_receipt_over_generate": (fingerprint_s + receipt_s) / wall_b1,
        "receipt_bytes": len(answer.receipt.model_dump_json()),
        "answer_file_bytes_per_token": len(answer.model_dump_json()) / length,
        "stored_evidence_bytes_per_token": stored / length,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 512])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1)))
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    keep_freed_memory()  # as the CLI does for every command that runs TVM
    peak, how = matmul_peak_gflops(args.threads)
    model = load_model(DEFAULT_MODEL, device="cpu", progress=lambda m: None)
    key = NodeKey.generate()
    torch_prefill = torch_prefill_timer(model, args.threads)
    rows = [bench_length(model, key, n, peak, torch_prefill) for n in args.lengths]

    print(f"matmul peak ({how}, {args.threads} threads): {peak:.0f} GFLOP/s; backend {model.backend}")
    columns = ["tokens", "generate_b1_s", "generate_b8_per_answer_s", "verify_s", "verify_prefill_s", "verify_checks_s",
               "verify_over_generate_b1", "verify_over_generate_b8", "verifier_prefill_tok_s", "torch_prefill_tok_s",
               "verifier_over_torch", "fraction_of_matmul_peak", "fingerprint_and_receipt_over_generate", "receipt_bytes",
               "stored_evidence_bytes_per_token", "answer_file_bytes_per_token"]
    for name in columns:
        cells = "".join(f"{r[name]:>12.3f}" if isinstance(r[name], float) else f"{str(r[name]):>12}" for r in rows)
        print(f"{name:<40}{cells}")
    write_json(RESULTS / "verify.json", {"matmul_peak_gflops": peak, "peak_from": how, "threads": args.threads,
                                         "backend": model.backend, "rows": rows})


if __name__ == "__main__":
    main()

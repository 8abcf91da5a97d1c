"""Served speed: what a user gets from ``proofmesh generate`` and the HTTP API, against the raw
model loop and llama.cpp on the same GGUF, in one run.

Nothing sets ``TVM_NUM_THREADS``: the node sizes its own thread pool (``--threads`` default),
which is what a user runs. Rows, all on the default model, greedy unless marked:

- raw runtime: ``runtime.decode`` + numpy argmax, batch 1 and 16 (the inner loop), on the
  engine's thread; alone, and with the prefills that give each answer its first token (the work
  an engine answer does, to compare end to end; the engine's rate after the first token
  compares with the decode alone);
- engine: ``Engine.generate`` in this process, 1 client (greedy; T = 0.8 with top-p 0.9) and 16
  clients at once, with a per-token breakdown of where the engine's time goes (model step,
  sampling, fingerprint and log-softmax, detokenization and stop checks, the rest: event loop
  and thread hand-offs);
- ``proofmesh generate`` (a child process, its own reported tokens/s);
- HTTP: ``proofmesh run`` in a child process, 1, 4 and 16 streaming clients, greedy and T = 0.8
  top-p 0.9 (wall time per request: prefill, signing and storing evidence included);
- llama-cpp-python (``.[bench]``), same GGUF and thread count, end to end through its
  ``create_completion`` (tokenizing, sampling, detokenizing), in a child process.

Prints a table and writes JSON (``bench/results/served.json``); ratios are within this run.
Never a timed assertion.

    python -m bench.bench_served [--tokens 128] [--batch-tokens 64] [--skip-llamacpp]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.bench_http import start_server
from bench.bench_inference import raw_decode_rate
from compiled_models.registry import DEFAULT_MODEL
from bench.report import RESULTS, write_json

CHAT = [{"role": "user", "content": "Write a long story about a lighthouse keeper who finds a map."}]
SAMPLED = {"temperature": 0.8, "top_p": 0.9}


# ---------------------------------------------------------------------- llama.cpp (child process)

def llamacpp_end_to_end(tokens: int, threads: int) -> dict:
    """llama-cpp-python's own chat completion, greedy and sampled, timed end to end."""
    from llama_cpp import Llama

    from node.runtime import model_store

    llm = Llama(model_path=str(model_store.resolve(DEFAULT_MODEL)), n_threads=threads, n_threads_batch=threads,
                n_ctx=2048, verbose=False)
    out = {}
    for name, sampling in (("greedy", {"temperature": 0.0}), ("sampled", SAMPLED)):
        best = 0.0
        for _ in range(3):  # the first run warms up
            llm.reset()
            t = time.perf_counter()
            done = llm.create_chat_completion(messages=CHAT, max_tokens=tokens, seed=1, **sampling)
            best = max(best, done["usage"]["completion_tokens"] / (time.perf_counter() - t))
        out[f"{name}_tok_s"] = best
    return out


def run_llamacpp(tokens: int, threads: int) -> dict:
    """In a child: llama.cpp's OpenMP and TVM's thread pool must not share a process."""
    code = f"import json; from bench.bench_served import llamacpp_end_to_end as f; print(json.dumps(f({tokens}, {threads})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        reason = "not installed (pip install '.[bench]')" if "No module named 'llama_cpp'" in done.stderr else done.stderr[-300:]
        return {"skipped": reason}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- in this process

class Timed:
    """Wrap a callable and add up the seconds spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *args):
        t = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.seconds += time.perf_counter() - t
            self.calls += 1


async def engine_rates(model, tokens: int, batch_tokens: int) -> dict:
    from node.runtime.engine import Engine, GenerationRequest
    from verify.sampling import SamplingParams

    prompt = tuple(model.tokenizer.encode_chat(CHAT))

    decode_rates: list[float] = []  # per answer: tokens after the first over the time after it

    async def clients(n: int, max_tokens: int, **sampling) -> float:
        async def one(i: int) -> int:
            params = SamplingParams(max_tokens=max_tokens, seed=i, **({"temperature": 0.0} | sampling))
            result = await engine.complete(GenerationRequest(prompt, params))
            decode_rates.append((len(result.output_ids) - 1) / (result.duration - result.time_to_first_token))
            return len(result.output_ids)

        t = time.perf_counter()
        produced = sum(await asyncio.gather(*(one(i) for i in range(n))))
        return produced / (time.perf_counter() - t)

    out = {}
    async with Engine(model.runtime, model.tokenizer, model.model_id, max_context=model.max_context) as engine:
        await clients(1, 8)  # warm-up
        # The raw loop runs on the engine's own thread: TVM keeps a thread pool per calling
        # thread, and a second pool (the main thread's) measured the engine ~15 % slow.
        raw = lambda batch, n, prefill: engine.run_exclusive(raw_decode_rate, model.runtime, list(prompt), batch, n, prefill)  # noqa: E731
        out["raw_b1_tok_s"] = max([await raw(1, tokens, False) for _ in range(2)])
        out["raw_b1_with_prefill_tok_s"] = max([await raw(1, tokens, True) for _ in range(2)])
        out["raw_b16_tok_s"] = await raw(16, batch_tokens, False)
        out["raw_b16_with_prefill_tok_s"] = await raw(16, batch_tokens, True)
        # the breakdown: time in the model step and in the per-token work, over one greedy answer
        prefill, decode, accept = Timed(model.runtime.prefill), Timed(model.runtime.decode), Timed(engine._accept)
        model.runtime.prefill, model.runtime.decode, engine._accept = prefill, decode, accept
        t = time.perf_counter()
        decode_rates.clear()
        out["engine_b1_greedy_tok_s"] = await clients(1, tokens)
        wall = time.perf_counter() - t
        out["engine_b1_greedy_decode_tok_s"] = decode_rates[0]
        del model.runtime.prefill, model.runtime.decode, engine._accept  # the instance attributes go; the methods return
        per_token = 1000 / max(accept.calls, 1)
        out["breakdown_ms_per_token"] = {
            "wall": wall * per_token, "prefill (once)": prefill.seconds * per_token, "model_step": decode.seconds * per_token,
            "per_token_work": accept.seconds * per_token,
            "hand_offs": (wall - prefill.seconds - decode.seconds - accept.seconds) * per_token}
        out["engine_b1_sampled_tok_s"] = max([await clients(1, tokens, **SAMPLED) for _ in range(2)])
        out["engine_b16_greedy_tok_s"] = await clients(16, batch_tokens)
        out["engine_b16_sampled_tok_s"] = await clients(16, batch_tokens, **SAMPLED)
    return out


def per_token_work(model, samples: int = 64) -> dict:
    """Each piece of the engine's per-token work, on real logits rows, in ms per token."""
    from verify.evidence import top_k_fingerprint
    from verify.sampling import SamplingParams, sample_token

    rt = model.runtime
    rt.add_sequence(7000)
    rows = [rt.prefill(7000, model.tokenizer.encode_chat(CHAT))[-1]]
    for _ in range(samples - 1):
        rows.append(rt.decode([7000], [int(np.argmax(rows[-1]))])[0])
    rt.remove_sequence(7000)
    rh = bytes(32)

    def timed(fn) -> float:
        t = time.perf_counter()
        for step, row in enumerate(rows):
            fn(step, row)
        return 1000 * (time.perf_counter() - t) / len(rows)

    greedy, sampled = SamplingParams(seed=1, temperature=0.0), SamplingParams(seed=1, **SAMPLED)
    decoder = model.tokenizer.incremental_decoder()
    return {
        "sample_greedy": timed(lambda s, r: sample_token(r, greedy, rh, s, [])),
        "sample_t0.8_top_p0.9": timed(lambda s, r: sample_token(r, sampled, rh, s, [])),
        "fingerprint": timed(lambda s, r: top_k_fingerprint(r)),
        "log_softmax": timed(lambda s, r: np.log(np.sum(np.exp(r - np.float32(r.max())), dtype=np.float64))),
        "detokenize": timed(lambda s, r: decoder.push(int(np.argmax(r)))),
    }


def generate_cli(tokens: int) -> float:
    """``proofmesh generate``'s own tokens/s (greedy)."""
    done = subprocess.run([sys.executable, "-m", "node.cli", "generate", CHAT[0]["content"], "--chat", "--max-tokens", str(tokens),
                           "--temperature", "0", "--device", "cpu"], capture_output=True, text=True, check=True)
    return float(re.search(r"([\d.]+) tokens/s", done.stderr).group(1))


async def http_rates(tokens: int, batch_tokens: int) -> dict:
    import aiohttp

    proc, url = start_server(DEFAULT_MODEL, "cpu")

    async def clients(session, n: int, max_tokens: int, **sampling) -> float:
        async def one(i: int) -> int:
            body = {"model": DEFAULT_MODEL, "messages": CHAT, "max_tokens": max_tokens, "seed": i, "stream": True,
                    "stream_options": {"include_usage": True}, **({"temperature": 0.0} | sampling)}
            produced = 0
            async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.content:
                    if line.startswith(b"data: {") and b'"usage":{' in line:
                        produced = json.loads(line[6:])["usage"]["completion_tokens"]
            return produced

        t = time.perf_counter()
        produced = sum(await asyncio.gather(*(one(i) for i in range(n))))
        return produced / (time.perf_counter() - t)

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900), connector=aiohttp.TCPConnector(limit=0)) as s:
            await clients(s, 1, 8)  # warm-up
            out = {}
            for name, sampling in (("greedy", {}), ("sampled", SAMPLED)):
                out[f"http_c1_{name}_tok_s"] = max([await clients(s, 1, tokens, **sampling) for _ in range(2)])
                for n in (4, 16):
                    out[f"http_c{n}_{name}_tok_s"] = await clients(s, n, batch_tokens, **sampling)
            return out
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="tokens of a single-client answer")
    parser.add_argument("--batch-tokens", type=int, default=64, help="tokens per answer with 4 and 16 clients")
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "served.json")
    args = parser.parse_args(argv)
    if "TVM_NUM_THREADS" in os.environ:
        parser.error("unset TVM_NUM_THREADS: this measures what a user gets, who sets nothing")

    from node.compiler.targets import configure_threads, detect
    from node.runtime.allocator import keep_freed_memory
    from node.runtime.loading import load_model

    threads = configure_threads(None)
    keep_freed_memory()  # as the CLI does
    model = load_model(DEFAULT_MODEL, device="cpu", progress=lambda m: None)
    report: dict = {"model": DEFAULT_MODEL, "backend": model.backend, "cpu": detect("cpu").description, "threads": threads,
                    "tokens": args.tokens, "batch_tokens": args.batch_tokens}
    report.update(asyncio.run(engine_rates(model, args.tokens, args.batch_tokens)))
    report["per_token_work_ms"] = per_token_work(model)
    del model  # the server child gets the machine to itself
    report["generate_cli_tok_s"] = generate_cli(args.tokens)
    report.update(asyncio.run(http_rates(args.tokens, args.batch_tokens)))
    report["llama_cpp"] = {"skipped": "--skip-llamacpp"} if args.skip_llamacpp else run_llamacpp(args.tokens, threads)

    r, lc = report, report["llama_cpp"]
    rows = [  # (path, tokens/s, against which row's tokens/s, that row's name)
        ("raw runtime decode, batch 1", r["raw_b1_tok_s"], None, ""),
        ("raw runtime, batch 1, prefill + decode", r["raw_b1_with_prefill_tok_s"], None, ""),
        ("engine, 1 client, greedy", r["engine_b1_greedy_tok_s"], r["raw_b1_with_prefill_tok_s"], "raw prefill + decode"),
        ("engine, 1 client, greedy, after the first token", r["engine_b1_greedy_decode_tok_s"], r["raw_b1_tok_s"],
         "raw decode"),
        ("engine, 1 client, T=0.8 top-p 0.9", r["engine_b1_sampled_tok_s"], r["raw_b1_with_prefill_tok_s"], "raw prefill + decode"),
        ("proofmesh generate, greedy", r["generate_cli_tok_s"], lc.get("greedy_tok_s"), "llama.cpp greedy"),
        ("HTTP, 1 client, greedy", r["http_c1_greedy_tok_s"], lc.get("greedy_tok_s"), "llama.cpp greedy"),
        ("HTTP, 1 client, T=0.8 top-p 0.9", r["http_c1_sampled_tok_s"], lc.get("sampled_tok_s"), "llama.cpp sampled"),
        ("HTTP, 4 clients, greedy", r["http_c4_greedy_tok_s"], r["http_c1_greedy_tok_s"], "HTTP 1 client"),
        ("HTTP, 16 clients, greedy", r["http_c16_greedy_tok_s"], r["http_c1_greedy_tok_s"], "HTTP 1 client"),
        ("HTTP, 16 clients, T=0.8 top-p 0.9", r["http_c16_sampled_tok_s"], r["http_c1_sampled_tok_s"], "HTTP 1 client"),
        ("engine, 16 clients, greedy", r["engine_b16_greedy_tok_s"], r["raw_b16_with_prefill_tok_s"], "raw b16 prefill + decode"),
        ("raw runtime decode, batch 16", r["raw_b16_tok_s"], r["raw_b1_tok_s"], "raw batch 1"),
        ("raw runtime, batch 16, prefill + decode", r["raw_b16_with_prefill_tok_s"], r["raw_b1_with_prefill_tok_s"],
         "raw b1 prefill + decode"),
        ("llama-cpp-python end to end, greedy", lc.get("greedy_tok_s"), None, ""),
        ("llama-cpp-python end to end, T=0.8 top-p 0.9", lc.get("sampled_tok_s"), None, ""),
    ]
    print(f"\nServed speed ({DEFAULT_MODEL}, {r['backend']}, {threads} threads, no TVM_NUM_THREADS)")
    print("| path | tokens/s | ratio | against |")
    print("| --- | --- | --- | --- |")
    for name, rate, base, base_name in rows:
        if rate is None:
            print(f"| {name} | skipped: {lc.get('skipped', '')} | | |")
        else:
            print(f"| {name} | {rate:.1f} | {f'{rate / base:.2f}x' if base else ''} | {base_name if base else ''} |")
    b = report["breakdown_ms_per_token"]
    print("\nEngine, 1 client, greedy: ms per token")
    print(" | ".join(f"{k} {v:.2f}" for k, v in b.items()))
    print("per-token work on real logits: " + " | ".join(f"{k} {v:.3f}" for k, v in report["per_token_work_ms"].items()))
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()

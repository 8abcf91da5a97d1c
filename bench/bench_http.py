"""HTTP benchmark: what the OpenAI-style API costs on top of the engine.

Same run, same model, same requests (chat prompts, fixed seeds, so both paths produce the very
same tokens): first the engine called directly in this process, then a ``proofmesh run``
server in a child process driven over 127.0.0.1 by streaming clients (aiohttp, SSE). At 1, 4
and 16 concurrent clients it reports time to first token (submission to first event, resp.
request sent to first SSE chunk) and aggregate tokens/s. The HTTP path includes everything a
client gets: JSON parsing, chat templating, SSE framing, signing every receipt and storing its
evidence (in the server's model store, as a real node does). Prints a table and writes JSON
(``bench/results/http.json``). Never a timed assertion.

    python -m bench.bench_http [--model NAME] [--tokens 64] [--clients 1 4 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp

from compiled_models.registry import DEFAULT_MODEL
from node.runtime.engine import Engine, GenerationRequest
from node.runtime.loading import load_model
from verify.sampling import SamplingParams
from bench.report import RESULTS, write_json

PROMPT = "Write a long story about a lighthouse keeper who finds a map."
TEMPERATURE = 0.7


def _messages(client: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{PROMPT} (story {client})"}]


def _summary(ttfts: list[float], tokens: int, wall: float) -> dict:
    return {"ttft_p50_ms": 1000 * statistics.median(ttfts), "ttft_max_ms": 1000 * max(ttfts),
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


async def engine_round(engine: Engine, tokenizer, clients: int, max_tokens: int) -> dict:
    """``clients`` requests at once, straight into the engine."""

    async def one(i: int) -> tuple[float, int]:
        params = SamplingParams(temperature=TEMPERATURE, max_tokens=max_tokens, seed=i)
        start = time.perf_counter()
        ttft, n = 0.0, 0
        async for event in engine.generate(GenerationRequest(tuple(tokenizer.encode_chat(_messages(i))), params)):
            if n == 0:
                ttft = time.perf_counter() - start
            n += 1
        return ttft, n

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(clients)))
    return _summary([r[0] for r in results], sum(r[1] for r in results), time.perf_counter() - start)


async def http_round(session: aiohttp.ClientSession, url: str, model: str, clients: int, max_tokens: int) -> dict:
    """``clients`` streaming chat requests at once, over HTTP."""

    async def one(i: int) -> tuple[float, int]:
        body = {"model": model, "messages": _messages(i), "max_tokens": max_tokens, "temperature": TEMPERATURE,
                "seed": i, "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        ttft, tokens = None, 0
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                if ttft is None:
                    ttft = time.perf_counter() - start
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
        return ttft or 0.0, tokens

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(clients)))
    return _summary([r[0] for r in results], sum(r[1] for r in results), time.perf_counter() - start)


def _median_round(rounds: list[dict]) -> dict:
    """The round with the median throughput (its TTFTs belong to it)."""
    return sorted(rounds, key=lambda r: r["tokens_per_s"])[len(rounds) // 2]


async def bench_engine(model_name: str, device: str, clients: list[int], max_tokens: int, repeats: int) -> dict:
    model = load_model(model_name, device=device, progress=lambda m: None)
    async with Engine(model.runtime, model.tokenizer, model.model_id, max_context=model.max_context) as engine:
        await engine_round(engine, model.tokenizer, 1, 4)  # warm-up
        return {c: _median_round([await engine_round(engine, model.tokenizer, c, max_tokens) for _ in range(repeats)])
                for c in clients}


def proofmesh_child(args: list[str], ready: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """``proofmesh ARGS`` in a child process; returns it once its stderr prints a line matching
    ``ready``, and the URL that pattern's group names."""
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=env)
    for line in proc.stderr:  # ends if the child dies before it listens
        found = re.search(ready, line)
        if found:
            # keep draining stderr (the access log) so the child never blocks on a full pipe
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, found.group(1)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"proofmesh {args[0]} exited before it served")


def start_server(model_name: str, device: str) -> tuple[subprocess.Popen, str]:
    """``proofmesh run`` on a free port; returns the process and its base URL."""
    return proofmesh_child(["run", "--model", model_name, "--device", device, "--port", "0"], r"serving .* on (http://\S+)/v1")


async def bench_http(model_name: str, device: str, clients: list[int], max_tokens: int, repeats: int) -> dict:
    proc, url = start_server(model_name, device)
    try:
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            async with session.get(f"{url}/v1/models") as r:
                served = (await r.json())["data"][0]["id"]
            await http_round(session, url, served, 1, 4)  # warm-up
            return {c: _median_round([await http_round(session, url, served, c, max_tokens) for _ in range(repeats)])
                    for c in clients}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3, help="rounds per setting; the median round is reported")
    parser.add_argument("--out", type=Path, default=RESULTS / "http.json")
    args = parser.parse_args(argv)

    engine = asyncio.run(bench_engine(args.model, args.device, args.clients, args.tokens, args.repeats))
    http = asyncio.run(bench_http(args.model, args.device, args.clients, args.tokens, args.repeats))
    rows = []
    for c in args.clients:
        e, h = engine[c], http[c]
        rows.append({"clients": c, "engine": e, "http": h,
                     "throughput_overhead_pct": 100 * (e["tokens_per_s"] / h["tokens_per_s"] - 1),
                     "ttft_added_ms": h["ttft_p50_ms"] - e["ttft_p50_ms"]})

    print(f"\nHTTP vs engine ({args.model}, max_tokens {args.tokens}, median of {args.repeats} rounds, {os.cpu_count()} cores)")
    print("| clients | engine TTFT p50 | HTTP TTFT p50 | engine tok/s | HTTP tok/s | HTTP throughput cost |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        e, h = r["engine"], r["http"]
        print(f"| {r['clients']} | {e['ttft_p50_ms']:.0f} ms | {h['ttft_p50_ms']:.0f} ms | {e['tokens_per_s']:.1f} | "
              f"{h['tokens_per_s']:.1f} | {r['throughput_overhead_pct']:+.1f} % |")
    report = {"model": args.model, "max_tokens": args.tokens, "repeats": args.repeats, "temperature": TEMPERATURE, "rows": rows}
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()

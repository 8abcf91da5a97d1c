"""Soak: a small network on 127.0.0.1 under steady load for a while (10 minutes by default).

A gateway and two serving nodes (real ``proofmesh run`` processes, the tiny model unless
``--model`` names another), and ``--clients`` clients that each send, back to back, a mix of
requests (plain, streamed, chat; half through the gateway, half straight to a server). Reports
throughput, errors, p50/p99 latency and each process's resident memory growth from the end of
a warm-up to the end of the run (target: under 10 %, zero errors). Prints a table and writes
``bench/results/soak.json``; never a timed assertion (``tests/p2p/test_soak.py`` runs it for
20 seconds and checks only that nothing failed).

    python -m bench.bench_soak [--seconds 600] [--clients 4] [--model PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.models_fixtures import make_tiny_hf_checkpoint
from tests.p2p.cluster import Cluster, NodeProcess, warm_store
from bench.report import RESULTS, write_json

WARM_UP_S = 5.0
SAMPLE_EVERY_S = 5.0


def _rss_mib(node: NodeProcess) -> float:
    for line in Path(f"/proc/{node.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {node.name}")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


async def _load(targets: list[str], model: str, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    tokens = 0
    deadline = time.monotonic() + seconds

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal tokens
        url = targets[i % len(targets)]
        kind = i % 3
        path = "/v1/chat/completions" if kind == 2 else "/v1/completions"
        body = {"model": model, "max_tokens": 12, "temperature": 0.8, "seed": i, "stream": kind == 1}
        body.update({"messages": [{"role": "user", "content": f"hello {i}"}]} if kind == 2 else {"prompt": f"hello {i}"})
        start = time.perf_counter()
        try:
            async with session.post(url + path, json=body) as response:
                text = await response.text()
                if response.status != 200 or '"error"' in text:
                    errors.append(f"{response.status}: {text[:200]}")
                    return
                tokens += text.count('"text"') if kind == 1 else json.loads(text)["usage"]["completion_tokens"]
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            return
        latencies.append(time.perf_counter() - start)

    async def client(c: int, session: aiohttp.ClientSession) -> None:
        i = c
        while time.monotonic() < deadline:
            await one(session, i)
            i += clients

    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(client(c, session) for c in range(clients)))
    elapsed = time.perf_counter() - started
    return {"requests": len(latencies) + len(errors), "errors": len(errors), "error_samples": errors[:5],
            "requests_per_s": len(latencies) / elapsed, "tokens_per_s": tokens / elapsed,
            "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
            "p99_ms": 1000 * _percentile(latencies, 0.99)}


def run_soak(root: Path, model: Path, seconds: float, clients: int) -> dict:
    """The soak on a fresh cluster under ``root``; returns the figures (see the module docstring)."""
    warm_store(root / "warm", model)
    cluster = Cluster(root / "nodes", root / "warm", echo_logs=False)
    try:
        gateway = cluster.wait_ready(cluster.start("gateway", []))
        servers = [cluster.wait_ready(cluster.start(f"server{i}", [str(model)], bootstrap=[gateway.addrs[0]]))
                   for i in range(2)]
        deadline = time.monotonic() + 60
        while len(gateway.get("/v1/models")["data"][0].get("peers", []) if gateway.get("/v1/models")["data"] else []) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not learn both servers")
            time.sleep(0.2)
        nodes = [gateway, *servers]
        targets = [gateway.url, servers[0].url, gateway.url, servers[1].url]
        asyncio.run(_load(targets, model.name, clients, WARM_UP_S))
        start_rss = {n.name: _rss_mib(n) for n in nodes}
        samples: dict[str, list[float]] = {n.name: [] for n in nodes}

        async def run() -> dict:
            async def sample() -> None:
                while True:
                    await asyncio.sleep(SAMPLE_EVERY_S)
                    for n in nodes:
                        samples[n.name].append(_rss_mib(n))

            sampler = asyncio.create_task(sample())
            try:
                return await _load(targets, model.name, clients, seconds)
            finally:
                sampler.cancel()

        result = asyncio.run(run())
        end_rss = {n.name: _rss_mib(n) for n in nodes}
        result["memory"] = {n.name: {"start_mib": start_rss[n.name], "end_mib": end_rss[n.name],
                                     "peak_mib": max([end_rss[n.name], *samples[n.name]]),
                                     "growth": end_rss[n.name] / start_rss[n.name] - 1} for n in nodes}
        result["alive"] = all(n.process.poll() is None for n in nodes)
        result.update(seconds=seconds, clients=clients)
        return result
    finally:
        cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--model", type=Path, help="a checkpoint to serve (default: a tiny random model)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        root = Path(tmp)
        model = args.model or make_tiny_hf_checkpoint(root / "tiny")
        result = run_soak(root, model, args.seconds, args.clients)
    print(f"\nsoak: {result['seconds']:.0f} s, {result['clients']} clients, gateway + 2 servers on loopback")
    print(f"requests {result['requests']}  errors {result['errors']}  {result['requests_per_s']:.1f} req/s  "
          f"{result['tokens_per_s']:.1f} tokens/s  p50 {result['p50_ms']:.1f} ms  p99 {result['p99_ms']:.1f} ms")
    print(f"{'process':<10}{'RSS start MiB':>15}{'end MiB':>10}{'peak MiB':>10}{'growth':>9}")
    for name, m in result["memory"].items():
        print(f"{name:<10}{m['start_mib']:>15.1f}{m['end_mib']:>10.1f}{m['peak_mib']:>10.1f}{m['growth']:>9.1%}")
    write_json(RESULTS / "soak.json", result)


if __name__ == "__main__":
    main()

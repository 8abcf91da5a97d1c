"""p2p benchmark: what one forwarding hop costs, how fast nodes find each other, what an idle
connected node burns.

Same run, loopback, real ``proofmesh run`` processes (``tests/p2p/cluster.py``) with a tiny random
model, so the model's own time is small and the network's shows:

- hop latency: the same non-streamed request (1 token) sent straight to the serving node and
  through a gateway (``--model none``) that forwards it over ``/proofmesh/infer/1``; p50/p99
  of each and the difference (the target is <= 5 ms added at p50);
- throughput: requests/s and tokens/s with concurrent clients, direct vs through the hop;
- discovery: N gateway nodes, each started with only the first one's address, until every node
  lists the other N-1 (timed from the last node's start);
- idle CPU: a connected node's CPU time over a quiet interval (discovery keeps exchanging tables
  every few seconds).

Prints a table and writes ``bench/results/p2p.json``. Never a timed assertion.

    python -m bench.bench_p2p [--requests 200] [--clients 8] [--nodes 5 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.models_fixtures import make_tiny_hf_checkpoint
from tests.p2p.cluster import Cluster, NodeProcess, warm_store
from bench.report import RESULTS, write_json

IDLE_WINDOW_S = 10.0
DISCOVERY_TIMEOUT_S = 120.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def _latencies(url: str, model: str, n: int) -> list[float]:
    body = {"model": model, "prompt": "hello", "max_tokens": 1, "temperature": 0, "seed": 1}
    out = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            start = time.perf_counter()
            async with session.post(url + "/v1/completions", json=body) as response:
                await response.read()
                assert response.status == 200, await response.text()
            out.append(time.perf_counter() - start)
    return out


async def _throughput(url: str, model: str, n: int, clients: int, tokens: int) -> dict:
    body = {"model": model, "prompt": "hello", "max_tokens": tokens, "temperature": 0.7}
    done_tokens = 0
    queue = list(range(n))

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal done_tokens
        while queue:
            i = queue.pop()
            async with session.post(url + "/v1/completions", json={**body, "seed": i}) as response:
                answer = await response.json()
                done_tokens += answer["usage"]["completion_tokens"]

    async with aiohttp.ClientSession() as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {"requests_per_s": n / elapsed, "tokens_per_s": done_tokens / elapsed}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _idle_cpu_percent(node: NodeProcess) -> float:
    before = _cpu_seconds(node.process.pid)
    time.sleep(IDLE_WINDOW_S)
    return 100.0 * (_cpu_seconds(node.process.pid) - before) / IDLE_WINDOW_S


def bench_hop(root: Path, warm: Path, model: Path, requests: int, clients: int) -> dict:
    cluster = Cluster(root / "hop", warm, echo_logs=False)
    try:
        gateway = cluster.wait_ready(cluster.start("gateway", []))
        server = cluster.wait_ready(cluster.start("server", [str(model)], bootstrap=[gateway.addrs[0]]))
        while not gateway.get("/v1/models")["data"]:
            time.sleep(0.05)
        asyncio.run(_latencies(gateway.url, model.name, 20))  # warm up both paths
        asyncio.run(_latencies(server.url, model.name, 20))
        direct = asyncio.run(_latencies(server.url, model.name, requests))
        hop = asyncio.run(_latencies(gateway.url, model.name, requests))
        result = {
            "requests": requests,
            "direct_p50_ms": 1000 * statistics.median(direct), "direct_p99_ms": 1000 * _percentile(direct, 0.99),
            "hop_p50_ms": 1000 * statistics.median(hop), "hop_p99_ms": 1000 * _percentile(hop, 0.99),
        }
        result["added_p50_ms"] = result["hop_p50_ms"] - result["direct_p50_ms"]
        result["added_p99_ms"] = result["hop_p99_ms"] - result["direct_p99_ms"]
        result["throughput_direct"] = asyncio.run(_throughput(server.url, model.name, requests, clients, 16))
        result["throughput_hop"] = asyncio.run(_throughput(gateway.url, model.name, requests, clients, 16))
        result["clients"] = clients
        result["idle_cpu_percent_gateway"] = _idle_cpu_percent(gateway)
        result["idle_cpu_percent_server"] = _idle_cpu_percent(server)
        return result
    finally:
        cluster.close()


def bench_discovery(root: Path, warm: Path, n: int) -> dict:
    cluster = Cluster(root / f"discovery-{n}", warm, echo_logs=False)
    try:
        first = cluster.wait_ready(cluster.start("n0", []))
        nodes = [first] + [cluster.start(f"n{i}", [], bootstrap=[first.addrs[0]]) for i in range(1, n)]
        for node in nodes[1:]:
            cluster.wait_ready(node)
        start = time.monotonic()  # the last node is up
        while True:
            if all(len(node.get("/v1/peers")["data"]) == n - 1 for node in nodes):
                break
            if time.monotonic() - start > DISCOVERY_TIMEOUT_S:
                raise RuntimeError(f"{n} nodes did not find each other in {DISCOVERY_TIMEOUT_S} s")
            time.sleep(0.05)
        seconds = time.monotonic() - start
        return {"nodes": n, "discovery_s": seconds, "idle_cpu_percent_connected": _idle_cpu_percent(nodes[-1])}
    finally:
        cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--nodes", type=int, nargs="*", default=[5, 10], help="mesh sizes to time discovery for (none: skip)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-p2p-") as tmp:
        root = Path(tmp)
        model = make_tiny_hf_checkpoint(root / "tiny")
        warm_store(root / "warm", model)
        hop = bench_hop(root, root / "warm", model, args.requests, args.clients)
        discovery = [bench_discovery(root, root / "warm", n) for n in args.nodes]

    print(f"\none hop on loopback (tiny model, {hop['requests']} sequential non-streamed 1-token requests)")
    print(f"{'path':<10}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>10}{'tokens/s':>10}   ({hop['clients']} clients)")
    for name in ("direct", "hop"):
        tp = hop[f"throughput_{name}"]
        print(f"{name:<10}{hop[name + '_p50_ms']:>10.2f}{hop[name + '_p99_ms']:>10.2f}"
              f"{tp['requests_per_s']:>10.1f}{tp['tokens_per_s']:>10.1f}")
    print(f"{'added':<10}{hop['added_p50_ms']:>10.2f}{hop['added_p99_ms']:>10.2f}")
    print(f"idle CPU: gateway {hop['idle_cpu_percent_gateway']:.2f} %, server {hop['idle_cpu_percent_server']:.2f} % of a core")
    print(f"\n{'nodes':<8}{'discovery s':>12}{'idle CPU % (one node, connected to all)':>42}")
    for d in discovery:
        print(f"{d['nodes']:<8}{d['discovery_s']:>12.2f}{d['idle_cpu_percent_connected']:>42.2f}")

    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "p2p.json", {"hop": hop, "discovery": discovery})


if __name__ == "__main__":
    main()

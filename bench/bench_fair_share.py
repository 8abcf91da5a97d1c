"""One client against everyone (issue 21, attacks 7-10), measured on what users run: a
``proofmesh run`` node and a ``proofmesh verifier`` sidecar auditing every answer (rate 1), as
child processes on 127.0.0.1, the default model unless ``--model`` names another.

Two phases, one run:

1. time to first token of a probe client straight to the node (a stream, its own API key), alone
   and then while one attacker runs attacks 7-10 at once (n = 16 with four longest stop strings,
   1 MiB bodies of 29,000 messages, hundreds of keep-alive connections polling ``/health``, and
   16 x 2,048-token prompts with max_tokens 1). Target: under attack within 3x of alone;
2. a soak: ``--clients`` honest clients through the sidecar (half streamed) for ``--seconds``
   while the attacker keeps going. Target: no honest answer refused, and no audit of one
   ``fraud`` or ``withheld``.

The node takes three API keys, so each party is its own client (the sidecar passes its clients'
key on). Prints a table and writes ``bench/results/fair_share.json``; never a timed assertion.

    python -m bench.bench_fair_share [--seconds 600] [--clients 16] [--probes 8] [--model NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.report import RESULTS, write_json
from compiled_models.registry import DEFAULT_MODEL

HONEST, ATTACKER, PROBE, OPERATOR = "honest-key", "attacker-key", "probe-key", "operator-key"
ATTACKER_ADDRESS = "127.0.0.2"
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
             "List three prime numbers.", "Who wrote Hamlet?", "Give me a tip for learning Python."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _process(args: list[str], url: str, log: Path):
    """A ``proofmesh`` command as a child process, once its port takes connections."""
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "node.cli", *args], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{args[0]} exited {process.returncode}: {log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=1):
                    break
            except OSError:
                time.sleep(1)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _ttft(http: aiohttp.ClientSession, url: str, model: str, key: str, i: int) -> float:
    body = {"model": model, "stream": True, "max_tokens": 8, "temperature": 0.7, "seed": i,
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
    start = time.perf_counter()
    async with http.post(f"{url}/v1/chat/completions", json=body, headers=_auth(key)) as resp:
        async for line in resp.content:
            if line.startswith(b"data: {") and b'"content"' in line:
                return time.perf_counter() - start
    raise RuntimeError(f"no token for the probe ({resp.status})")


class Attacker:
    """Attacks 7-10 at once, from one API key, until stopped; counts what it was answered."""

    def __init__(self, url: str, model: str, vocab: int):
        self.url, self.model, self.vocab = url, model, vocab
        self.statuses: dict[str, dict[int, int]] = {}
        self.stopping = asyncio.Event()

    def _count(self, attack: str, status: int) -> None:
        by = self.statuses.setdefault(attack, {})
        by[status] = by.get(status, 0) + 1

    async def _loop(self, attack: str, http: aiohttp.ClientSession, method: str, path: str, body: dict | None = None,
                    data: bytes | None = None, pause: float = 0.0) -> None:
        while not self.stopping.is_set():
            try:
                async with http.request(method, f"{self.url}{path}", json=body, data=data,
                                        headers={**_auth(ATTACKER), "Content-Type": "application/json"}) as resp:
                    await resp.read()
                    self._count(attack, resp.status)
                    if resp.status == 429:
                        await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                self._count(attack, 0)
                await asyncio.sleep(0.5)
            await asyncio.sleep(pause)

    async def run(self) -> None:
        stops = ["".join(chr(97 + (i * 7 + j) % 26) for j in range(256)) for i in range(4)]
        flood = {"model": self.model, "prompt": "Hello", "n": 16, "max_tokens": 1, "stop": stops}
        messages = json.dumps({"model": self.model, "messages": [{"role": "user", "content": "a"}] * 29_000}).encode()
        long_prompts = {"model": self.model, "max_tokens": 1,
                        "prompt": [[(7 * i + 13 * j) % self.vocab for j in range(2048)] for i in range(16)]}
        # From its own loopback address: connections are shared out by address (no key is known yet
        # when one opens), and everyone else here comes from 127.0.0.1.
        connector = aiohttp.TCPConnector(limit=0, local_addr=(ATTACKER_ADDRESS, 0))
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:
            pollers = [self._loop("9: keep-alive /health", http, "GET", "/health", pause=10.0) for _ in range(300)]
            await asyncio.gather(self._loop("7: n=16 stop strings", http, "POST", "/v1/completions", flood),
                                 *(self._loop("8: 29,000 messages", http, "POST", "/v1/chat/completions", data=messages)
                                   for _ in range(4)),
                                 *(self._loop("10: 16 x 2,048-token prompts", http, "POST", "/v1/completions", long_prompts)
                                   for _ in range(4)),
                                 *pollers)


async def _honest(url: str, model: str, seconds: float, clients: int) -> dict:
    counts = {"ok": 0, "refused": 0, "other": 0}
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    async def one(c: int, http: aiohttp.ClientSession) -> None:
        i = 0
        while time.monotonic() < deadline:
            i += 1
            body = {"model": model, "max_tokens": 32, "temperature": 0.7, "seed": c * 100_000 + i, "stream": c % 2 == 1,
                    "messages": [{"role": "user", "content": QUESTIONS[(c + i) % len(QUESTIONS)]}]}
            try:
                async with http.post(f"{url}/v1/chat/completions", json=body, headers=_auth(HONEST)) as resp:
                    text = (await resp.read()).decode(errors="replace")
                refused = "answer_refused" in text
                done = resp.status == 200 and not refused and ('"error"' not in text)
                counts["ok" if done else "refused" if refused else "other"] += 1
                if not done and len(errors) < 10:
                    errors.append(f"{resp.status}: {text[:200]}")
                if resp.status == 429:
                    await asyncio.sleep(1)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                counts["other"] += 1
                errors.append(repr(exc)[:200])

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as http:
        await asyncio.gather(*(one(c, http) for c in range(clients)))
    return {**counts, "errors": errors}


async def _audits(sidecar_url: str, settle_s: float = 600) -> dict[str, int]:
    """The sidecar's audit states once none is pending (or ``settle_s`` passed)."""
    deadline = time.monotonic() + settle_s
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{sidecar_url}/v1/audits?limit=1000", headers=_auth(OPERATOR)) as resp:
                records = (await resp.json())["data"]
            states: dict[str, int] = {}
            for r in records:
                states[r["state"]] = states.get(r["state"], 0) + 1
            if not states.get("pending") or time.monotonic() > deadline:
                return states
            await asyncio.sleep(5)


async def measure(node_url: str, sidecar_url: str, model: str, vocab: int, seconds: float, clients: int, probes: int) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        await _ttft(http, node_url, model, PROBE, 0)  # warm
        alone = [await _ttft(http, node_url, model, PROBE, i) for i in range(probes)]
        attacker = Attacker(node_url, model, vocab)
        attack = asyncio.create_task(attacker.run())
        await asyncio.sleep(10)  # let every attack get going
        attacked = [await _ttft(http, node_url, model, PROBE, i) for i in range(probes)]
        honest = await _honest(sidecar_url, model, seconds, clients)
        attacker.stopping.set()
        await asyncio.wait_for(attack, 900)
    audits = await _audits(sidecar_url)
    return {"ttft_alone_ms": [1000 * t for t in alone], "ttft_attacked_ms": [1000 * t for t in attacked],
            "ttft_ratio": statistics.median(attacked) / statistics.median(alone), "honest": honest, "audits": audits,
            "attacker": {k: {str(s): n for s, n in v.items()} for k, v in attacker.statuses.items()},
            "seconds": seconds, "clients": clients}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    args = ap.parse_args()
    node_port, sidecar_port = _free_port(), _free_port()
    node_url, sidecar_url = f"http://127.0.0.1:{node_port}", f"http://127.0.0.1:{sidecar_port}"
    from node.runtime.loading import load_model  # the served name and vocabulary, as the node reports them

    loaded = load_model(args.model, device="cpu", progress=lambda m: None)
    name, vocab = Path(loaded.name).name, loaded.vocab_size
    del loaded
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        node_args = ["run", "--model", args.model, "--port", str(node_port), "--key", str(work / "node.pem"),
                     *(a for k in (HONEST, ATTACKER, PROBE) for a in ("--api-key", k))]
        sidecar_args = ["verifier", "--upstream", node_url, "--model", args.model, "--audit-rate", "1", "--port", str(sidecar_port),
                        "--ledger", str(work / "ledger.sqlite"), "--key", str(work / "verifier.pem"), "--api-key", HONEST,
                        "--operator-key", OPERATOR]
        with _process(node_args, node_url, work / "node.log"), _process(sidecar_args, sidecar_url, work / "sidecar.log"):
            report = asyncio.run(measure(node_url, sidecar_url, name, vocab, args.seconds, args.clients, args.probes))
    alone, attacked = statistics.median(report["ttft_alone_ms"]), statistics.median(report["ttft_attacked_ms"])
    print(f"\none client against everyone ({args.model}; {args.clients} honest clients through the sidecar at audit rate 1 "
          f"for {args.seconds:.0f} s while one attacker runs attacks 7-10)")
    print(f"{'probe time to first token, alone':<46}{alone:>9.0f} ms (median of {args.probes})")
    print(f"{'  the same, under attack':<46}{attacked:>9.0f} ms  ({report['ttft_ratio']:.2f}x; target <= 3x)")
    h = report["honest"]
    print(f"{'honest answers through the sidecar':<46}{h['ok']:>9}  refused {h['refused']}, other errors {h['other']}")
    print(f"{'audits by state':<46}{json.dumps(report['audits'])}")
    for attack, statuses in sorted(report["attacker"].items()):
        print(f"  attacker {attack:<36}{json.dumps(statuses)}")
    write_json(RESULTS / "fair_share.json", report)


if __name__ == "__main__":
    main()

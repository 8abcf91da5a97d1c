"""What the verifier sidecar adds to an answer at batch 1: binding it and rebuilding it from the
signed answer files (issue 21's target: at most 1 % of generating it).

Same process, same run: a node serving the default model and a sidecar in front of it (audit
rate 0: audits are not part of what every answer pays), both on 127.0.0.1. For each of
``--answers`` chat requests (fixed seeds, so both paths produce the same tokens) it times, in
alternating order, the answer straight from the node and the same answer through the sidecar,
and, in this process with the answer file in hand, the sidecar's own work on it: parsing the
response, binding (``verify.binding``) and rebuilding it with the node's renderer and comparing
(``node.sidecar.relay``). Reports the work's share of the node's answer time (the target) and
the whole hop's (the evidence fetch and a second HTTP round trip included). Prints a table and
writes ``bench/results/relay.json``. Never a timed assertion.

    python -m bench.bench_relay [--answers 12] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.report import RESULTS, write_json
from compiled_models.registry import DEFAULT_MODEL
from node.api.app import make_app
from node.api.evidence_tokens import receipt_path
from node.api.server import start_server
from node.compiler.targets import configure_threads
from node.runtime.allocator import keep_freed_memory
from node.runtime.loading import load_model
from node.sidecar.app import Sidecar, make_sidecar_app
from node.sidecar.relay import checked_rebuild, parse_response
from verify.binding import bind_answers
from verify.evidence import AnswerFile
from verify.evidence_store import EvidenceStore
from verify.identity import NodeKey
from verify.ledger import Ledger

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
             "List three prime numbers.", "Who wrote Hamlet?", "Give me a tip for learning Python."]


async def run(answers: int, tokens: int, workdir: Path) -> dict:
    node_model, auditor = (load_model(DEFAULT_MODEL, device="cpu", progress=lambda m: None) for _ in range(2))
    store = EvidenceStore(workdir / "evidence.sqlite")
    ledger = Ledger(workdir / "ledger.sqlite")
    node_runner, node_port = await start_server(make_app([node_model], NodeKey.generate(), store), "127.0.0.1", 0)
    node_url = f"http://127.0.0.1:{node_port}"
    sidecar = Sidecar([node_url], ledger, NodeKey.generate(), {auditor.model_id: auditor}, audit_rate=0.0)
    side_runner, side_port = await start_server(make_sidecar_app(sidecar), "127.0.0.1", 0)
    side_url = f"http://127.0.0.1:{side_port}"
    rows = []
    try:
        async with aiohttp.ClientSession() as http:
            async def ask(url: str, body: dict) -> tuple[float, bytes]:
                start = time.perf_counter()
                async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
                    data = await resp.read()
                    assert resp.status == 200, data[:300]
                return time.perf_counter() - start, data

            warm = {"model": node_model.name.split("/")[-1], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            await ask(node_url, warm), await ask(side_url, {**warm, "seed": 0})
            for i in range(answers):
                body = {"model": warm["model"], "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                        "max_tokens": tokens, "temperature": 0.7, "seed": 1000 + i}
                order = [node_url, side_url] if i % 2 == 0 else [side_url, node_url]
                times = {url: (await ask(url, body))[0] for url in order}
                _, data = await ask(node_url, body)  # the node's own response, for the in-process work
                rows.append({"node_s": times[node_url], "sidecar_s": times[side_url], **await _work(http, node_url, sidecar, body, data)})
    finally:
        await side_runner.cleanup()
        await node_runner.cleanup()
        store.close()
        ledger.close()
    return summarise(rows)


async def _work(http: aiohttp.ClientSession, node_url: str, sidecar: Sidecar, body: dict, data: bytes) -> dict:
    """The sidecar's own work on one answer, timed apart from any I/O: parse, bind, rebuild."""
    proof = parse_response("chat", data).model_dump(mode="json")["proofmesh"]
    async with http.get(f"{node_url}{receipt_path(proof['receipt']['receipt_id'], proof['evidence_token'])}") as resp:
        answer = AnswerFile.model_validate_json(await resp.read())
    req = sidecar.client_request("chat", dict(body), {})
    start = time.perf_counter()
    parsed = parse_response("chat", data)
    received = parsed.model_dump(mode="json")
    report = bind_answers(req.asked, received, {answer.receipt.receipt_id: answer}, req.tokenizer, model_id=req.model.model_id)
    bound = time.perf_counter()
    checked_rebuild(req, parsed, received, [answer])
    done = time.perf_counter()
    assert report.ok, report.summary()
    return {"bind_s": bound - start, "rebuild_s": done - bound, "tokens": len(answer.evidence.output_ids)}


def summarise(rows: list[dict]) -> dict:
    node = statistics.median(r["node_s"] for r in rows)
    through = statistics.median(r["sidecar_s"] for r in rows)
    bind = statistics.median(r["bind_s"] for r in rows)
    rebuild = statistics.median(r["rebuild_s"] for r in rows)
    out = {"answers": len(rows), "mean_tokens": statistics.mean(r["tokens"] for r in rows), "node_ms": 1000 * node,
           "through_sidecar_ms": 1000 * through, "bind_ms": 1000 * bind, "rebuild_ms": 1000 * rebuild,
           "work_share": (bind + rebuild) / node, "hop_share": through / node - 1, "rows": rows}
    print(f"\nsidecar work per answer, batch 1 ({out['answers']} chat answers, {out['mean_tokens']:.0f} tokens on average; medians)")
    print(f"{'node answer':<34}{out['node_ms']:>10.1f} ms")
    print(f"{'through the sidecar':<34}{out['through_sidecar_ms']:>10.1f} ms  ({out['hop_share']:+.1%}: the hop, "
          "evidence fetch included)")
    print(f"{'parse + bind':<34}{out['bind_ms']:>10.2f} ms")
    print(f"{'rebuild + compare':<34}{out['rebuild_ms']:>10.2f} ms")
    print(f"binding and rebuilding: {out['work_share']:.2%} of the answer's generation (target <= 1 %)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--answers", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    configure_threads(None)  # as the CLI does for every command that runs TVM: a pool on every core
    keep_freed_memory()
    with tempfile.TemporaryDirectory() as workdir:
        report = asyncio.run(run(args.answers, args.tokens, Path(workdir)))
    write_json(RESULTS / "relay.json", report)


if __name__ == "__main__":
    main()

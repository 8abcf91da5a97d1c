"""A corpus of 1,000+ malformed or hostile HTTP requests against a real node and a real sidecar
in front of it (the tiny model): invalid JSON and UTF-8, wrong types, NaN and huge numbers, deep
nesting, enormous prompts, header abuse, unknown routes and methods. Every answer must be a 4xx
(or a 200 where the request happens to be valid), OpenAI-shaped, and never a 5xx; both servers
keep serving afterwards. The corpus is generated from a fixed seed, so a failure reproduces."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import httpx
import pytest

from node.api.app import make_app
from node.runtime.loading import load_model
from node.runtime.model_runtime import CacheLimits
from node.sidecar.app import Sidecar, make_sidecar_app
from tests.models_fixtures import make_tiny_hf_checkpoint
from tests.node.api.http_fixtures import serving
from verify.evidence_store import EvidenceStore
from verify.identity import NodeKey
from verify.ledger import Ledger

LIMITS = CacheLimits(max_batch_size=8, max_total_tokens=2048, prefill_chunk=64)
PATHS = ("/v1/completions", "/v1/chat/completions")
FIELDS = ("model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "stream",
          "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "max_completion_tokens", "stream_options")
ODD_VALUES = [None, True, -1, 0, 2**64, -(2**70), 10**400, 1e308, -1e308, "NaN", "", "x" * 5000, [], {}, [[]], [1, "a"],
              {"a": 1}, 0.5, 3.0, "0", [None], ["\udc80"], "\u0000", [1] * 3000, {"role": "user"}]


def _corpus(rng: random.Random) -> list[tuple[str, str, dict, bytes]]:
    """(method, path, headers, body) cases."""
    base = {"model": "tiny", "max_tokens": 2, "temperature": 0}
    cases = []
    for _ in range(420):  # one field of a nearly valid request replaced by an odd value
        body = {**base, rng.choice(["prompt", "messages"]): rng.choice(["hi", [{"role": "user", "content": "hi"}]])}
        body[rng.choice(FIELDS)] = rng.choice(ODD_VALUES)
        raw = json.dumps(body).replace('"NaN"', rng.choice(["NaN", "Infinity", "-Infinity", '"NaN"']))
        cases.append(("POST", rng.choice(PATHS), {"Content-Type": "application/json"}, raw.encode("utf-8", "surrogatepass")))
    for _ in range(200):  # bytes that are not JSON, or not UTF-8, or cut short
        good = json.dumps({**base, "prompt": "hello there"}).encode()
        raw = rng.choice([bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200))), good[: rng.randrange(len(good))],
                          b"\xff\xfe" + good, good.replace(b"hello", b"\xc3\x28"), b"", b"null", b"[]", b"1e999",
                          b'"just a string"'])
        cases.append(("POST", rng.choice(PATHS), {"Content-Type": rng.choice(["application/json", "text/plain", "x/y"])}, raw))
    for depth in (10, 100, 1000, 10_000, 100_000):  # deep nesting
        for opener, closer in (("[", "]"), ('{"a":', "}")):
            nested = (opener * depth + "1" + closer * depth).encode()
            cases.append(("POST", PATHS[depth % 2], {"Content-Type": "application/json"}, nested))
            cases.append(("POST", PATHS[depth % 2], {"Content-Type": "application/json"},
                          json.dumps({**base, "prompt": "hi"})[:-1].encode() + b',"extra":' + nested + b"}"))
    for size in (10_000, 200_000, 1_100_000):  # enormous prompts: past the context (400) or past the body cap (413)
        cases.append(("POST", PATHS[0], {"Content-Type": "application/json"}, json.dumps({**base, "prompt": "word " * (size // 5)}).encode()))
        cases.append(("POST", PATHS[1], {"Content-Type": "application/json"},
                      json.dumps({**base, "messages": [{"role": "user", "content": "w " * (size // 2)}]}).encode()))
        cases.append(("POST", PATHS[0], {"Content-Type": "application/json"}, json.dumps({**base, "prompt": [7] * (size // 4)}).encode()))
    for _ in range(150):  # header abuse
        headers = rng.choice([{"Authorization": "Bearer " + "k" * 10_000}, {"X-Long": "v" * 20_000},
                              {f"X-H{i}": "v" for i in range(200)}, {"Content-Encoding": "gzip"},
                              {"Authorization": b"Basic \xc3\x28\xff"},
                              {"Content-Type": "application/json; charset=utf-16"}, {"Transfer-Encoding": "chunked"},
                              {"Accept": "*/*" * 100}])
        cases.append(("POST", rng.choice(PATHS), headers, json.dumps({**base, "prompt": "hi"}).encode()))
    for _ in range(120):  # routes and methods nobody serves, receipt ids of every shape
        path = rng.choice(["/v1/receipts/" + rng.choice(["", "x", "0" * 32, "../../etc/passwd", "%00", "a" * 5000, "é"]),
                           "/v1/nothing", "/", "/v1", "/v1/models/x", "/health/x", "/v1/audits/" + "z" * 10])
        cases.append((rng.choice(["GET", "DELETE", "PUT", "PATCH", "OPTIONS"]), path, {}, b""))
    for _ in range(120):  # valid shapes with values at the edges of their ranges
        body = {**base, "prompt": rng.choice(["", " ", "\n" * 50, "<|im_start|>", "\u2028", "🙂" * 10]),
                "max_tokens": rng.choice([1, 2, 3]), "temperature": rng.choice([0, 1e-4, 2.0]),
                "top_p": rng.choice([1e-9, 1.0]), "n": rng.choice([1, 16, 17]), "stop": rng.choice([None, ["a"] * 4, ["a"] * 5])}
        cases.append(("POST", PATHS[0], {"Content-Type": "application/json"}, json.dumps(body).encode()))
    return cases


@pytest.fixture(scope="module")
def servers(tmp_path_factory, store):
    folder = make_tiny_hf_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny")
    served, auditor = (load_model(str(folder), device="cpu", limits=LIMITS, root=store) for _ in range(2))
    evidence = EvidenceStore(tmp_path_factory.mktemp("fuzz_store") / "evidence.sqlite")
    with serving(make_app([served], NodeKey.generate(), evidence)) as node_url:
        sidecar = Sidecar([node_url], Ledger(tmp_path_factory.mktemp("fuzz_ledger") / "ledger.sqlite"), NodeKey.generate(),
                          {auditor.model_id: auditor}, audit_rate=0.0)
        with serving(make_sidecar_app(sidecar)) as sidecar_url:
            yield SimpleNamespace(node=node_url, sidecar=sidecar_url)
    evidence.close()


@pytest.mark.parametrize("target", ["node", "sidecar"])
def test_a_hostile_corpus_gets_no_5xx(servers, target):
    url = getattr(servers, target)
    cases = _corpus(random.Random(2026))
    assert len(cases) >= 1000
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=url, timeout=60) as client:
        for method, path, headers, body in cases:
            try:
                response = client.request(method, path, headers=headers, content=body or None)
            except (httpx.RemoteProtocolError, httpx.ReadError):  # the server refused and closed (a body past its cap
                # still being sent, a request it would not parse): no 5xx, and it keeps serving (checked below)
                statuses[0] = statuses.get(0, 0) + 1
                continue
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (method, path, headers, body[:300], response.text[:500])
            if response.status_code >= 400:
                if response.headers.get("Content-Type", "").startswith("application/json"):
                    error = response.json()["error"]  # OpenAI-shaped, never a traceback
                    assert error["message"] and error["type"] and "Traceback" not in error["message"]
                else:  # refused by the HTTP parser itself, before any handler (oversized headers)
                    assert response.status_code in (400, 431), (path, headers, response.text[:200])
        ok = client.post("/v1/completions", json={"model": "tiny", "prompt": "still there?", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    assert sum(statuses.values()) == len(cases) and statuses.get(200, 0) > 0

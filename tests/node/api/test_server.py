"""The OpenAI-style HTTP API on a tiny compiled model, driven by the official ``openai`` client
(sync and async, chat and completions, streamed and not) against a real server on 127.0.0.1:
receipts verify, answer files pass the verifier, seeds reproduce, errors are OpenAI-shaped,
fuzzed bodies never get a 5xx (nor a server error inside a stream), and 16 concurrent clients
get what each gets alone."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from node.runtime.engine import Engine, GenerationRequest
from node.runtime.loading import load_model
from node.runtime.model_runtime import CacheLimits
from node.api.app import make_app
from node.api.evidence_tokens import receipt_path
from tests.models_fixtures import make_tiny_hf_checkpoint
from tests.node.api.http_fixtures import serving
from verify.evidence import AnswerFile
from verify.evidence_store import EvidenceStore
from verify.identity import NodeKey
from verify.receipts import Receipt, verify_receipt
from verify.sampling import SamplingParams
from verify.verifier import verify_answer

LIMITS = CacheLimits(max_batch_size=16, max_total_tokens=4096, prefill_chunk=64)
API_KEY = "sk-proofmesh-test"
OPERATOR_KEY = "sk-proofmesh-operator"
MODEL = "tiny"
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("server") / MODEL)


@pytest.fixture(scope="module")
def verifier(tiny_folder, store):
    """A second runtime of the same model: the verifier's, and the engine called directly
    (the served one belongs to the server's engine and is not thread-safe)."""
    return load_model(str(tiny_folder), device="cpu", limits=LIMITS, root=store)


@pytest.fixture(scope="module")
def node(tiny_folder, store, tmp_path_factory):
    model = load_model(str(tiny_folder), device="cpu", limits=LIMITS, root=store)
    key = NodeKey.generate()
    evidence = EvidenceStore(tmp_path_factory.mktemp("evidence") / "evidence.sqlite")
    try:
        with serving(make_app([model], key, evidence, api_keys=[API_KEY], operator_keys=[OPERATOR_KEY])) as url:
            yield SimpleNamespace(url=url, key=key, evidence=evidence, model=model)
    finally:
        evidence.close()


@pytest.fixture(scope="module")
def client(node):
    with openai.OpenAI(base_url=f"{node.url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def http(node):
    with httpx.Client(base_url=node.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


def proof_of(obj) -> dict:
    """The ``proofmesh`` object of a response, chunk or choice (an extra field for the client)."""
    return obj.model_extra["proofmesh"]


def check_receipt(node, proof: dict, *, text_tokens: int | None = None) -> Receipt:
    receipt = Receipt.model_validate(proof["receipt"])
    assert proof["public_key"] == node.key.public_key.hex() and proof["backend"] == node.model.backend
    assert verify_receipt(receipt, proof["signature"], bytes.fromhex(proof["public_key"]))
    assert receipt.model_id == node.model.model_id and receipt.node_id == node.key.node_id
    if text_tokens is not None:
        assert receipt.n_output_tokens == text_tokens
    return receipt


def fetch_answer(http, proof: dict) -> AnswerFile:
    """The answer file of a ``proofmesh`` object, opened with its evidence token."""
    response = http.get(receipt_path(proof["receipt"]["receipt_id"], proof["evidence_token"]))
    assert response.status_code == 200, response.text
    return AnswerFile.model_validate_json(response.content)


def stream_text(chunks, kind: str) -> tuple[str, list]:
    """Concatenated text of a single-choice stream, and the chunks."""
    chunks = list(chunks)
    if kind == "chat":
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


# ---------------------------------------------------------------------- happy paths


def test_models_health_and_metrics(client, http, node):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["model_id"] == node.model.model_id
    assert models[0].model_extra["format"] == node.model.manifest.weight_dtype == "safetensors:f32"  # what the folder stores
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["node_id"] == node.key.node_id
    assert health["models"][0]["model_id"] == node.model.model_id and health["models"][0]["backend"] == node.model.backend
    def samples() -> dict[str, float]:  # /metrics is open without a key, like /health
        lines = httpx.get(f"{node.url}/metrics").text.splitlines()
        return {k: float(v) for k, _, v in (line.rpartition(" ") for line in lines if line and not line.startswith("#"))}

    before = samples()
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0.0)
    after = samples()
    # Differences, so the test holds whatever ran before it on this node.
    for name, grew_by in (('proofmesh_requests_total{route="/v1/completions",status="200"}', 1),
                          (f'proofmesh_completion_tokens_total{{model="{MODEL}"}}', 2),
                          (f'proofmesh_receipts_signed_total{{model="{MODEL}"}}', 1),
                          (f'proofmesh_time_to_first_token_seconds_count{{model="{MODEL}"}}', 1),
                          ('proofmesh_request_latency_seconds_count{route="/v1/completions"}', 1),
                          ("proofmesh_evidence_answers", 1)):
        assert after[name] - before.get(name, 0.0) == grew_by, name
    assert after[f'proofmesh_queue_depth{{model="{MODEL}"}}'] == after[f'proofmesh_running_sequences{{model="{MODEL}"}}'] == 0


def test_status_page_is_open_but_lists_receipts_only_to_the_operator(client, http, node):
    """GET / follows /health (open), what it shows from /v1 routes follows theirs (the key), and
    the receipts signed, like the answer files, are the operator's: a key shared by many clients
    opens neither another's receipt ids nor, knowing one, its answer file."""
    proof = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).model_extra["proofmesh"]
    receipt_id = proof["receipt"]["receipt_id"]
    public = httpx.get(f"{node.url}/")
    assert public.status_code == 200 and public.headers["Content-Type"].startswith("text/html")
    assert node.key.node_id in public.text and "needs the API key" in public.text and receipt_id not in public.text
    keyed = http.get("/").text
    assert "for the operator only" in keyed and receipt_id not in keyed
    assert_openai_error(http.get(f"/v1/receipts/{receipt_id}"), 404, code="receipt_not_found")
    operator = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    assert f'href="{receipt_path(receipt_id, proof["evidence_token"])[1:]}"' in httpx.get(f"{node.url}/", headers=operator).text
    assert httpx.get(f"{node.url}/v1/receipts/{receipt_id}", headers=operator).status_code == 200


def test_chat_answer_carries_a_receipt_that_verifies(client, http, node, verifier):
    out = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, seed=7, temperature=0.8)
    choice = out.choices[0]
    assert out.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    receipt = check_receipt(node, proof_of(out), text_tokens=out.usage.completion_tokens)
    assert proof_of(choice) == proof_of(out)
    assert receipt.seed == 7 and receipt.finish_reason == choice.finish_reason
    assert out.usage.prompt_tokens == receipt.n_prompt_tokens
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    answer = fetch_answer(http, proof_of(out))
    assert answer.receipt == receipt and answer.evidence.sampling.seed == 7
    assert node.model.tokenizer.decode(answer.evidence.output_ids) == choice.message.content
    assert verify_answer(answer, verifier).verdict == "pass"


def test_completion_answer_file_passes_proofmesh_verify(client, http, tiny_folder, store, tmp_path):
    out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0.0)
    assert out.object == "text_completion" and out.usage.completion_tokens == 8
    path = tmp_path / "answer.json"
    proof = proof_of(out)
    path.write_bytes(http.get(receipt_path(proof["receipt"]["receipt_id"], proof["evidence_token"])).content)
    env = {**os.environ, "PROOFMESH_HOME": str(store)}
    checked = subprocess.run([sys.executable, "-m", "node.cli", "verify", str(path), "--model", str(tiny_folder),
                              "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["verdict"] == "pass"


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_same_seed_same_text_and_stream_equals_non_stream(client, node, kind):
    def ask(**kw):
        if kind == "chat":
            return client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, seed=11, temperature=0.9, **kw)
        return client.completions.create(model=MODEL, prompt="Hello", max_tokens=16, seed=11, temperature=0.9, **kw)

    def text(out):
        return out.choices[0].message.content if kind == "chat" else out.choices[0].text

    first, second = ask(), ask()
    assert text(first) == text(second)
    streamed, chunks = stream_text(ask(stream=True, stream_options={"include_usage": True}), kind)
    assert streamed == text(first)

    receipts = [check_receipt(node, proof_of(o)) for o in (first, second)]
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == first.choices[0].finish_reason
    streamed_receipt = check_receipt(node, proof_of(final[0]))
    assert all(c.model_extra.get("proofmesh") is None for c in chunks if c is not final[0])
    # same request, same tokens; every answer its own receipt
    assert len({(r.request_hash, r.output_hash) for r in receipts + [streamed_receipt]}) == 1
    assert len({r.receipt_id for r in receipts + [streamed_receipt]}) == 3
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == first.usage.completion_tokens
    if kind == "chat":
        assert chunks[0].choices[0].delta.role == "assistant"


def test_async_client_chat_and_completions_streamed_and_not(node, verifier, http):
    async def go():
        async with openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key=API_KEY, max_retries=0) as aclient:
            chat = await aclient.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10)
            comp = await aclient.completions.create(model=MODEL, prompt="Paris is", max_tokens=10)
            chat_chunks = [c async for c in await aclient.chat.completions.create(
                model=MODEL, messages=HELLO, max_tokens=10, stream=True)]
            comp_chunks = [c async for c in await aclient.completions.create(
                model=MODEL, prompt="Paris is", max_tokens=10, stream=True)]
            return chat, comp, chat_chunks, comp_chunks

    chat, comp, chat_chunks, comp_chunks = asyncio.run(go())
    proofs = [proof_of(chat), proof_of(comp)] + [proof_of(c) for c in chat_chunks + comp_chunks if c.choices[0].finish_reason]
    assert len(proofs) == 4
    for proof in proofs:
        receipt = check_receipt(node, proof)
        assert 0 <= receipt.seed < 2**64  # drawn by the node and committed
        assert verify_answer(fetch_answer(http, proof), verifier).verdict == "pass"
    assert chat_chunks[-1].choices[0].finish_reason is not None and comp_chunks[-1].choices[0].finish_reason is not None


def test_greedy_logprobs_agree_with_the_engine_called_directly(client, verifier):
    out = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=0.0,
                                         logprobs=True, top_logprobs=3)
    comp = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=10, temperature=0.0, logprobs=3)

    def direct(prompt_ids):
        async def go():
            async with Engine(verifier.runtime, verifier.tokenizer, verifier.model_id, max_context=verifier.max_context) as engine:
                return await engine.complete(GenerationRequest(tuple(prompt_ids), SamplingParams(temperature=0.0, max_tokens=10, seed=0)))
        return asyncio.run(go())

    chat_ref = direct(verifier.tokenizer.encode_chat(HELLO))
    content = out.choices[0].logprobs.content
    assert out.choices[0].message.content == chat_ref.text and len(content) == len(chat_ref.logprobs)
    for entry, logprob, fingerprint in zip(content, chat_ref.logprobs, chat_ref.fingerprints):
        ids = fingerprint.ids
        assert math.isclose(entry.logprob, logprob, abs_tol=1e-6)
        assert len(entry.top_logprobs) == 3
        assert [t.token for t in entry.top_logprobs] == [verifier.tokenizer.decode([i], skip_special_tokens=False) for i in ids[:3]]
        assert entry.top_logprobs[0].logprob == pytest.approx(logprob, abs=1e-6)  # greedy: the best token
        assert all(a.logprob >= b.logprob for a, b in zip(entry.top_logprobs, entry.top_logprobs[1:]))

    comp_ref = direct(verifier.tokenizer.encode_prompt("Hello there"))
    lp = comp.choices[0].logprobs
    assert comp.choices[0].text == comp_ref.text
    assert lp.token_logprobs == pytest.approx(comp_ref.logprobs, abs=1e-6)
    assert all(1 <= len(top) <= 3 and max(top.values()) == pytest.approx(v, abs=1e-6)
               for top, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_n_choices_each_have_their_own_receipt(client, node):
    out = client.completions.create(model=MODEL, prompt=["Hello", "Paris"], n=2, max_tokens=6, seed=100, temperature=1.0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    receipts = [check_receipt(node, proof_of(c)) for c in out.choices]
    assert [r.seed for r in receipts] == [100, 101, 100, 101]  # choice j of each prompt: seed + j
    assert len({r.receipt_id for r in receipts}) == 4
    assert proof_of(out) == proof_of(out.choices[0])
    alone = client.completions.create(model=MODEL, prompt="Paris", max_tokens=6, seed=101, temperature=1.0)
    assert alone.choices[0].text == out.choices[3].text


def test_sixteen_concurrent_clients_get_what_each_gets_alone(node):
    prompts = [f"Hello {i}" for i in range(16)]

    async def ask(aclient, i):
        out = await aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompts[i]}],
                                                    max_tokens=16, seed=i, temperature=0.9)
        return out.choices[0].message.content

    async def go():
        async with openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key=API_KEY, max_retries=0, timeout=120) as aclient:
            together = await asyncio.gather(*(ask(aclient, i) for i in range(16)))
            alone = [await ask(aclient, i) for i in range(16)]
            return together, alone

    together, alone = asyncio.run(go())
    assert together == alone
    assert len(set(together)) > 1


def test_unknown_fields_are_ignored_and_stop_strings_cut(http):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 12, "seed": 3, "temperature": 0.0, "some_extension": {"x": [1]}}
    full = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert len(full) > 2
    stop = full[len(full) // 2:len(full) // 2 + 1]
    cut = http.post("/v1/completions", json={**body, "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"


def test_client_that_disconnects_mid_stream_frees_its_slots(node, http):
    before = node.evidence.stats()[0]
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 200, "n": 8, "stream": True, "temperature": 1.0}
    with httpx.Client(base_url=node.url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        with c.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # one chunk, then hang up
    deadline = time.monotonic() + 5
    while http.get("/health").json()["models"][0]["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert http.get("/health").json()["models"][0]["running"] == 0
    assert node.evidence.stats()[0] - before < 8  # cancelled answers are never signed


# ---------------------------------------------------------------------- errors


def post(node, path: str, body, *, key: str | None = API_KEY, raw: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(node.url + path, content=raw, headers=headers, timeout=60)
    return httpx.post(node.url + path, json=body, headers=headers, timeout=60)


def assert_openai_error(response: httpx.Response, status: int, *, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in response.text
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


CHAT = {"model": MODEL, "messages": HELLO, "max_tokens": 4}


@pytest.mark.parametrize("path, body, param, code", [
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, "temperature", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "temperature": 2.5}, "temperature", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "temperature": 1e-300}, "temperature", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, "messages", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages", None),
    ("/v1/chat/completions", {**CHAT, "n": "2"}, "n", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "stream": "yes"}, "stream", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, None, None),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, None, None),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, "model", "model_not_found"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 10**6}, None, "context_length_exceeded"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hello " * 400}]}, None, "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": [5, 10**6], "max_tokens": 2}, None, None),
    ("/v1/completions", {"model": MODEL, "prompt": [], "max_tokens": 2}, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, None, None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 20}, "logprobs", "invalid_value"),
    ("/v1/completions", {"prompt": "hi"}, "model", "invalid_value"),
])
def test_bad_requests_get_400(node, path, body, param, code):
    error = assert_openai_error(post(node, path, body), 400, param=param, code=code)
    assert error["type"] == "invalid_request_error"


def test_error_statuses(node, verifier, tmp_path):
    assert_openai_error(post(node, "/v1/completions", None, raw=b"{not json"), 400, code="invalid_json")
    assert_openai_error(post(node, "/v1/completions", [1, 2]), 400, code="invalid_json")
    assert_openai_error(post(node, "/v1/chat/completions", CHAT, key=None), 401, code="invalid_api_key")
    assert_openai_error(post(node, "/v1/chat/completions", CHAT, key="sk-wrong"), 401, code="invalid_api_key")
    assert_openai_error(httpx.get(f"{node.url}/v1/models"), 401)
    assert_openai_error(post(node, "/v1/nothing", CHAT), 404)
    assert_openai_error(httpx.get(f"{node.url}/v1/receipts/{'0' * 32}", headers={"Authorization": f"Bearer {API_KEY}"}),
                        404, code="receipt_not_found")
    assert_openai_error(httpx.get(f"{node.url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"}), 405)
    too_big = {**CHAT, "messages": [{"role": "user", "content": "x" * (1 << 20)}]}
    assert_openai_error(post(node, "/v1/chat/completions", too_big), 413)

    # A full queue: 429 with Retry-After (a node whose queue holds nothing, on its own runtime).
    evidence = EvidenceStore(tmp_path / "evidence.sqlite")
    try:
        with serving(make_app([verifier], NodeKey.generate(), evidence, max_queue=0)) as url:
            busy = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60)
            assert_openai_error(busy, 429, code="server_busy")
            assert busy.headers["Retry-After"] == "1"
            streamed = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=60)
            assert_openai_error(streamed, 429)  # before any byte of the stream
    finally:
        evidence.close()


def test_a_base_model_serves_completions_and_refuses_chat(tiny_folder, store, tmp_path):
    """A model without a chat template (a base model, as Gemma 3 270M is) answers raw completions,
    and a chat request, streamed or not, gets a 400 naming the missing template instead of a
    rendering the model never learnt. Same shape as the module's model: its library is reused."""
    base = shutil.copytree(tiny_folder, tmp_path / "base")
    tok_cfg = json.loads((base / "tokenizer_config.json").read_text())
    del tok_cfg["chat_template"]
    (base / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    model = load_model(str(base), device="cpu", limits=LIMITS, root=store)
    assert model.tokenizer.chat_template is None
    evidence = EvidenceStore(tmp_path / "evidence.sqlite")
    try:
        with serving(make_app([model], NodeKey.generate(), evidence)) as url:
            done = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": "Hello", "max_tokens": 3}, timeout=60)
            assert done.status_code == 200, done.text
            assert done.json()["usage"]["completion_tokens"] == 3
            for stream in (False, True):
                chat = {"model": "base", "messages": HELLO, "max_tokens": 3, "stream": stream}
                error = assert_openai_error(httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60), 400,
                                            param="model", code="no_chat_template")
                assert "no chat template" in error["message"] and error["type"] == "invalid_request_error"
    finally:
        evidence.close()


def test_openai_client_raises_its_own_error_classes(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10**6)
    assert bad.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.get("/receipts/" + "f" * 32, cast_to=object)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="sk-wrong", max_retries=0).models.list()


# ---------------------------------------------------------------------- fuzz

JSON_LEAVES = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=8)
# Values a client could well send (mostly valid, some edge cases the node must refuse politely).
PLAUSIBLE = {
    "prompt": st.text(max_size=24) | st.lists(st.integers(0, 400), min_size=1, max_size=6) | st.lists(st.text(max_size=5), min_size=1, max_size=3),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer"]),
                                                "content": st.text(max_size=24) | st.just([{"type": "text", "text": "hi"}])}),
                         min_size=1, max_size=3),
    "max_tokens": st.integers(1, 6),
    "max_completion_tokens": st.integers(1, 6),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 50),
    "seed": st.integers(0, 2**64 - 1),
    "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=4),
    "n": st.integers(1, 3),
    "logprobs": st.booleans() | st.integers(0, 8),
    "top_logprobs": st.integers(0, 8),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "user": st.text(max_size=5),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}


@st.composite
def request_bodies(draw, path: str) -> dict:
    """A valid base request, plausible optional fields, then up to two fields set to any JSON
    value (known or unknown names) and maybe one required field dropped."""
    body = {"model": MODEL, "max_tokens": 4}
    body.update({"prompt": "Hello"} if path == "/v1/completions" else {"messages": HELLO})
    body.update(draw(st.fixed_dictionaries({}, optional=PLAUSIBLE)))
    body.update(draw(st.dictionaries(st.sampled_from([*PLAUSIBLE, "model", "x-extension", "echo", "tools"]), JSON_VALUES, max_size=2)))
    for name in draw(st.sets(st.sampled_from(["model", "prompt", "messages"]), max_size=1)):
        body.pop(name, None)
    return body


def stream_errors(text: str) -> list[dict]:
    """The errors a streamed answer reported in-band (its headers were out: OpenAI's way), each
    ``data:`` line but ``[DONE]`` read as JSON."""
    events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    return [chunk["error"] for chunk in map(json.loads, events[:-1] if events[-1:] == ["[DONE]"] else events) if "error" in chunk]


@settings(max_examples=150, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzzed_bodies_never_get_a_5xx(node, data, path):
    body = data.draw(request_bodies(path))
    response = post(node, path, None, raw=json.dumps(body).encode())  # NaN/Infinity included: Python's json writes them
    event(f"status {response.status_code}")
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert_openai_error(response, response.status_code)
    elif body.get("stream") is True:
        assert response.text.rstrip().endswith("data: [DONE]")
        failed = [e for e in stream_errors(response.text) if e["type"] == "server_error"]
        assert not failed, failed  # a 5xx-class error sent in-band, after the 200
    else:
        assert response.json()["choices"]


@settings(max_examples=40, deadline=None, database=None, derandomize=True)
@given(raw=st.binary(max_size=64))
def test_fuzzed_raw_bytes_never_get_a_5xx(node, raw):
    response = post(node, "/v1/chat/completions", None, raw=raw)
    assert_openai_error(response, 400)


def test_server_still_answers_after_the_fuzz(client, http, node):
    """Hostile input of its own first, so it holds whatever ran before it: bytes that are no
    JSON, a body nested past the parser, wrong types, a stream of four choices abandoned after
    one chunk. Then the node answers, with nothing left running or queued."""
    for raw in (b"\xff\xfe{", b"[" * 100_000, json.dumps({**CHAT, "n": "many", "temperature": [None]}).encode()):
        assert_openai_error(post(node, "/v1/chat/completions", None, raw=raw), 400)
    with httpx.Client(base_url=node.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json={**CHAT, "max_tokens": 200, "n": 4, "stream": True}) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # one chunk, then hang up
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3).choices[0].finish_reason
    deadline = time.monotonic() + 5
    while (health := http.get("/health").json()["models"][0])["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert health["running"] == 0 and health["queue_depth"] == 0


# ---------------------------------------------------------------------- proofmesh run


def test_proofmesh_run_serves_and_stops_cleanly_on_sigterm_and_sigint(tiny_folder, store, tmp_path):
    env = {**os.environ, "PROOFMESH_HOME": str(store)}
    key = tmp_path / "node_key.pem"
    for sig in (signal.SIGTERM, signal.SIGINT):
        with socket.socket() as s:  # a free port for this run
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "node.cli", "run", "--model", str(tiny_folder), "--device", "cpu",
                                 "--port", str(port), "--key", str(key)], stderr=subprocess.PIPE, text=True, env=env)
        try:
            lines = []
            for line in proc.stderr:
                lines.append(line)
                if "serving" in line:
                    break
            assert f"http://127.0.0.1:{port}/v1" in lines[-1], "".join(lines)
            with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0) as c:
                # a stream in flight when the signal comes still ends with its receipt
                stream = c.completions.create(model=MODEL, prompt="Hello", max_tokens=40, stream=True)
                first = next(iter(stream))
                proc.send_signal(sig)
                rest = list(stream)
            assert first.choices and rest[-1].choices[0].finish_reason and proof_of(rest[-1])
            assert proc.wait(timeout=60) == 0
            tail = proc.stderr.read()
            assert "stopped" in tail and "Traceback" not in tail
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
    assert key.exists() and (store / "evidence.sqlite").exists()


def test_bench_http_runs_as_a_smoke_test(tiny_folder, store, tmp_path, monkeypatch):
    from bench.bench_http import main as bench_main

    monkeypatch.setenv("PROOFMESH_HOME", str(store))  # the child server finds the compiled tiny model here
    report = bench_main(["--model", str(tiny_folder), "--clients", "1", "2", "--tokens", "4", "--repeats", "1",
                         "--out", str(tmp_path / "http.json")])
    assert [r["clients"] for r in report["rows"]] == [1, 2]
    for row in report["rows"]:  # same seeds through both paths: the same tokens
        assert row["engine"]["tokens"] == row["http"]["tokens"] > 0
    assert json.loads((tmp_path / "http.json").read_text()) == report

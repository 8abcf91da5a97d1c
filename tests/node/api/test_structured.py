"""Structured output through the real server on the tiny model: ``response_format`` (JSON schema,
JSON mode, Lark), ``tools`` with every ``tool_choice`` through the official ``openai`` client,
streamed and not, and ``beta.chat.completions.parse``; every constrained answer passes the
verifier and the binding check, and a token outside the grammar, re-signed by the node's own key,
is fraud."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.node.verification.cheats import claim, real_fingerprints
from node.api.evidence_tokens import receipt_path
from tests.models_fixtures import make_tiny_hf_checkpoint
from tests.node.api.test_server import MODEL, client, fetch_answer, http, node, verifier  # noqa: F401
from verify.binding import asked_of, bind_answers
from verify.structured import request_grammar
from verify.evidence import AnswerFile
from verify.verifier import verify_answer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                       "required": ["city", "days"], "additionalProperties": False},
    },
}
NOOP = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Weather?"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny model with room for a tool prompt (its byte-level vocabulary spends ~500 tokens on two tools)."""
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("structured") / MODEL, context=1024)


def checked(node, http, verifier, body: dict, response: dict | list[dict]) -> list[AnswerFile]:
    """Every choice's answer file passes the verifier and binds to ``body`` and ``response``."""
    chunks = [response] if isinstance(response, dict) else response
    proofs = [c.get("proofmesh") or chunk.get("proofmesh") for chunk in chunks for c in chunk["choices"] if c.get("finish_reason")]
    answers = {p["receipt"]["receipt_id"]: fetch_answer(http, p) for p in proofs}
    for answer in answers.values():
        assert answer.evidence.sampling.grammar is not None or not (body.get("response_format") or body.get("tool_choice") == "required")
        verdict = verify_answer(answer, verifier)
        assert verdict.verdict == "pass", verdict.reasons
    asked = asked_of("chat" if "messages" in body else "completions", body, verifier.tokenizer, verifier.max_context)
    report = bind_answers(asked, response, answers, verifier.tokenizer)
    assert report.ok, report.summary()
    return list(answers.values())


@pytest.mark.parametrize("temperature", [0, 0.8, 1.5])
def test_json_schema_answers_parse_validate_verify_and_bind(node, http, verifier, temperature):
    body = {"model": MODEL, "messages": ASK, "temperature": temperature, "seed": 11, "max_tokens": 120, "n": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}
    response = http.post("/v1/chat/completions", json=body).json()
    for choice in response["choices"]:
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
    checked(node, http, verifier, body, response)


def test_a_lark_grammar_on_completions_streamed(node, http, verifier):
    body = {"model": MODEL, "prompt": "Say:", "max_tokens": 40, "seed": 2, "temperature": 1.0, "stream": True,
            "response_format": {"type": "grammar", "grammar": 'start: ("yes" | "no") "!"'}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) in ("yes!", "no!")
    checked(node, http, verifier, body, chunks)


def test_the_official_client_gets_forced_tool_calls_streamed_and_not(node, http, verifier, client):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        kwargs = dict(model=MODEL, messages=ASK, tools=[WEATHER, NOOP], tool_choice=choice, max_tokens=80, seed=5)
        done = client.chat.completions.create(**kwargs)
        message = done.choices[0].message
        assert done.choices[0].finish_reason == "tool_calls" and message.content is None and len(message.tool_calls) == 1
        call = message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        if isinstance(choice, dict) or call.function.name == "get_weather":
            assert call.function.name == "get_weather"
            jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        request = {**kwargs, "tools": [WEATHER, NOOP]}
        checked(node, http, verifier, request, done.model_dump(mode="json"))

        stream = list(client.chat.completions.create(**kwargs, stream=True))
        deltas = [c.choices[0].delta for c in stream if c.choices]
        streamed = [tc for d in deltas for tc in d.tool_calls or []]
        assert [(tc.function.name, tc.function.arguments) for tc in streamed] == [(call.function.name, call.function.arguments)]
        assert not "".join(d.content or "" for d in deltas)  # the call is never shown as text
        assert stream[-1].choices[0].finish_reason == "tool_calls"
        checked(node, http, verifier, {**request, "stream": True}, [c.model_dump(mode="json") for c in stream])


def test_tool_choice_auto_and_none_give_text_or_calls_that_bind(node, http, verifier, client):
    for choice in ("auto", "none"):
        kwargs = dict(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=choice, max_tokens=30, seed=9, temperature=0.9)
        done = client.chat.completions.create(**kwargs)
        first = done.choices[0]
        assert first.finish_reason in ("stop", "length", "tool_calls")
        assert (first.finish_reason == "tool_calls") == bool(first.message.tool_calls)
        checked(node, http, verifier, kwargs, done.model_dump(mode="json"))
    # an earlier call and its result render into the next prompt (the conversation goes on)
    follow = [*ASK, {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
              {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    kwargs = dict(model=MODEL, messages=follow, tools=[WEATHER], max_tokens=10, seed=1)
    checked(node, http, verifier, kwargs, client.chat.completions.create(**kwargs).model_dump(mode="json"))


class Person(BaseModel):
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=120)
    mood: Literal["happy", "sad"]


def test_beta_parse_with_a_pydantic_model(client):
    done = client.beta.chat.completions.parse(model=MODEL, messages=ASK, response_format=Person, max_tokens=80, seed=4)
    person = done.choices[0].message.parsed
    assert isinstance(person, Person) and person.mood in ("happy", "sad")


@pytest.mark.parametrize("extra, says", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}}, "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "made-up"}}}}, "made-up"),
    ({"response_format": {"type": "grammar", "grammar": "start: undefined_rule"}}, "undefined_rule"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name"),
])
def test_what_cannot_be_enforced_is_a_clear_400(http, extra, says):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 5, **extra})
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]["message"]


def test_a_token_outside_the_grammar_is_fraud_even_re_signed_by_the_node(node, http, verifier):
    body = {"model": MODEL, "messages": ASK, "seed": 3, "max_tokens": 120,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}
    honest = checked(node, http, verifier, body, http.post("/v1/chat/completions", json=body).json())[0]
    ev = honest.evidence
    state = verifier.grammar_vocabulary().state(ev.sampling.grammar)
    for token in ev.output_ids[:3]:
        state.advance(token)
    forbidden = int(next(i for i, ok in enumerate(state.allowed()) if not ok and i not in verifier.eos_token_ids))
    output = ev.output_ids[:3] + [forbidden] + ev.output_ids[4:]
    # The operator owns the node's key: the lie is signed, self-consistent, with real fingerprints.
    lie = claim(node.key, node.model, ev.prompt_ids, output, ev.sampling, real_fingerprints(verifier, ev.prompt_ids, output),
                finish_reason=honest.receipt.finish_reason)
    verdict = verify_answer(lie, verifier)
    assert verdict.verdict == "fraud" and any(f.position == 3 and f.check == "sampling" for f in verdict.failures)


def test_proofmesh_verify_passes_a_tool_call_and_catches_a_served_call_that_is_not_the_committed_one(node, http, tiny_folder, store, tmp_path):
    body = {"model": MODEL, "messages": ASK, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 80, "seed": 8}
    response = http.post("/v1/chat/completions", json=body).json()
    proof = response["choices"][0]["proofmesh"]
    (tmp_path / "answer.json").write_bytes(http.get(receipt_path(proof["receipt"]["receipt_id"], proof["evidence_token"])).content)
    (tmp_path / "request.json").write_text(json.dumps(body))
    env = {**os.environ, "PROOFMESH_HOME": str(store)}

    def verify(served: dict) -> subprocess.CompletedProcess:
        (tmp_path / "response.json").write_text(json.dumps(served))
        return subprocess.run([sys.executable, "-m", "node.cli", "verify", str(tmp_path / "answer.json"), "--model", str(tiny_folder),
                               "--device", "cpu", "--request", str(tmp_path / "request.json"), "--response", str(tmp_path / "response.json")],
                              capture_output=True, text=True, env=env, timeout=300)

    honest = verify(response)
    assert honest.returncode == 0, honest.stderr
    # an operator in front of the node swaps the city the model chose
    lied = json.loads(json.dumps(response))
    call = lied["choices"][0]["message"]["tool_calls"][0]["function"]
    arguments = json.loads(call["arguments"])
    arguments["city"] = "Oslo" if arguments["city"] == "Paris" else "Paris"
    call["arguments"] = json.dumps(arguments)
    caught = verify(lied)
    assert caught.returncode == 1 and "tool calls received" in caught.stderr


def test_an_answer_drawn_without_its_grammar_is_fraud_though_every_token_won_its_free_draw(node, http, verifier):
    """The operator skips the grammar (cheaper, or to steer the output) and signs the model's free
    greedy answer under the client's schema: every token is the model's own favourite, so only the
    verifier's rebuilt mask tells it from an honest constrained answer."""
    free = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "seed": 3, "max_tokens": 12, "temperature": 0}).json()
    honest = fetch_answer(http, free["choices"][0]["proofmesh"])
    assert verify_answer(honest, verifier).verdict == "pass"
    ev = honest.evidence
    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    constrained = ev.sampling.model_copy(update={"grammar": request_grammar({"response_format": schema})})
    lie = claim(node.key, node.model, ev.prompt_ids, ev.output_ids, constrained,
                real_fingerprints(verifier, ev.prompt_ids, ev.output_ids), finish_reason="length")
    verdict = verify_answer(lie, verifier)
    assert verdict.verdict == "fraud" and any(f.check == "sampling" for f in verdict.failures)

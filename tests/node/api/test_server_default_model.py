"""The product end to end over HTTP: the real default model behind the node, asked through the
official ``openai`` client, answers the France question, and its answer file passes the verifier.

Marked slow like tests/node/models/test_default_model.py (the model is pulled once and cached),
but part of the default suite: a few seconds once the model is cached.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from compiled_models.registry import DEFAULT_MODEL
from node.api.app import make_app
from node.api.evidence_tokens import receipt_path
from tests.node.api.http_fixtures import serving
from verify.evidence import AnswerFile
from verify.evidence_store import EvidenceStore
from verify.identity import NodeKey
from verify.receipts import Receipt, verify_receipt
from verify.verifier import verify_answer

pytestmark = pytest.mark.slow

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_default_model_answers_over_http_with_a_receipt_that_verifies(tmp_path, default_model):
    model = default_model
    key = NodeKey.generate()
    evidence = EvidenceStore(tmp_path / "evidence.sqlite")
    try:
        with serving(make_app([model], key, evidence)) as url:
            with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
                out = client.chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE, max_tokens=24, temperature=0.0)
                streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                    model=DEFAULT_MODEL, messages=FRANCE, max_tokens=24, temperature=0.0, stream=True))
            proof = out.model_extra["proofmesh"]
            answer = AnswerFile.model_validate_json(httpx.get(url + receipt_path(proof["receipt"]["receipt_id"], proof["evidence_token"])).content)
        # the server (and its engine) is gone: the same runtime can now re-check the answer
        text = out.choices[0].message.content
        assert "Paris" in text and streamed == text
        receipt = Receipt.model_validate(proof["receipt"])
        assert verify_receipt(receipt, proof["signature"], key.public_key) and receipt.model_id == model.model_id
        assert answer.receipt == receipt
        verdict = verify_answer(answer, model)
        assert verdict.verdict == "pass", verdict
    finally:
        evidence.close()


def test_default_model_answers_in_json_and_calls_a_tool_and_both_verify(tmp_path, default_model):
    """The real model under a grammar: a schema'd answer and a forced tool call, through the
    official client, each re-checked by the verifier (the mask rebuilt on the 49k vocabulary)."""
    from pydantic import BaseModel

    class Capital(BaseModel):
        country: str
        capital: str

    weather = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                              "required": ["city"], "additionalProperties": False}}}
    model = default_model
    evidence = EvidenceStore(tmp_path / "evidence.sqlite")
    try:
        with serving(make_app([model], NodeKey.generate(), evidence)) as url:
            with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
                parsed = client.beta.chat.completions.parse(model=DEFAULT_MODEL, messages=FRANCE, response_format=Capital,
                                                            max_tokens=60, temperature=0.0)
                called = client.chat.completions.create(
                    model=DEFAULT_MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                    tools=[weather], tool_choice="required", max_tokens=60, temperature=0.0)
            proofs = [r.model_extra["proofmesh"] for r in (parsed, called)]
            answers = [AnswerFile.model_validate_json(httpx.get(url + receipt_path(p["receipt"]["receipt_id"], p["evidence_token"])).content)
                       for p in proofs]
        assert "Paris" in parsed.choices[0].message.parsed.capital
        call = called.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather" and "Paris" in call.function.arguments
        for answer in answers:
            assert answer.evidence.sampling.grammar is not None
            assert verify_answer(answer, model).verdict == "pass"
    finally:
        evidence.close()

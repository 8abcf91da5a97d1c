"""verify.binding's rules, each broken once: a response rendered exactly as the node renders it
from a signed answer file binds; every single change a client would read makes it fail, with the
rule's own reason. No model runs: binding needs only the tokenizer (of the tiny checkpoint)."""

from __future__ import annotations

import copy

import pytest

from node.api.protocol import ChatCompletionRequest, ProofMeshInfo
from node.api.rendering import ChoiceEvent, TokenTexts, make_renderer
from node.models.tokenizer import TextTokenizer
from node.runtime.events import replay
from tests.models_fixtures import make_tiny_hf_checkpoint
from verify.binding import DEFAULT_CHAT_MAX_TOKENS, asked_of, bind_answers
from verify.evidence import FINGERPRINT_K, AnswerFile, Fingerprint, sign_answer
from verify.identity import NodeKey
from verify.sampling import SamplingParams

KEY = NodeKey.generate()
BACKEND = "test/fp32"
MODEL_ID = "ab" * 32
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Say hello"}], "temperature": 0.7, "seed": 9,
        "logprobs": True, "top_logprobs": 2, "n": 2}


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> TextTokenizer:
    return TextTokenizer.from_hf_folder(make_tiny_hf_checkpoint(tmp_path_factory.mktemp("binding") / "tiny"))


def signed(tok: TextTokenizer, body: dict, j: int, text: str) -> AnswerFile:
    """Choice ``j``'s honest answer: ``text`` then EOS, under the request's own parameters."""
    prompt = tok.encode_chat(body["messages"])
    output = tok.encode_prompt(text) + [tok.eos_token_ids[0]]
    params = SamplingParams(temperature=body["temperature"], max_tokens=min(DEFAULT_CHAT_MAX_TOKENS, 2048 - len(prompt)), seed=body["seed"] + j)
    fingerprints = [Fingerprint(ids=[t, *[(t + k) % 200 + 1 for k in range(1, FINGERPRINT_K)]],
                                logits=[5.0 - 0.5 * k for k in range(FINGERPRINT_K)], token_logit=5.0, log_normalizer=6.25)
                    for t in output]
    return sign_answer(KEY, model_id=MODEL_ID, backend=BACKEND, prompt_ids=prompt, output_ids=output, params=params,
                       fingerprints=fingerprints, finish_reason="stop", seed_source="client")


def rendered(tok: TextTokenizer, body: dict, answers: list[AnswerFile]) -> dict:
    """The response the node sends for these answers (its own renderer over the replayed events)."""
    renderer = make_renderer("tiny", BACKEND, TokenTexts(tok), ChatCompletionRequest.model_validate(body).to_asked(tok, 2048))
    choices = []
    for index, answer in enumerate(answers):
        events = replay(answer, tok)
        proof = ProofMeshInfo(receipt=answer.receipt, signature=answer.signature, public_key=answer.public_key,
                              backend=BACKEND, evidence_token="0" * 64)
        choices.append([ChoiceEvent(index, e, proof if t == len(events) - 1 else None) for t, e in enumerate(events)])
    prompt_tokens = len(answers[0].evidence.prompt_ids)
    return renderer.response(choices, prompt_tokens).model_dump(mode="json")


@pytest.fixture(scope="module")
def honest(tok):
    answers = [signed(tok, BODY, 0, "Hello there"), signed(tok, BODY, 1, "Hi")]
    return answers, rendered(tok, BODY, answers)


def problems(tok, answers, response, body=BODY) -> str:
    report = bind_answers(asked_of("chat", body, tok, 2048), response, {a.receipt.receipt_id: a for a in answers}, tok,
                          model_id=MODEL_ID)
    return report.summary()


def test_the_node_s_own_rendering_binds(tok, honest):
    answers, response = honest
    assert problems(tok, answers, response) == ""


def _content(r):
    return r["choices"][0]["message"]


BREAKS = {
    "the text received": lambda r: _content(r).update(content="Forged"),
    "finish_reason": lambda r: r["choices"][0].update(finish_reason="length"),
    "has index 1": lambda r: r["choices"].reverse(),
    "not asked for": lambda r: r["choices"].append({**copy.deepcopy(r["choices"][0]), "index": 2}),
    "usage": lambda r: r["usage"].update(completion_tokens=r["usage"]["completion_tokens"] * 50),
    "system_fingerprint": lambda r: r.update(system_fingerprint="tvm/cuda/fp16"),
    "logprob of token 0 is not the committed one": lambda r: r["choices"][0]["logprobs"]["content"][0].update(logprob=0.0),
    "bytes of token 0": lambda r: r["choices"][0]["logprobs"]["content"][0].update(bytes=[0]),
    "top logprobs of token 0": lambda r: r["choices"][0]["logprobs"]["content"][0]["top_logprobs"].reverse(),
    "logprobs for": lambda r: r["choices"][0]["logprobs"]["content"].pop(),
    "not the one named by the served receipt":
        lambda r: r["choices"][0]["proofmesh"].update(signature=r["choices"][1]["proofmesh"]["signature"]),
}


@pytest.mark.parametrize("reason", sorted(BREAKS))
def test_each_field_a_client_reads_is_bound(tok, honest, reason):
    answers, response = honest
    broken = copy.deepcopy(response)
    BREAKS[reason](broken)
    assert reason in problems(tok, answers, broken)


@pytest.mark.parametrize("change, reason", [
    ({"messages": [{"role": "user", "content": "Say goodbye"}]}, "prompt ids"),
    ({"temperature": 0.2}, "sampling parameters differ"),
    ({"seed": 10}, "sampling parameters differ"),
    ({"n": 1}, "not asked for"),
])
def test_an_answer_to_another_request_is_not_bound(tok, honest, change, reason):
    answers, response = honest
    assert reason in problems(tok, answers, response, {**BODY, **change})


def test_a_logprob_needs_the_committed_normaliser(tok, honest):
    """The absolute value, not only differences: a node that re-signs another normaliser is
    bound to it, and the one served must be that one (the verifier re-checks it against its own)."""
    answers, response = honest
    shifted = copy.deepcopy(response)
    for entry in shifted["choices"][0]["logprobs"]["content"]:  # every value moved alike: differences unchanged
        entry["logprob"] += 1.0
        for top in entry["top_logprobs"]:
            top["logprob"] += 1.0
    assert "is not the committed one" in problems(tok, answers, shifted)

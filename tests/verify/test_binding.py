"""verify.binding's rules, each broken once: a response rendered exactly as the node renders it
from a signed answer file binds; every single change a client would read, every answer signed
for something else and every request that asked for something else makes it fail, with the
rule's own reason. And the conversion (``asked_of``): the node's typed path and a client's JSON
body convert alike, by the documented rules.

No model runs: binding needs only the tokenizer (of the tiny checkpoint), and the expected
answers are built here from the rules as written (prompt, seed + j, default budget), never by
the conversion under test.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest

from node.api.protocol import ChatCompletionRequest, CompletionRequest, ProofMeshInfo
from node.api.rendering import ChoiceEvent, TokenTexts, make_renderer
from node.models.tokenizer import TextTokenizer
from node.runtime.events import replay
from tests.models_fixtures import make_tiny_hf_checkpoint
from verify.binding import DEFAULT_CHAT_MAX_TOKENS, DEFAULT_COMPLETION_MAX_TOKENS, Asked, asked_of, bind_answers
from verify.evidence import FINGERPRINT_K, AnswerFile, Fingerprint, sign_answer
from verify.grammar import GrammarError
from verify.identity import NodeKey
from verify.sampling import U64, SamplingParams

KEY = NodeKey.generate()
BACKEND = "test/fp32"
MODEL_ID = "ab" * 32
CONTEXT = 2048
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Say hello"}], "temperature": 0.7, "seed": 9,
        "logprobs": True, "top_logprobs": 2, "n": 2}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TOOL_BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER], "seed": 4}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
COMPLETION_BODY = {"model": "tiny", "prompt": "The capital of France", "seed": 5, "max_tokens": 12, "logprobs": 2}
REQUESTS = {"chat": ChatCompletionRequest, "completions": CompletionRequest}

Response = dict[str, Any] | list[dict[str, Any]]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> TextTokenizer:
    return TextTokenizer.from_hf_folder(make_tiny_hf_checkpoint(tmp_path_factory.mktemp("binding") / "tiny"))


def sign(output: list[int], prompt: list[int], params: SamplingParams, *, finish_reason: str = "stop",
         seed_source: str = "client", model_id: str = MODEL_ID) -> AnswerFile:
    """An answer file over these ids, with made-up fingerprints (binding reads their logprobs only)."""
    fingerprints = [Fingerprint(ids=[t, *[(t + k) % 200 + 1 for k in range(1, FINGERPRINT_K)]],
                                logits=[5.0 - 0.5 * k for k in range(FINGERPRINT_K)], token_logit=5.0, log_normalizer=6.25)
                    for t in output]
    return sign_answer(KEY, model_id=model_id, backend=BACKEND, prompt_ids=prompt, output_ids=output, params=params,
                       fingerprints=fingerprints, finish_reason=finish_reason, seed_source=seed_source)


def ended(tok: TextTokenizer, text: str) -> list[int]:
    """``text`` then end-of-sequence: an honest finish 'stop'."""
    return tok.encode_prompt(text) + [tok.eos_token_ids[0]]


def chat_budget(prompt: list[int]) -> int:
    return min(DEFAULT_CHAT_MAX_TOKENS, CONTEXT - len(prompt))


def signed(tok: TextTokenizer, body: dict, j: int, text: str, **kw) -> AnswerFile:
    """Choice ``j``'s honest answer to ``BODY``-like chat bodies: ``text`` then EOS, under the
    parameters the rules give (seed + j, the chat default budget)."""
    prompt = tok.encode_chat(body["messages"])
    params = SamplingParams(temperature=body["temperature"], max_tokens=chat_budget(prompt), seed=body["seed"] + j)
    return sign(ended(tok, text), prompt, params, **kw)


def rendered(tok: TextTokenizer, body: dict, answers: list[AnswerFile], endpoint: str = "chat", stream: bool = False) -> Response:
    """The response the node sends for these answers: its own conversion and renderer over the
    replayed events (a stream: every chunk, in order)."""
    asked = REQUESTS[endpoint].model_validate(body).to_asked(tok, CONTEXT)
    renderer = make_renderer("tiny", BACKEND, TokenTexts(tok), asked)
    choices = []
    for index, answer in enumerate(answers):
        events = replay(answer, tok)
        proof = ProofMeshInfo(receipt=answer.receipt, signature=answer.signature, public_key=answer.public_key,
                              backend=BACKEND, evidence_token="0" * 64)
        choices.append([ChoiceEvent(index, e, proof if t == len(events) - 1 else None) for t, e in enumerate(events)])
    if not stream:
        return renderer.response(choices, asked.prompt_tokens).model_dump(mode="json")
    chunks = [renderer.chunk(item) for items in choices for item in items]
    return [c.model_dump(mode="json") for c in chunks if c is not None]


def problems(tok, answers: list[AnswerFile], response: Response, body: dict = BODY, endpoint: str = "chat", *,
             max_context: int | None = CONTEXT, require_client_seed: bool = False) -> str:
    report = bind_answers(asked_of(endpoint, body, tok, max_context), response, {a.receipt.receipt_id: a for a in answers},
                          tok, model_id=MODEL_ID, require_client_seed=require_client_seed)
    return report.summary()


@pytest.fixture(scope="module")
def honest(tok):
    answers = [signed(tok, BODY, 0, "Hello there"), signed(tok, BODY, 1, "Hi")]
    return answers, rendered(tok, BODY, answers)


@pytest.fixture(scope="module")
def tool_call(tok):
    prompt = tok.encode_chat(TOOL_BODY["messages"], [WEATHER["function"]])
    answer = sign(ended(tok, CALL), prompt, SamplingParams(max_tokens=chat_budget(prompt), seed=4))
    return [answer], rendered(tok, TOOL_BODY, [answer])


@pytest.fixture(scope="module")
def completion(tok):
    answer = sign(ended(tok, " is Paris."), tok.encode_prompt(COMPLETION_BODY["prompt"]), SamplingParams(max_tokens=12, seed=5))
    return [answer], rendered(tok, COMPLETION_BODY, [answer], "completions")


# ---------------------------------------------------------------------- honest answers bind


def test_the_node_s_own_rendering_binds(tok, honest):
    answers, response = honest
    assert problems(tok, answers, response) == ""


@pytest.mark.parametrize("stream", [False, True])
def test_every_endpoint_s_rendering_binds(tok, honest, tool_call, completion, stream):
    cases = [(BODY, "chat", honest), (TOOL_BODY, "chat", tool_call), (COMPLETION_BODY, "completions", completion)]
    for body, endpoint, (answers, _) in cases:
        assert problems(tok, answers, rendered(tok, body, answers, endpoint, stream), body, endpoint) == ""
    assert tool_call[1]["choices"][0]["finish_reason"] == "tool_calls"  # the answer is served as the call it makes


# ---------------------------------------------------------------------- what the client read


def _message(r):
    return r["choices"][0]["message"]


def _proof(r, i=0):
    return r["choices"][i]["proofmesh"]


BREAKS: list[tuple[str, Callable[[dict], Any]]] = [
    ("the text received", lambda r: _message(r).update(content="Forged")),
    ("finish_reason", lambda r: r["choices"][0].update(finish_reason="length")),
    ("has index 1", lambda r: r["choices"].reverse()),
    ("not asked for", lambda r: r["choices"].append({**copy.deepcopy(r["choices"][0]), "index": 2})),
    ("choice 1: no answer", lambda r: r["choices"].pop()),
    ("no answer file for its receipt", lambda r: _proof(r)["receipt"].update(receipt_id="0" * 64)),
    ("usage", lambda r: r["usage"].update(completion_tokens=r["usage"]["completion_tokens"] * 50)),
    ("usage", lambda r: r["usage"].update(prompt_tokens=1)),
    ("system_fingerprint", lambda r: r.update(system_fingerprint="tvm/cuda/fp16")),
    ("logprob of token 0 is not the committed one", lambda r: r["choices"][0]["logprobs"]["content"][0].update(logprob=0.0)),
    ("bytes of token 0", lambda r: r["choices"][0]["logprobs"]["content"][0].update(bytes=[0])),
    ("top logprobs of token 0", lambda r: r["choices"][0]["logprobs"]["content"][0]["top_logprobs"].reverse()),
    ("top logprobs of token 0", lambda r: r["choices"][0]["logprobs"]["content"][0]["top_logprobs"].pop()),
    ("logprobs for", lambda r: r["choices"][0]["logprobs"]["content"].pop()),
    ("not the one named by the served receipt", lambda r: _proof(r).update(signature=_proof(r, 1)["signature"])),
    ("not the one named by the served receipt", lambda r: _proof(r).update(public_key="00" * 32)),
    ("not the one named by the served receipt", lambda r: _proof(r)["receipt"].update(finish_reason="length")),
]


@pytest.mark.parametrize("reason, change", BREAKS, ids=[f"{i}-{reason}" for i, (reason, _) in enumerate(BREAKS)])
def test_each_field_a_client_reads_is_bound(tok, honest, reason, change):
    answers, response = honest
    broken = copy.deepcopy(response)
    change(broken)
    assert reason in problems(tok, answers, broken)


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


def _call(r):
    return r["choices"][0]["message"]["tool_calls"][0]


TOOL_BREAKS: list[tuple[str, Callable[[dict], Any]]] = [
    ("the tool calls received", lambda r: _call(r)["function"].update(arguments='{"city": "Oslo"}')),
    ("the tool calls received", lambda r: _call(r).update(id="call_mine_0")),
    ("the tool calls received", lambda r: _call(r)["function"].update(name="get_time")),
    ("finish_reason 'stop' received, 'tool_calls' committed",  # the call served as text
     lambda r: r["choices"][0].update(finish_reason="stop", message={"role": "assistant", "content": CALL})),
]


@pytest.mark.parametrize("reason, change", TOOL_BREAKS, ids=[f"{i}" for i in range(len(TOOL_BREAKS))])
def test_a_tool_call_is_bound_as_the_call_the_text_makes(tok, tool_call, reason, change):
    answers, response = tool_call
    broken = copy.deepcopy(response)
    change(broken)
    assert reason in problems(tok, answers, broken, TOOL_BODY)


def _logprobs(r):
    return r["choices"][0]["logprobs"]


COMPLETION_BREAKS: list[tuple[str, Callable[[dict], Any]]] = [
    ("the text received", lambda r: r["choices"][0].update(text=" is Berlin.")),
    ("lists differ in length", lambda r: _logprobs(r)["tokens"].pop()),
    ("logprob of token 0 is not the committed one", lambda r: _logprobs(r)["token_logprobs"].__setitem__(0, -0.5)),
    ("logprob of token 1 is not the committed one", lambda r: _logprobs(r)["tokens"].__setitem__(1, "X")),
    ("top logprobs of token 0", lambda r: _logprobs(r)["top_logprobs"][0].popitem()),
]


@pytest.mark.parametrize("reason, change", COMPLETION_BREAKS, ids=[f"{i}" for i in range(len(COMPLETION_BREAKS))])
def test_a_completion_s_text_and_logprobs_are_bound(tok, completion, reason, change):
    answers, response = completion
    broken = copy.deepcopy(response)
    change(broken)
    assert reason in problems(tok, answers, broken, COMPLETION_BODY, "completions")


def test_a_stream_is_bound_as_its_chunks_join(tok, honest):
    answers, _ = honest
    chunks = rendered(tok, BODY, answers, stream=True)
    forged = copy.deepcopy(chunks)
    next(c for c in forged if c["choices"][0]["delta"].get("content"))["choices"][0]["delta"]["content"] = "Bye"
    assert "the text received" in problems(tok, answers, forged)
    unproven = copy.deepcopy(chunks)
    for chunk in unproven:
        chunk.pop("proofmesh", None)  # the finish chunks' receipts
    assert "no answer file for its receipt" in problems(tok, answers, unproven)


# ---------------------------------------------------------------------- what the node signed


def _tampered_evidence(tok, answer: AnswerFile) -> AnswerFile:
    evidence = answer.evidence.model_copy(update={"output_ids": ended(tok, "Bye")})
    return answer.model_copy(update={"evidence": evidence})


SIGNED: list[tuple[str, Callable[[TextTokenizer], AnswerFile]]] = [
    ("another model than the one asked for", lambda tok: signed(tok, BODY, 0, "Hello there", model_id="cd" * 32)),
    ("finish 'length' where a stop ends the answer", lambda tok: signed(tok, BODY, 0, "Hello there", finish_reason="length")),
    ("the receipt says the seed came from the node", lambda tok: signed(tok, BODY, 0, "Hello there", seed_source="node")),
    ("does not hash to the receipt's evidence_hash", lambda tok: _tampered_evidence(tok, signed(tok, BODY, 0, "Hello there"))),
    ("the receipt's signature does not verify",
     lambda tok: signed(tok, BODY, 0, "Hello there").model_copy(update={"public_key": NodeKey.generate().public_key.hex()})),
]


@pytest.mark.parametrize("reason, make", SIGNED, ids=[reason for reason, _ in SIGNED])
def test_an_answer_signed_for_something_else_is_not_bound(tok, honest, reason, make):
    """Choice 0's answer file is another one, served exactly as the node renders that file."""
    answers, _ = honest
    other = [make(tok), answers[1]]
    assert reason in problems(tok, other, rendered(tok, BODY, other))


def test_a_stop_token_before_the_end_had_to_end_the_answer(tok, honest):
    answers, _ = honest
    prompt = answers[0].evidence.prompt_ids
    early = sign(ended(tok, "Hi") + ended(tok, " there"), prompt, answers[0].evidence.sampling)
    assert "a stop token before the last position" in problems(tok, [early, answers[1]], rendered(tok, BODY, [early, answers[1]]))


def test_output_ids_that_are_not_the_text_served_are_not_bound(tok, honest):
    """The proof of an answer over other tokens, under text it does not decode to."""
    answers, response = honest
    shorter = signed(tok, BODY, 0, "Hello")
    swapped = copy.deepcopy(response)
    swapped["choices"][0]["proofmesh"] = rendered(tok, BODY, [shorter, answers[1]])["choices"][0]["proofmesh"]
    assert "the text received" in problems(tok, [shorter, answers[1]], swapped)


# ---------------------------------------------------------------------- what the request asked for


@pytest.mark.parametrize("change, reason", [
    ({"messages": [{"role": "user", "content": "Say goodbye"}]}, "prompt ids"),
    ({"temperature": 0.2}, "sampling parameters differ from the request's: temperature"),
    ({"seed": 10}, "sampling parameters differ from the request's: seed"),
    ({"top_p": 0.5}, "sampling parameters differ from the request's: top_p"),
    ({"top_k": 3}, "sampling parameters differ from the request's: top_k"),
    ({"presence_penalty": 0.5}, "sampling parameters differ from the request's: presence_penalty"),
    ({"frequency_penalty": 0.5}, "sampling parameters differ from the request's: frequency_penalty"),
    ({"stop": "zz"}, "sampling parameters differ from the request's: stop"),
    ({"response_format": {"type": "json_object"}}, "sampling parameters differ from the request's: grammar"),
    ({"max_tokens": 7}, "sampling parameters differ from the request's: max_tokens"),
    ({"max_tokens": None, "max_completion_tokens": 7}, "sampling parameters differ from the request's: max_tokens"),
    ({"seed": None}, "the receipt says the seed came from the client"),
    ({"n": 1}, "not asked for"),
    ({"n": 3}, "choice 2: no answer"),
])
def test_an_answer_to_another_request_is_not_bound(tok, honest, change, reason):
    answers, response = honest
    assert reason in problems(tok, answers, response, {**BODY, **change})


def test_max_completion_tokens_wins_over_max_tokens(tok, honest):
    answers, response = honest
    budget = answers[0].evidence.sampling.max_tokens
    assert problems(tok, answers, response, {**BODY, "max_tokens": 7, "max_completion_tokens": budget}) == ""


def test_a_node_seed_is_the_node_s_own_and_client_seeds_can_be_required(tok):
    body = {**BODY, "seed": None}
    prompt = tok.encode_chat(body["messages"])
    answers = [sign(ended(tok, text), prompt, SamplingParams(temperature=0.7, max_tokens=chat_budget(prompt), seed=seed),
                    seed_source="node") for text, seed in (("Hello there", 123), ("Hi", 2**63 + 5))]
    response = rendered(tok, body, answers)
    assert problems(tok, answers, response, body) == ""
    assert "the request set no seed and client seeds are required" in problems(tok, answers, response, body,
                                                                                 require_client_seed=True)


def test_without_the_context_the_default_budget_is_a_cap(tok, honest):
    """Not knowing the serving context, a client can only hold a chat's default budget to its
    cap: less binds, more does not; knowing it, only the default itself binds."""
    prompt = honest[0][0].evidence.prompt_ids

    def budgeted(max_tokens: int) -> tuple[list[AnswerFile], Response]:
        choices = [sign(ended(tok, "Hi"), prompt, SamplingParams(temperature=0.7, max_tokens=max_tokens, seed=9 + j))
                   for j in range(2)]
        return choices, rendered(tok, BODY, choices)

    for max_tokens, bound in ((100, True), (DEFAULT_CHAT_MAX_TOKENS, True), (DEFAULT_CHAT_MAX_TOKENS + 1, False)):
        found = problems(tok, *budgeted(max_tokens), max_context=None)
        assert (found == "") is bound, found
    assert "sampling parameters differ from the request's: max_tokens" in problems(tok, *budgeted(100))


# ---------------------------------------------------------------------- the conversion


@pytest.mark.parametrize("endpoint, body", [
    ("chat", BODY),
    ("chat", TOOL_BODY),
    ("chat", {**TOOL_BODY, "tool_choice": "required", "n": 2, "stop": ["a", "b"], "max_completion_tokens": 9}),
    ("chat", {**TOOL_BODY, "tool_choice": "none"}),
    ("chat", {"model": "tiny", "messages": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                                            {"role": "user", "content": "Hi"}], "seed": 1,
              "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}}}}),
    ("completions", COMPLETION_BODY),
    ("completions", {"model": "tiny", "prompt": ["a", "b c"], "n": 2, "seed": 3, "top_p": 0.9}),
    ("completions", {"model": "tiny", "prompt": [[5, 6, 7], [8]], "seed": 3, "stop": "x"}),
])
def test_the_node_and_a_client_convert_a_request_alike(tok, endpoint, body):
    """The node's typed path (validated, then dumped once) and the client's JSON body give the
    same Asked: the same prompts, the same parameters for every choice."""
    node = REQUESTS[endpoint].model_validate(body).to_asked(tok, CONTEXT)
    client = asked_of(endpoint, body, tok, CONTEXT)
    assert node == client
    assert len(node.choices) == len(node.prompts) * (body.get("n") or 1)


def test_the_conversion_follows_the_documented_rules(tok):
    asked = asked_of("chat", {**BODY, "seed": U64 - 2, "n": 3}, tok, CONTEXT)
    assert [p.seed for p in asked.choices] == [U64 - 2, U64 - 1, 0]  # seed + j, unsigned 64-bit
    assert asked.seed_source == "client" and asked.top_n == 2 and not asked.budget_is_cap
    prompt = tok.encode_chat(BODY["messages"])
    assert asked.prompts == (tuple(prompt),)
    assert {p.max_tokens for p in asked.choices} == {chat_budget(prompt)}
    assert asked_of("chat", BODY, tok, len(prompt) + 5).choices[0].max_tokens == 5  # the context nearly full
    assert asked_of("chat", BODY, tok, len(prompt)).choices[0].max_tokens == 1  # full: the engine's error, not a silent 0
    completions = asked_of("completions", {"model": "tiny", "prompt": [[1, 2], "x"], "n": 2}, tok, CONTEXT)
    assert [p.max_tokens for p in completions.choices] == [DEFAULT_COMPLETION_MAX_TOKENS] * 4
    x = tuple(tok.encode_prompt("x"))
    assert [completions.prompt_of(i) for i in range(4)] == [(1, 2), (1, 2), x, x]  # prompt-major
    assert completions.top_n is None and completions.tools == ()
    unseeded = asked_of("chat", {**BODY, "seed": None, "n": 4}, tok, CONTEXT)
    assert unseeded.seed_source == "node" and len({p.seed for p in unseeded.choices}) == 4  # fresh for every choice
    grammar = asked_of("chat", {**TOOL_BODY, "tool_choice": "required", "n": 3}, tok, CONTEXT)
    assert grammar.choices[0].grammar is not None and len({p.grammar for p in grammar.choices}) == 1


def test_an_output_format_that_cannot_be_compiled_is_refused_by_the_conversion(tok):
    body = {**TOOL_BODY, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    with pytest.raises(GrammarError, match="get_time"):
        asked_of("chat", body, tok, CONTEXT)


def test_asked_is_frozen(tok):
    asked = asked_of("chat", BODY, tok, CONTEXT)
    assert isinstance(asked, Asked)
    with pytest.raises(AttributeError):
        asked.per_prompt = 5  # type: ignore[misc]

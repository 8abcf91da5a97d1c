"""Binding: is the answer a client received the answer to *its* request? (DESIGN.md, "Who signed what")

A receipt proves what a node computed, not that it answered the client's request: an operator
between the client and its own honest node can swap the prompt, the sampling parameters or the
text, and re-sign. This check needs no model weights, only the tokenizer and chat template,
so any client (or the verifier sidecar, on every answer) can run it. Given what the client's
request asked for (``Asked``: its body converted once by ``asked_of``, the very conversion the
node serves with), the response it received (one JSON document, or a stream's chunks) and the
answer file behind each receipt in it, it checks per choice that:

1. the response's receipt is the answer file's (same receipt, signature and key), and the answer
   file is the node's own (signature, evidence hashing to the signed ``evidence_hash``);
2. the evidence's prompt ids are exactly the model's rendering of the client's messages or prompt
   (the README's tokenization rule);
3. every sampling parameter equals what the request asked for (defaults where it is silent;
   choice j of n uses seed + j), and the seed's source is the one the request implies;
4. the finish obeys the finish rules (``verify.finish``) and the text and finish_reason the client
   got are what the output ids decode to under them, read where clients read them (a chat's
   ``message.content`` or ``delta.content``, a completion's ``text``); with tools, a committed
   text that is a tool call must have been served as that call, under the id the receipt gives it;
5. logprobs, when asked for, are the committed fingerprints' (one entry per output token, each
   value a committed logit minus the committed log-normaliser, each token string and its bytes
   the token's own text);
6. the response as a whole: choices in index order, each once; ``usage`` the receipts' token
   counts; ``system_fingerprint`` the backend the receipts name.

The HTTP body is not signed, so a mismatch is refused and counted by the party that saw the
request; it is not a network conviction (a finish-rule failure is also fraud an audit proves).
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Protocol, Sequence

from verify.evidence import AnswerFile
from verify.finish import finish_failures, visible_text
from verify.receipts import SeedSource
from verify.sampling import U64, SamplingParams
from verify.structured import call_text, described, read_tool_calls, request_grammar, tools_in_effect
from verify.verifier import attribution_problems

Endpoint = Literal["chat", "completions"]
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
# Chat has no documented default ("up to the context"); KV pages are reserved for the whole
# budget at admission, so an unbounded default would let one chat hold most of the cache.
DEFAULT_CHAT_MAX_TOKENS = 512
LOGPROB_TOLERANCE = 1e-4  # log-softmax differences vs committed logit differences (float32 inputs)


class Tokenization(Protocol):
    """What binding needs of a model: its tokenizer and chat template (node's TextTokenizer)."""

    eos_token_ids: Sequence[int]

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] = ()) -> list[int]: ...

    def encode_prompt(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


def template_message(message: Mapping[str, Any]) -> dict[str, str]:
    """The plain {role, content} dict a chat template renders from an OpenAI message
    ("developer" is OpenAI's new name for "system"; text parts are joined; an assistant's
    earlier tool calls become the text that made them, and a tool's result a user turn in
    ``<tool_response>`` tags, as ``verify.structured`` documents)."""
    content = message.get("content")
    text = content if isinstance(content, str) else "".join(part.get("text", "") for part in content or [])
    role = message.get("role")
    if role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"}
    if role == "assistant" and message.get("tool_calls"):
        text += call_text(message["tool_calls"])
    return {"role": "system" if role == "developer" else role, "content": text}


def default_max_tokens(endpoint: Endpoint, prompt_tokens: int, max_context: int) -> int:
    """The budget of a request that names none: OpenAI's 16 for completions; for chat up to
    ``DEFAULT_CHAT_MAX_TOKENS``, less when the context is nearly full (at least 1, so a prompt
    that fills the context gets the engine's context-length error)."""
    if endpoint == "completions":
        return DEFAULT_COMPLETION_MAX_TOKENS
    return max(1, min(DEFAULT_CHAT_MAX_TOKENS, max_context - prompt_tokens))


@dataclass(frozen=True)
class Asked:
    """What a request asks for, converted once from its body (``asked_of``): what the node serves
    with and what the binding check expects, so neither reads the body again (vLLM's
    ``to_sampling_params``). The node builds it from a validated request, a client or the
    verifier sidecar from the JSON body it sent; both come out alike."""

    endpoint: Endpoint
    prompts: tuple[tuple[int, ...], ...]  # each prompt's ids: a chat's rendered messages and tools, or each completion prompt
    choices: tuple[SamplingParams, ...]  # one per choice, prompt-major: choice i answers prompt i // per_prompt
    per_prompt: int  # n
    # "client": choice j of n samples with seed + j; "node": the request set no seed and each
    # choice's seed is drawn here, fresh (a node serves with it; binding takes the node's own
    # from its evidence).
    seed_source: SeedSource
    # The request names no max_tokens and the serving context is not known: each choice's
    # max_tokens is the most the default can be, not the default itself.
    budget_is_cap: bool
    tools: tuple[Mapping[str, Any], ...]  # what the model is told of each function a chat lets it call (none for completions)
    logprobs: bool  # whether logprobs are asked for
    top_logprobs: int  # top entries per token, when they are

    def prompt_of(self, index: int) -> tuple[int, ...]:
        return self.prompts[index // self.per_prompt]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def top_n(self) -> int | None:
        """How many top logprobs each token gets; ``None``: no logprobs at all."""
        return self.top_logprobs if self.logprobs else None


def _prompts(endpoint: Endpoint, body: Mapping[str, Any], tools: Sequence[Mapping[str, Any]], tok: Tokenization) -> list[list[int]]:
    """The token ids of every prompt: a chat's templated messages (and tools), or each completion
    prompt encoded (token ids taken as they are)."""
    if endpoint == "chat":
        return [tok.encode_chat([template_message(m) for m in body.get("messages") or []], tools)]
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [tok.encode_prompt(prompt)]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [tok.encode_prompt(p) if isinstance(p, str) else list(p) for p in prompt or []]


def asked_of(endpoint: Endpoint, body: Mapping[str, Any], tok: Tokenization, max_context: int | None) -> Asked:
    """The one conversion of a request body (JSON, as sent), OpenAI's defaults where it is silent.
    ``max_context``: the serving model's, which bounds a chat's default budget (``None``: not
    known, see ``Asked.budget_is_cap``). The prompts are rendered first, then the grammar is
    compiled once for every choice: raises ``GrammarError`` when the request's schema, grammar or
    tool choice cannot be compiled (no honest node serves such a request)."""
    tools = tuple(described(f) for f in tools_in_effect(body)) if endpoint == "chat" else ()
    prompts = tuple(tuple(p) for p in _prompts(endpoint, body, tools, tok))
    stop, seed, per_prompt = body.get("stop"), body.get("seed"), body.get("n") or 1
    shared = dict(  # every parameter but each choice's max_tokens and seed
        temperature=1.0 if body.get("temperature") is None else body["temperature"],
        top_p=1.0 if body.get("top_p") is None else body["top_p"],
        top_k=body.get("top_k") or 0,
        presence_penalty=body.get("presence_penalty") or 0.0,
        frequency_penalty=body.get("frequency_penalty") or 0.0,
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        grammar=request_grammar(body),
    )
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")  # OpenAI's current chat name wins
    choices = []
    for ids in prompts:
        budget = max_tokens or default_max_tokens(endpoint, len(ids), 2**31 if max_context is None else max_context)
        for j in range(per_prompt):
            choice_seed = secrets.randbits(64) if seed is None else (int(seed) + j) % U64
            choices.append(SamplingParams(**shared, max_tokens=budget, seed=choice_seed))
    chat = endpoint == "chat"
    return Asked(endpoint, prompts, tuple(choices), per_prompt, "node" if seed is None else "client",
                 budget_is_cap=max_tokens is None and max_context is None, tools=tools,
                 logprobs=bool(body.get("logprobs")) if chat else body.get("logprobs") is not None,
                 top_logprobs=(body.get("top_logprobs") if chat else body.get("logprobs")) or 0)


@dataclass
class ReceivedChoice:
    """What the client got for one choice."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    proofmesh: dict | None = None
    logprobs: list[dict] = field(default_factory=list)  # one per token, as the endpoint renders them
    tool_calls: dict[int, dict[str, str]] = field(default_factory=dict)  # by call index: id, name, arguments (JSON text)


@dataclass
class BindingReport:
    """Per choice index, what does not bind (empty lists: the answer is the request's)."""

    problems: dict[int, list[str]]  # -1: the response as a whole
    receipts: dict[int, str]  # choice index -> receipt id

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())

    def summary(self) -> str:
        return "; ".join(f"{'the response' if i < 0 else f'choice {i}'}: {', '.join(p)}"
                         for i, p in sorted(self.problems.items()) if p)


@dataclass
class ReceivedResponse:
    """What the client got, read as clients read it: the choices, and what the response says of
    itself as a whole."""

    choices: dict[int, ReceivedChoice]
    problems: list[str]  # about the response as a whole (order, usage, system_fingerprint)
    usage: dict | None = None
    system_fingerprints: set[str] = field(default_factory=set)


def received_choices(endpoint: Endpoint, response: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> ReceivedResponse:
    """The choices of a JSON response, or reassembled from a stream's chunks (text joined, the
    chunk with a choice's finish_reason carries its receipt). A JSON response's choices must come
    in index order, each once: clients read ``choices[0]``, not the choice whose index is 0."""
    whole = isinstance(response, Mapping)
    chunks = [response] if whole else list(response)
    out = ReceivedResponse({}, [])
    for chunk in chunks:
        if chunk.get("system_fingerprint") is not None:
            out.system_fingerprints.add(chunk["system_fingerprint"])
        if chunk.get("usage") is not None:
            out.usage = chunk["usage"]
        for position, c in enumerate(chunk.get("choices") or []):
            index = int(c.get("index", 0))
            if whole and (index != position or index in out.choices):
                out.problems.append(f"choice {position} of the response has index {index}")
            got = out.choices.setdefault(index, ReceivedChoice(index))
            message = (c.get("message") if whole else c.get("delta")) or {}
            got.text += (message.get("content") if endpoint == "chat" else c.get("text")) or ""
            if c.get("finish_reason"):
                got.finish_reason = c["finish_reason"]
                got.proofmesh = c.get("proofmesh") or chunk.get("proofmesh")
            if c.get("logprobs"):
                got.logprobs.append(c["logprobs"])
            for k, call in enumerate(message.get("tool_calls") or []):  # a stream sends arguments in pieces
                function = call.get("function") or {}
                joined = got.tool_calls.setdefault(int(call.get("index", k)), {"id": "", "name": "", "arguments": ""})
                joined["id"] = call.get("id") or joined["id"]
                joined["name"] += function.get("name") or ""
                joined["arguments"] += function.get("arguments") or ""
    return out


def token_bytes(text: str) -> list[int] | None:
    """A token's ``bytes`` as chat logprobs serve them: its UTF-8, or None where the token holds
    part of a character (its text then reads U+FFFD and has no exact bytes)."""
    return None if "\ufffd" in text else list(text.encode())


def completion_top(top: Sequence[tuple[str, float]], sampled: tuple[str, float]) -> dict[str, float]:
    """A completion token's ``top_logprobs`` dict: best first, texts that coincide keep the best
    one's value, and the sampled token is always listed."""
    out: dict[str, float] = {}
    for name, value in [*top, sampled]:
        out.setdefault(name, value)
    return out


def _logprob_problems(endpoint: Endpoint, got: ReceivedChoice, answer: AnswerFile, top_n: int, tok: Tokenization) -> list[str]:
    """The logprobs received against the committed fingerprints: one entry per output token,
    each value a committed logit minus the committed log-normaliser, each top list the first
    ``top_n`` of the committed top-k, each token string (and its bytes) the token's own text."""
    ev = answer.evidence

    def text(token: int) -> str:
        return tok.decode([token], skip_special_tokens=False)

    if endpoint == "chat":
        entries = [e for block in got.logprobs for e in block.get("content") or []]
    else:
        tokens = [t for block in got.logprobs for t in block.get("tokens") or []]
        values = [v for block in got.logprobs for v in block.get("token_logprobs") or []]
        tops = [d for block in got.logprobs for d in block.get("top_logprobs") or []]
        if not len(tokens) == len(values) == len(tops):
            return ["the completion logprobs' lists differ in length"]
        entries = [{"token": t, "logprob": v, "top": d} for t, v, d in zip(tokens, values, tops)]
    if len(entries) != len(ev.output_ids):
        return [f"{len(entries)} logprobs for {len(ev.output_ids)} output tokens"]

    def same(value: Any, expected: float) -> bool:
        return isinstance(value, (int, float)) and math.isclose(value, expected, rel_tol=0.0, abs_tol=LOGPROB_TOLERANCE)

    for t, (fp, token, entry) in enumerate(zip(ev.fingerprints, ev.output_ids, entries)):
        if entry.get("token") != text(token) or not same(entry.get("logprob"), fp.token_logprob()):
            return [f"the logprob of token {t} is not the committed one"]
        committed = [(text(i), v) for i, v in fp.top_logprobs()[:top_n]]
        if endpoint == "chat":
            if entry.get("bytes") != token_bytes(entry["token"]):
                return [f"the bytes of token {t} are not its text's"]
            listed = [(e.get("token"), e.get("logprob")) for e in entry.get("top_logprobs") or []]
        else:
            committed = list(completion_top(committed, (text(token), fp.token_logprob())).items())
            listed = list((entry.get("top") or {}).items())
        if len(listed) != len(committed) or any(a != b or not same(v, w) for (a, v), (b, w) in zip(listed, committed)):
            return [f"the top logprobs of token {t} are not the committed fingerprint's"]
    return []


def _received_calls(got: ReceivedChoice) -> list[tuple[str, str, Any]]:
    calls = []
    for _, call in sorted(got.tool_calls.items()):
        try:
            calls.append((call["id"], call["name"], json.loads(call["arguments"])))
        except ValueError:
            calls.append((call["id"], call["name"], call["arguments"]))  # not JSON: never equal to a committed call
    return calls


def bind_answers(asked: Asked, response: Mapping[str, Any] | Sequence[Mapping[str, Any]], answers: Mapping[str, AnswerFile],
                 tok: Tokenization, *, model_id: str | None = None, require_client_seed: bool = False) -> BindingReport:
    """Check every choice of ``response`` against what the request ``asked`` for and the answer
    files (by receipt id); see the module docstring. ``model_id``: the model the client asked
    for, when known."""
    endpoint, n_choices = asked.endpoint, len(asked.choices)
    whole = received_choices(endpoint, response)
    received = whole.choices
    problems: dict[int, list[str]] = {-1: list(whole.problems)}  # -1: the response as a whole
    if extra := sorted(set(received) - set(range(n_choices))):
        problems[-1].append(f"choices {extra} were not asked for")
    receipts: dict[int, str] = {}
    for index, expected in enumerate(asked.choices):
        found = problems.setdefault(index, [])
        got = received.get(index)
        receipt = ((got.proofmesh or {}).get("receipt") or {}) if got else {}
        answer = answers.get(str(receipt.get("receipt_id")))
        if got is None or answer is None:
            found.append("no answer" if got is None else "no answer file for its receipt")
            continue
        receipts[index] = answer.receipt.receipt_id
        r, ev = answer.receipt, answer.evidence
        if (receipt != r.model_dump(mode="json") or got.proofmesh.get("signature") != answer.signature
                or got.proofmesh.get("public_key") != answer.public_key):
            found.append("the answer file is not the one named by the served receipt")
            continue
        if attribution := attribution_problems(answer):
            found.extend(attribution)
            continue
        if model_id is not None and r.model_id != model_id:
            found.append("the receipt names another model than the one asked for")
        if tuple(ev.prompt_ids) != asked.prompt_of(index):
            found.append("the prompt ids are not the rendering of the request's prompt")
        unchecked = {"max_tokens", "seed"} if asked.seed_source == "node" else {"max_tokens"}  # a node's seed is its own
        mismatched = [name for name in SamplingParams.model_fields
                      if name not in unchecked and getattr(expected, name) != getattr(ev.sampling, name)]
        if not (ev.sampling.max_tokens <= expected.max_tokens if asked.budget_is_cap else ev.sampling.max_tokens == expected.max_tokens):
            mismatched.append("max_tokens")
        if mismatched:
            found.append(f"sampling parameters differ from the request's: {', '.join(sorted(mismatched))}")
        if r.seed_source != asked.seed_source:
            found.append(f"the receipt says the seed came from the {r.seed_source}")
        if asked.seed_source == "node" and require_client_seed:
            found.append("the request set no seed and client seeds are required")
        for position, why in finish_failures(ev.output_ids, ev.sampling, r.finish_reason, tok.eos_token_ids, tok.decode):
            found.append(f"{why} (output position {position})")
        text = visible_text(ev.output_ids, ev.sampling, tok.eos_token_ids, tok.decode)
        calls = read_tool_calls(text, asked.tools) if r.finish_reason == "stop" else None  # no tools: never a call
        served_finish = "tool_calls" if calls else r.finish_reason
        if got.finish_reason != served_finish:
            found.append(f"finish_reason {got.finish_reason!r} received, {served_finish!r} committed")
        if got.text != ("" if calls else text):
            found.append("the text received is not what the committed output ids decode to")
        if _received_calls(got) != [(call_id(r.receipt_id, k), c.name, c.arguments) for k, c in enumerate(calls or [])]:
            found.append("the tool calls received are not what the committed output ids decode to")
        if got.logprobs or asked.logprobs:
            found.extend(_logprob_problems(endpoint, got, answer, asked.top_logprobs, tok))
    if len(receipts) == n_choices:
        files = [answers[receipts[i]] for i in range(n_choices)]
        problems[-1].extend(_whole_problems(whole, files, asked.prompt_tokens))
    return BindingReport(problems=problems, receipts=receipts)


def _whole_problems(whole: ReceivedResponse, files: Sequence[AnswerFile], prompt_tokens: int) -> list[str]:
    """``usage`` and ``system_fingerprint`` against the receipts."""
    problems = []
    completion = sum(a.receipt.n_output_tokens for a in files)
    expected = {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}
    if whole.usage is not None and {k: whole.usage.get(k) for k in expected} != expected:
        problems.append(f"usage {whole.usage} is not the receipts' token counts {expected}")
    if whole.system_fingerprints - {a.receipt.backend for a in files}:
        problems.append("the system_fingerprint is not the backend the receipts name")
    return problems


def call_id(receipt_id: str, k: int) -> str:
    """The id of an answer's ``k``-th tool call: fixed by its receipt, so the same answer always
    names its calls alike (and a client can check them)."""
    return f"call_{receipt_id[:24]}_{k}"


__all__ = ["Asked", "BindingReport", "Endpoint", "ReceivedResponse", "Tokenization", "asked_of", "bind_answers", "call_id",
           "completion_top", "default_max_tokens", "received_choices", "template_message", "token_bytes"]

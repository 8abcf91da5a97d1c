"""What the sidecar sends its client: an upstream's answer parsed once, as a client parses it,
bound to the client's request, and rebuilt from the signed answer files — never the upstream's
bytes (DESIGN.md, "Who signed what": a proxy that binds one parse and forwards the bytes is a
parser differential waiting to happen).

- Every 2xx is an answer (the ``openai`` client accepts any); it is parsed into the endpoint's
  response model, bound (``verify.binding``), rebuilt with the node's own renderer from the
  answer files (``node.runtime.events.replay``), and the rebuild must equal the parse in every
  field but the response's ``id``, ``created`` and ``model`` (the sidecar's own; ``model`` is bound
  through the receipts' model_id). Anything that cannot be parsed, bound or rebuilt to the same
  is refused (502 ``answer_refused``) and counted against the upstream that served it.
- A stream is parsed as the HTML standard defines server-sent events (``verify.sse``). The
  text the client sees is rebuilt as it arrives from the token ids each chunk carries, under the
  request's own stop rules; each choice's last event (finish, receipt) and the usage chunk go
  out only once the whole answer is bound, from the answer files. A stream whose binding fails
  ends in an error event, not a finish. With ``hold_streams`` (and always when logprobs are
  asked for: they need the fingerprints) nothing is shown before binding. Binding and audit run
  to the end even when the client hangs up.
- An upstream's error (4xx/5xx) is passed on as an error the sidecar words itself (its message
  and code, a 5xx as 502); a redirect or anything else is refused.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from aiohttp import web
from pydantic import BaseModel, ValidationError

from node.api.conversion import generation_requests
from node.api.errors import APIError
from node.api.protocol import (ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                               CompletionResponse, ErrorResponse, ProofMeshInfo, SamplingRequest, UsageInfo)
from node.api.rendering import ChoiceEvent, Renderer, TokenTexts, make_renderer
from node.api.server import json_response
from node.models.tokenizer import TextTokenizer
from node.runtime.events import AnswerText, GenerationRequest, TokenEvent, replay
from node.sidecar.upstreams import Upstream
from verify.binding import Asked, Endpoint
from verify.evidence import AnswerFile
from verify.sse import SSEDecoder
from verify.verifier import ScoringBackend

log = logging.getLogger("proofmesh.sidecar")

# A streamed answer is kept (its chunks, for binding) up to this size; past it the stream is cut
# and the answer refused as not bound.
MAX_STREAM_BYTES = 64 << 20
# Fields of a response the sidecar sets itself rather than takes from the upstream.
OWN_FIELDS = {"id", "created", "model"}

_MODELS: dict[Endpoint, tuple[type[SamplingRequest], type[BaseModel], type[BaseModel]]] = {
    "chat": (ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk),
    "completions": (CompletionRequest, CompletionResponse, CompletionResponse),
}


class AuditModel(ScoringBackend, Protocol):
    """A model the sidecar holds: it re-executes audits, binds answers to requests with its
    tokenizer and rebuilds them for clients (node's ``LoadedModel``)."""

    name: str  # its registry name or path: clients call it by the last component
    tokenizer: TextTokenizer
    max_context: int
    backend: str
    weight_format: str  # the checkpoint's stored weight types, as GET /v1/models shows them


class AnswerChecker(Protocol):
    """What a relay needs of the sidecar (``node.sidecar.auditor.Auditor``)."""

    async def bind(self, up: Upstream, req: "ClientRequest", received: dict | list[dict]) -> list[AnswerFile]: ...

    async def refuse(self, up: Upstream, why: str) -> APIError: ...

    def answered(self, answers: Sequence[AnswerFile]) -> None: ...


class Refused(Exception):
    """The upstream's answer cannot be served: it is not parseable, not bound, or not what the
    signed answer files rebuild to (the message says which)."""


@dataclass
class ClientRequest:
    """A client's request as the sidecar holds it: validated once, what went upstream (the
    sidecar's seed included), and every choice's prompt and sampling as the node must serve them."""

    endpoint: Endpoint
    body: SamplingRequest
    fields: dict[str, Any]  # the JSON body forwarded upstream
    headers: dict[str, str]  # the client's Authorization, passed on upstream (the answer and its evidence are its)
    model_name: str  # the sidecar's name for its model, what responses name
    model: AuditModel
    token_texts: TokenTexts
    asked: Asked  # what the request asks for: binding's expectations and the choices' parameters
    choices: list[GenerationRequest]

    @classmethod
    def of(cls, endpoint: Endpoint, body: SamplingRequest, fields: dict[str, Any], headers: dict[str, str], model_name: str,
           model: AuditModel, token_texts: TokenTexts) -> "ClientRequest":
        asked = body.to_asked(model.tokenizer, model.max_context)
        return cls(endpoint, body, fields, headers, model_name, model, token_texts, asked, generation_requests(asked))

    @property
    def tokenizer(self) -> TextTokenizer:
        return self.model.tokenizer

    def renderer(self, backend: str | None) -> Renderer:
        return make_renderer(self.model_name, backend, self.token_texts, self.asked)

    @property
    def prompt_tokens(self) -> int:
        return self.asked.prompt_tokens

    @property
    def shows_logprobs(self) -> bool:
        return self.asked.logprobs


# ---------------------------------------------------------------------- parsing


def parse_request(endpoint: Endpoint, fields: dict[str, Any]) -> SamplingRequest:
    """A client's body as the node validates it (``ValidationError``: a 400 in the middleware)."""
    return _MODELS[endpoint][0].model_validate(fields)


def parse_response(endpoint: Endpoint, data: bytes) -> BaseModel:
    """An upstream's JSON answer as the endpoint's response model (as a client reads it)."""
    try:
        return _MODELS[endpoint][1].model_validate_json(data)
    except (ValidationError, ValueError, RecursionError) as exc:
        raise Refused(f"the upstream's answer is not a {endpoint} response: {str(exc)[:200]}") from None


def parse_chunk(endpoint: Endpoint, data: str) -> BaseModel:
    try:
        return _MODELS[endpoint][2].model_validate_json(data)
    except (ValidationError, ValueError, RecursionError) as exc:
        raise Refused(f"the upstream's stream holds an event that is not a {endpoint} chunk: {str(exc)[:200]}") from None


def upstream_error(status: int, data: bytes) -> APIError:
    """An upstream's error, worded by the sidecar: its message and code, a server fault as 502."""
    try:
        error = ErrorResponse.model_validate_json(data).error
        message, code = error.message, error.code
    except (ValidationError, ValueError, RecursionError):
        message, code = f"the upstream answered {status} without an OpenAI error", None
    if 400 <= status < 500:
        return APIError(status, f"upstream: {message}", code=code or "upstream_error")
    return APIError(502, f"upstream failed ({status}): {message}", code="upstream_error")


# ---------------------------------------------------------------------- rebuilding


def receipts_in(body: Any) -> Iterator[tuple[str, str, str | None]]:
    """``(receipt_id, node_id, evidence_token)`` of every ``proofmesh.receipt`` in a response body or stream chunk."""
    if isinstance(body, dict):
        proof = body.get("proofmesh")
        receipt = proof.get("receipt") if isinstance(proof, dict) else None
        if isinstance(receipt, dict) and "receipt_id" in receipt:
            token = proof.get("evidence_token")
            yield str(receipt["receipt_id"]), str(receipt.get("node_id", "")), token if isinstance(token, str) else None
        for key, value in body.items():
            if key != "proofmesh":
                yield from receipts_in(value)
    elif isinstance(body, list):
        for item in body:
            yield from receipts_in(item)


def served_proof(answer: AnswerFile, tokens: dict[str, str]) -> ProofMeshInfo:
    """The proof a client gets: the answer file's receipt, signature and key (binding checked the
    served ones are the same), the backend the receipt names, and the evidence token the node
    gave (``tokens``: by receipt id; the sidecar fetched the answer file with it, so it opens the
    file for the client too)."""
    return ProofMeshInfo(receipt=answer.receipt, signature=answer.signature, public_key=answer.public_key,
                         backend=answer.receipt.backend, evidence_token=tokens.get(answer.receipt.receipt_id, ""))


def rebuilt_choices(req: ClientRequest, answers: Sequence[AnswerFile], received: dict | list[dict]) -> list[list[ChoiceEvent]]:
    """Every choice's events as the node's engine made them, from its answer file."""
    tokens = {receipt_id: token for receipt_id, _, token in receipts_in(received) if token}
    out = []
    for index, answer in enumerate(answers):
        events = replay(answer, req.tokenizer)
        last = len(events) - 1
        proof = served_proof(answer, tokens)
        out.append([ChoiceEvent(index, e, proof if t == last else None) for t, e in enumerate(events)])
    return out


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Where two JSON values differ first (None: equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{path}.{key}"
            if (where := first_difference(a[key], b[key], f"{path}.{key}")) is not None:
                return where
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path} (length {len(a)} vs {len(b)})"
        return next((w for i, (x, y) in enumerate(zip(a, b)) if (w := first_difference(x, y, f"{path}[{i}]")) is not None), None)
    return None if a == b else path or "."


def comparable(response: BaseModel) -> dict:
    return response.model_dump(mode="json", exclude=OWN_FIELDS)


# ---------------------------------------------------------------------- JSON answers


async def rebuild_json(sidecar: AnswerChecker, up: Upstream, req: ClientRequest, data: bytes) -> tuple[BaseModel, list[AnswerFile]]:
    """A whole answer parsed, bound, rebuilt from its answer files and compared with the parse:
    the response to serve and the answer files behind it (``Refused`` if any step fails)."""
    parsed = parse_response(req.endpoint, data)
    received = parsed.model_dump(mode="json")
    answers = await sidecar.bind(up, req, received)
    return checked_rebuild(req, parsed, received, answers), answers


def checked_rebuild(req: ClientRequest, parsed: BaseModel, received: dict, answers: Sequence[AnswerFile]) -> BaseModel:
    """The response rebuilt from bound answer files, which must equal the parse but for the
    sidecar's own fields (``Refused`` names the first difference)."""
    rebuilt = req.renderer(answers[0].receipt.backend).response(rebuilt_choices(req, answers, received), req.prompt_tokens)
    if (where := first_difference(comparable(rebuilt), comparable(parsed))) is not None:
        raise Refused(f"the upstream's response differs from what its signed answers rebuild to at {where}")
    return rebuilt


async def relay_json(sidecar: AnswerChecker, up: Upstream, req: ClientRequest, data: bytes) -> web.Response:
    """A whole answer, served from its rebuild; then audited."""
    rebuilt, answers = await rebuild_json(sidecar, up, req, data)
    sidecar.answered(answers)
    return json_response(rebuilt)


# ---------------------------------------------------------------------- streams


class _ClientStream:
    """The client's side of a stream; once it hangs up, writes are dropped and the relay goes on."""

    def __init__(self, response: web.StreamResponse):
        self.response = response
        self.gone = False

    async def send(self, payload: bytes) -> None:
        if self.gone:
            return
        try:
            await self.response.write(payload)
        except (ConnectionError, RuntimeError):  # RuntimeError: the transport is closed
            self.gone = True
            log.debug("client left before the end of the stream; binding and audit go on")

    async def chunk(self, model: BaseModel | None) -> None:
        if model is not None:
            await self.send(b"data: " + model.model_dump_json().encode() + b"\n\n")

    async def close(self) -> None:
        if not self.gone:
            try:
                await self.response.write_eof()
            except (ConnectionError, RuntimeError):
                self.gone = True


class UpstreamFailed(Exception):
    """The upstream reported an error inside its stream: passed on, not counted as a lie."""


def _stream_event(endpoint: Endpoint, data: str) -> BaseModel:
    """One event's data as a chunk; an ``{"error": ...}`` event raises ``UpstreamFailed``."""
    try:
        error = ErrorResponse.model_validate_json(data).error
    except (ValidationError, ValueError, RecursionError):
        return parse_chunk(endpoint, data)
    raise UpstreamFailed(f"upstream: {error.message}")


class _Rebuilt:
    """A stream's choices as the sidecar rebuilds them from the token ids that arrive."""

    def __init__(self, req: ClientRequest):
        self.texts = [AnswerText(req.tokenizer, choice.params) for choice in req.choices]
        self.streamed: list[list[int]] = [[] for _ in req.choices]
        self.shown = [0] * len(req.choices)  # events already sent, per choice

    def push(self, index: int, token_ids: Sequence[int]) -> list[ChoiceEvent]:
        """The events these ids complete that may be shown now: all but a choice's last, which
        waits for its receipt (ids past the finish are kept for binding to refuse)."""
        if not 0 <= index < len(self.texts):
            raise Refused(f"the upstream's stream names choice {index} of {len(self.texts)}")
        events = []
        for token in token_ids:
            self.streamed[index].append(token)
            if self.texts[index].finish_reason is None:
                text, finish = self.texts[index].push(token)
                if finish is None:
                    events.append(ChoiceEvent(index, TokenEvent.of(token, text, None), None))
        return events


async def relay_stream(sidecar: AnswerChecker, up: Upstream, req: ClientRequest, upstream, request: web.Request,
                       hold: bool) -> web.StreamResponse:
    """A streamed answer: shown as it is rebuilt from the chunks' token ids, finished once bound."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    client = _ClientStream(response)
    hold = hold or req.shows_logprobs
    rebuilt = _Rebuilt(req)
    renderer: Renderer | None = None
    chunks: list[dict] = []
    try:
        decoder, received, done = SSEDecoder(), 0, False
        async for piece in upstream.content.iter_any():
            received += len(piece)
            if received > MAX_STREAM_BYTES:  # kept for binding: an endless stream must not grow memory
                raise Refused(f"the upstream's stream passed {MAX_STREAM_BYTES >> 20} MiB")
            for event in decoder.feed(piece):
                done = event.data.startswith("[DONE]")  # where the openai client stops reading
                if done:
                    break
                chunk = _stream_event(req.endpoint, event.data)
                chunks.append(chunk.model_dump(mode="json"))
                renderer = renderer or req.renderer(chunk.system_fingerprint)
                for choice in chunk.choices:
                    for item in rebuilt.push(choice.index, choice.token_ids or ()):
                        if not hold:
                            await client.chunk(renderer.chunk(item))
                            rebuilt.shown[item.index] += 1
            if done:
                break
        if renderer is None:
            raise Refused("the upstream's stream holds no chunk")
        answers = await sidecar.bind(up, req, chunks)
        for index, (answer, ids) in enumerate(zip(answers, rebuilt.streamed)):
            if ids != answer.evidence.output_ids:
                raise Refused(f"choice {index}: the streamed token ids are not the committed output ids")
        if renderer.common["system_fingerprint"] != answers[0].receipt.backend:
            raise Refused("the stream's system_fingerprint is not the backend its receipt names")
        for index, events in enumerate(rebuilt_choices(req, answers, chunks)):
            for item in events[rebuilt.shown[index]:]:
                await client.chunk(renderer.chunk(item))
        if req.body.include_usage:
            completion = sum(len(a.evidence.output_ids) for a in answers)
            await client.chunk(renderer.usage_chunk(UsageInfo.of(req.prompt_tokens, completion)))
        sidecar.answered(answers)
    except UpstreamFailed as exc:
        await client.chunk(APIError(502, str(exc), code="upstream_error").body())
    except (Refused, asyncio.TimeoutError, OSError) as exc:
        why = str(exc) if isinstance(exc, Refused) else f"the upstream's stream broke off: {exc!r}"
        await client.chunk((await sidecar.refuse(up, why)).body())
    await client.send(b"data: [DONE]\n\n")
    await client.close()
    return response


__all__ = ["AnswerChecker", "AuditModel", "ClientRequest", "checked_rebuild", "MAX_STREAM_BYTES", "Refused", "parse_request",
           "parse_response", "rebuild_json", "receipts_in", "relay_json", "relay_stream", "upstream_error"]

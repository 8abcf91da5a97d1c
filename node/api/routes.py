"""OpenAI-style routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

Both generation endpoints share one path (``_respond``): parse, turn prompts into token ids,
make one engine request per choice, then either collect the answers into one JSON response or
stream them as server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``. The
two endpoints differ only in how they render events (``CompletionRenderer``, ``ChatRenderer``).

Seeds: choice ``j`` of a request with ``seed = s`` samples with seed ``s + j`` (so ``n = 1`` uses
``s`` itself and every choice differs); without a seed the node draws one per choice. Either
way the seed is committed in that choice's receipt, so every answer can be re-checked.

A stream sends its headers once the first token of any choice is ready. Every choice is
submitted to the engine before that, so admission errors (queue full, prompt too long) are
ordinary JSON errors with their status. Later errors arrive as an ``{"error": ...}`` event,
which the openai client raises.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections import defaultdict
from contextlib import aclosing
from typing import AsyncIterator

from aiohttp import web
from pydantic import BaseModel

from node.runtime.engine import GenerationRequest
from node.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelList,
    SamplingRequest,
    UsageInfo,
)
from node.api.errors import api_error_of, parse_body
from node.api.service import NODE, ChoiceEvent, ServedModel
from verify.binding import choice_seed, default_max_tokens, requested_max_tokens, requested_sampling

routes = web.RouteTableDef()


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    return _json(ModelList(data=request.app[NODE].model_cards()))


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    body = await parse_body(request, CompletionRequest)
    served = request.app[NODE].model(body.model)
    tok = served.loaded.tokenizer
    prompts = [tok.encode_prompt(p) if isinstance(p, str) else p for p in body.prompts()]
    return await _respond(request, served, body, prompts, CompletionRenderer(served, body))


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await parse_body(request, ChatCompletionRequest)
    served = request.app[NODE].model(body.model)
    prompt = served.loaded.tokenizer.encode_chat([m.for_template() for m in body.messages])
    return await _respond(request, served, body, [prompt], ChatRenderer(served, body))


# ---------------------------------------------------------------------- the shared path


def _generation_requests(served: ServedModel, body: SamplingRequest, prompts: list[list[int]]) -> list[GenerationRequest]:
    """One engine request per choice, prompt-major (choice index = prompt * n + j)."""
    requests, fields = [], body.model_dump()  # once: a body may hold a long chat
    for ids in prompts:
        # verify.binding's rules, so the node serves exactly what a client's binding check expects
        max_tokens = requested_max_tokens(fields) or default_max_tokens(body.endpoint, len(ids), served.loaded.max_context)
        for j in range(body.choices_per_prompt):
            seed = choice_seed(fields, j)  # seed + j
            params = requested_sampling(fields, max_tokens=max_tokens, seed=secrets.randbits(64) if seed is None else seed)
            requests.append(GenerationRequest(tuple(ids), params, "node" if seed is None else "client"))
    return requests


async def _respond(request: web.Request, served: ServedModel, body: SamplingRequest, prompts: list[list[int]],
                   renderer: "Renderer") -> web.StreamResponse:
    node = request.app[NODE]
    prompt_tokens = sum(len(p) for p in prompts)
    async with aclosing(node.answers(served, _generation_requests(served, body, prompts))) as answers:
        if not body.stream:
            by_choice: dict[int, list[ChoiceEvent]] = defaultdict(list)
            async for item in answers:
                by_choice[item.index].append(item)
            return _json(renderer.response([by_choice[i] for i in sorted(by_choice)], prompt_tokens))
        first = await anext(answers)  # errors before the first token become plain JSON errors
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        await _stream(response, first, answers, renderer, prompt_tokens, body.include_usage)
        return response


async def _stream(response: web.StreamResponse, first: ChoiceEvent, rest: AsyncIterator[ChoiceEvent],
                  renderer: "Renderer", prompt_tokens: int, include_usage: bool) -> None:
    """Write every event as an SSE chunk; never raises once the headers are out."""
    completion_tokens = 0

    async def send(item: ChoiceEvent) -> None:
        nonlocal completion_tokens
        chunk = renderer.chunk(item)
        if chunk is not None:
            await _send(response, chunk)
        if item.event.result is not None:
            completion_tokens += len(item.event.result.output_ids)

    try:
        await send(first)
        async for item in rest:
            await send(item)
        if include_usage:
            await _send(response, renderer.usage_chunk(UsageInfo.of(prompt_tokens, completion_tokens)))
        await response.write(b"data: [DONE]\n\n")
    except ConnectionResetError:
        return  # the client left; leaving ``answers`` cancels its choices
    except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band, as OpenAI does
        try:
            await _send(response, api_error_of(exc).body())
            await response.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            return


async def _send(response: web.StreamResponse, chunk: BaseModel) -> None:
    await response.write(b"data: " + chunk.model_dump_json().encode() + b"\n\n")


def _json(model: BaseModel) -> web.Response:
    return web.Response(body=model.model_dump_json(), content_type="application/json")


# ---------------------------------------------------------------------- rendering


class Renderer(ABC):
    """How one endpoint turns choice events into its response, stream chunks and usage chunk."""

    id_prefix = ""

    def __init__(self, served: ServedModel, body: SamplingRequest):
        self.served = served
        self.id = f"{self.id_prefix}-{secrets.token_hex(12)}"
        self.top_n = body.top_logprobs_count()
        self.common = {"id": self.id, "model": served.name, "system_fingerprint": served.loaded.backend}

    @abstractmethod
    def response(self, choices: list[list[ChoiceEvent]], prompt_tokens: int) -> BaseModel:
        """The whole answer as one JSON document."""

    @abstractmethod
    def chunk(self, item: ChoiceEvent) -> BaseModel | None:
        """The SSE chunk for one event (None: nothing to send)."""

    @abstractmethod
    def usage_chunk(self, usage: UsageInfo) -> BaseModel:
        """The last chunk of a stream with include_usage."""

    @staticmethod
    def usage(choices: list[list[ChoiceEvent]], prompt_tokens: int) -> UsageInfo:
        return UsageInfo.of(prompt_tokens, sum(len(c[-1].event.result.output_ids) for c in choices))


class CompletionRenderer(Renderer):
    id_prefix = "cmpl"

    def __init__(self, served: ServedModel, body: SamplingRequest):
        super().__init__(served, body)
        self._offsets: dict[int, int] = defaultdict(int)  # text streamed so far, per choice

    def response(self, choices: list[list[ChoiceEvent]], prompt_tokens: int) -> CompletionResponse:
        out = []
        for items in choices:
            last = items[-1]
            result = last.event.result
            logprobs = None
            if self.top_n is not None:
                logprobs = CompletionLogprobs.of([i.event for i in items], self.top_n, self.served.token_text)
            out.append(CompletionChoice(index=last.index, text=result.text, logprobs=logprobs,
                                        finish_reason=result.finish_reason, proofmesh=last.proof))
        return CompletionResponse(**self.common, choices=out, usage=self.usage(choices, prompt_tokens),
                                  proofmesh=out[0].proofmesh)

    def chunk(self, item: ChoiceEvent) -> CompletionResponse | None:
        event = item.event
        if not event.text and self.top_n is None and event.finish_reason is None:
            return None
        logprobs = None
        if self.top_n is not None:
            logprobs = CompletionLogprobs.of([event], self.top_n, self.served.token_text, self._offsets[item.index])
        self._offsets[item.index] += len(event.text)
        choice = CompletionChoice(index=item.index, text=event.text, logprobs=logprobs, finish_reason=event.finish_reason)
        return CompletionResponse(**self.common, choices=[choice], proofmesh=item.proof)

    def usage_chunk(self, usage: UsageInfo) -> CompletionResponse:
        return CompletionResponse(**self.common, choices=[], usage=usage)


class ChatRenderer(Renderer):
    id_prefix = "chatcmpl"

    def __init__(self, served: ServedModel, body: SamplingRequest):
        super().__init__(served, body)
        self._started: set[int] = set()  # choices whose first delta (with the role) went out

    def _logprobs(self, items: list[ChoiceEvent]) -> ChatLogprobs | None:
        if self.top_n is None:
            return None
        return ChatLogprobs.of([i.event for i in items], self.top_n, self.served.token_text)

    def response(self, choices: list[list[ChoiceEvent]], prompt_tokens: int) -> ChatCompletionResponse:
        out = []
        for items in choices:
            last = items[-1]
            result = last.event.result
            out.append(ChatChoice(index=last.index, message=AssistantMessage(content=result.text),
                                  logprobs=self._logprobs(items), finish_reason=result.finish_reason, proofmesh=last.proof))
        return ChatCompletionResponse(**self.common, choices=out, usage=self.usage(choices, prompt_tokens),
                                      proofmesh=out[0].proofmesh)

    def chunk(self, item: ChoiceEvent) -> ChatCompletionChunk | None:
        event = item.event
        first = item.index not in self._started
        if not (first or event.text or self.top_n is not None or event.finish_reason):
            return None
        self._started.add(item.index)
        delta = DeltaMessage(role="assistant" if first else None, content=event.text if (event.text or first) else None)
        choice = ChatChunkChoice(index=item.index, delta=delta, logprobs=self._logprobs([item]),
                                 finish_reason=event.finish_reason)
        return ChatCompletionChunk(**self.common, choices=[choice], proofmesh=item.proof)

    def usage_chunk(self, usage: UsageInfo) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.common, choices=[], usage=usage)

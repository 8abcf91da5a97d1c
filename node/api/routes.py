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

import asyncio
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
    ServedToolCall,
    UsageInfo,
)
from node.api.clients import CLIENT
from node.api.errors import api_error_of, parse_body
from node.api.service import NODE, ChoiceEvent, ServedModel
from verify.binding import choice_seed, default_max_tokens, requested_max_tokens, requested_sampling
from verify.structured import TOOL_CALL_OPEN, ToolCall, read_tool_calls, tools_in_effect

routes = web.RouteTableDef()


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    return _json(ModelList(data=request.app[NODE].model_cards()))


# Templating and tokenizing (up to ``MAX_PROMPT_CHARS`` of text, ``MAX_MESSAGES`` messages) and
# compiling a request's grammar run on worker threads: the event loop stays free for everyone else.


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    body = await parse_body(request, CompletionRequest)
    served = request.app[NODE].model(body.model)
    tok = served.loaded.tokenizer
    prompts = await asyncio.to_thread(lambda: [tok.encode_prompt(p) if isinstance(p, str) else p for p in body.prompts()])
    return await _respond(request, served, body, prompts, CompletionRenderer(served, body))


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await parse_body(request, ChatCompletionRequest)
    served = request.app[NODE].model(body.model)
    renderer = ChatRenderer(served, body)
    prompt = await asyncio.to_thread(served.loaded.tokenizer.encode_chat, [m.for_template() for m in body.messages],
                                     renderer.functions)
    return await _respond(request, served, body, [prompt], renderer)


# ---------------------------------------------------------------------- the shared path


def _generation_requests(served: ServedModel, body: SamplingRequest, prompts: list[list[int]],
                         client: str) -> list[GenerationRequest]:
    """One engine request per choice, prompt-major (choice index = prompt * n + j), each ``client``'s."""
    requests, fields = [], body.model_dump(by_alias=True)  # once: a body may hold a long chat
    for ids in prompts:
        # verify.binding's rules, so the node serves exactly what a client's binding check expects
        max_tokens = requested_max_tokens(fields) or default_max_tokens(body.endpoint, len(ids), served.loaded.max_context)
        for j in range(body.choices_per_prompt):
            seed = choice_seed(fields, j)  # seed + j
            params = requested_sampling(fields, max_tokens=max_tokens, seed=secrets.randbits(64) if seed is None else seed)
            requests.append(GenerationRequest(tuple(ids), params, "node" if seed is None else "client", client))
    return requests


async def _respond(request: web.Request, served: ServedModel, body: SamplingRequest, prompts: list[list[int]],
                   renderer: "Renderer") -> web.StreamResponse:
    node = request.app[NODE]
    prompt_tokens = sum(len(p) for p in prompts)
    requests = await asyncio.to_thread(_generation_requests, served, body, prompts, request[CLIENT])
    async with aclosing(node.answers(served, requests)) as answers:
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
    """Chat responses. With tools in effect, an answer that is a tool call (``verify.structured``)
    is served as ``tool_calls`` with finish_reason ``"tool_calls"``; a stream holds back text that
    may still become a call until it cannot, or until the end."""

    id_prefix = "chatcmpl"

    def __init__(self, served: ServedModel, body: SamplingRequest):
        super().__init__(served, body)
        self._started: set[int] = set()  # choices whose first delta (with the role) went out
        self.functions = tools_in_effect(body.model_dump(include={"tools", "tool_choice"}))
        self._held: dict[int, str] = defaultdict(str)  # text that may be the start of a tool call
        self._plain: set[int] = set()  # choices known to be text

    def _logprobs(self, items: list[ChoiceEvent]) -> ChatLogprobs | None:
        if self.top_n is None:
            return None
        return ChatLogprobs.of([i.event for i in items], self.top_n, self.served.token_text)

    def _calls(self, last: ChoiceEvent) -> list[ToolCall] | None:
        result = last.event.result
        if not self.functions or result.finish_reason != "stop":
            return None
        return read_tool_calls(result.text, self.functions)

    def response(self, choices: list[list[ChoiceEvent]], prompt_tokens: int) -> ChatCompletionResponse:
        out = []
        for items in choices:
            last = items[-1]
            result = last.event.result
            calls = self._calls(last)
            message = AssistantMessage(content=result.text)
            if calls:
                message = AssistantMessage(content=None, tool_calls=ServedToolCall.of(calls, last.proof.receipt.receipt_id))
            out.append(ChatChoice(index=last.index, message=message, logprobs=self._logprobs(items),
                                  finish_reason="tool_calls" if calls else result.finish_reason, proofmesh=last.proof))
        return ChatCompletionResponse(**self.common, choices=out, usage=self.usage(choices, prompt_tokens),
                                      proofmesh=out[0].proofmesh)

    def _visible(self, item: ChoiceEvent) -> str:
        """The text to send now: held back while it may still open a tool call."""
        if not self.functions or item.index in self._plain:
            return item.event.text
        held = self._held[item.index] + item.event.text
        opening = held.lstrip()
        if item.event.finish_reason is None and (TOOL_CALL_OPEN.startswith(opening) or opening.startswith(TOOL_CALL_OPEN)):
            self._held[item.index] = held
            return ""
        self._plain.add(item.index)
        self._held.pop(item.index, None)
        return held

    def chunk(self, item: ChoiceEvent) -> ChatCompletionChunk | None:
        event = item.event
        first = item.index not in self._started
        calls = self._calls(item) if event.finish_reason is not None else None
        text = "" if calls else self._visible(item)
        if not (first or text or self.top_n is not None or event.finish_reason):
            return None
        self._started.add(item.index)
        delta = DeltaMessage(role="assistant" if first else None, content=text if (text or first) else None,
                             tool_calls=ServedToolCall.of(calls, item.proof.receipt.receipt_id, streamed=True) if calls else None)
        choice = ChatChunkChoice(index=item.index, delta=delta, logprobs=self._logprobs([item]),
                                 finish_reason="tool_calls" if calls else event.finish_reason)
        return ChatCompletionChunk(**self.common, choices=[choice], proofmesh=item.proof)

    def usage_chunk(self, usage: UsageInfo) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.common, choices=[], usage=usage)

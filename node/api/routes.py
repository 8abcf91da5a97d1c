"""OpenAI-style routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

Both generation endpoints share one path (``_respond``): parse, convert once into what the
request asks for (``SamplingRequest.to_asked``: prompt ids, every choice's sampling parameters),
make one engine request per choice (``node.api.conversion``), then either collect the answers
into one JSON response or stream them as server-sent events in OpenAI's chunk format, ending
with ``data: [DONE]``. How answers look is ``node.api.rendering``'s.

A stream sends its headers once the first token of any choice is ready. Every choice is
submitted to the engine before that, so admission errors (queue full, prompt too long) are
ordinary JSON errors with their status. Later errors arrive as an ``{"error": ...}`` event,
which the openai client raises.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from contextlib import aclosing
from typing import AsyncIterator

from aiohttp import web
from pydantic import BaseModel

from node.api.clients import CLIENT
from node.api.conversion import generation_requests
from node.api.errors import api_error_of, parse_body
from node.api.protocol import ChatCompletionRequest, CompletionRequest, ModelList, SamplingRequest, UsageInfo
from node.api.rendering import ChoiceEvent, Renderer, make_renderer
from node.api.server import json_response
from node.api.service import NODE

routes = web.RouteTableDef()


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    return json_response(ModelList(data=request.app[NODE].model_cards()))


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await _respond(request, await parse_body(request, CompletionRequest))


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _respond(request, await parse_body(request, ChatCompletionRequest))


# ---------------------------------------------------------------------- the shared path


async def _respond(request: web.Request, body: SamplingRequest) -> web.StreamResponse:
    node = request.app[NODE]
    served = node.model(body.model)
    # Templating and tokenizing (up to MAX_PROMPT_CHARS of text in MAX_MESSAGES messages) and compiling
    # a grammar run on a worker thread: the event loop stays free for everyone else.
    asked = await asyncio.to_thread(body.to_asked, served.loaded.tokenizer, served.loaded.max_context)
    renderer = make_renderer(served.name, served.loaded.backend, served.token_texts, asked)
    async with aclosing(node.answers(served, generation_requests(asked, request[CLIENT]))) as answers:
        if not body.stream:
            by_choice: dict[int, list[ChoiceEvent]] = defaultdict(list)
            async for item in answers:
                by_choice[item.index].append(item)
            return json_response(renderer.response([by_choice[i] for i in sorted(by_choice)], asked.prompt_tokens))
        first = await anext(answers)  # errors before the first token become plain JSON errors
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        await _stream(response, first, answers, renderer, asked.prompt_tokens, body.include_usage)
        return response


async def _stream(response: web.StreamResponse, first: ChoiceEvent, rest: AsyncIterator[ChoiceEvent],
                  renderer: Renderer, prompt_tokens: int, include_usage: bool) -> None:
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

"""How an answer becomes what a client reads: OpenAI's response, its stream chunks and usage,
from the events of each choice (``node.runtime.events``).

The node renders its engine's events here; the verifier sidecar renders the same events rebuilt
from the signed answer files (``node.runtime.events.replay``), so a client behind the sidecar
reads what the node signed, laid out exactly as the node lays it out, and never the bytes an
upstream sent. The two endpoints differ only in how they render (``CompletionRenderer``,
``ChatRenderer``).

Stream chunks carry, as an extension, the ids of the tokens whose text they show
(``token_ids``): the sidecar rebuilds a stream's text from them as it goes, and binds them to the
committed output ids at the end.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass

from pydantic import BaseModel

from node.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    ProofMeshInfo,
    ServedToolCall,
    UsageInfo,
)
from node.models.tokenizer import TextTokenizer
from node.runtime.events import TokenEvent
from verify.binding import Asked
from verify.structured import TOOL_CALL_OPEN, ToolCall, read_tool_calls


@dataclass(frozen=True)
class ChoiceEvent:
    index: int  # the choice this event belongs to
    event: TokenEvent
    proof: ProofMeshInfo | None  # set on the choice's last event: its signed receipt


class TokenTexts:
    """One token's own text (special tokens spelled out), cached: logprobs ask for it per token."""

    def __init__(self, tokenizer: TextTokenizer):
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text


class Renderer(ABC):
    """How one endpoint turns choice events into its response, stream chunks and usage chunk.
    The whole response is one loop over the choices (here); how one choice looks is the
    endpoint's (``choice``)."""

    id_prefix = ""
    response_model: type[CompletionResponse | ChatCompletionResponse]

    def __init__(self, model: str, backend: str | None, token_text: TokenTexts, asked: Asked):
        """``model``: the name the client asked for; ``backend``: the system fingerprint (the
        backend receipts name); ``asked``: what the request asked for (logprobs, tools)."""
        self.token_text = token_text
        self.id = f"{self.id_prefix}-{secrets.token_hex(12)}"
        self.top_n = asked.top_n
        self.common = {"id": self.id, "model": model, "system_fingerprint": backend}
        self._unsent: dict[int, list[int]] = defaultdict(list)  # token ids no chunk has carried yet, per choice

    def _token_ids(self, item: ChoiceEvent, sending: bool) -> list[int] | None:
        """The ids a chunk for ``item`` carries: its own and those of earlier events that sent none."""
        self._unsent[item.index].append(item.event.token_id)
        return self._unsent.pop(item.index) if sending else None

    def response(self, choices: list[list[ChoiceEvent]], prompt_tokens: int) -> CompletionResponse | ChatCompletionResponse:
        """The whole answer as one JSON document (the top-level proof: the first choice's)."""
        out = [self.choice(items, "".join(i.event.text for i in items)) for items in choices]
        usage = UsageInfo.of(prompt_tokens, sum(len(c) for c in choices))  # one event per output token
        return self.response_model(**self.common, choices=out, usage=usage, proofmesh=out[0].proofmesh)

    @abstractmethod
    def choice(self, items: list[ChoiceEvent], text: str) -> CompletionChoice | ChatChoice:
        """One choice of the whole answer, from its events (``text``: theirs, joined)."""

    @abstractmethod
    def chunk(self, item: ChoiceEvent) -> BaseModel | None:
        """The SSE chunk for one event (None: nothing to send)."""

    @abstractmethod
    def usage_chunk(self, usage: UsageInfo) -> BaseModel:
        """The last chunk of a stream with include_usage."""


class CompletionRenderer(Renderer):
    id_prefix = "cmpl"
    response_model = CompletionResponse

    def __init__(self, model: str, backend: str | None, token_text: TokenTexts, asked: Asked):
        super().__init__(model, backend, token_text, asked)
        self._offsets: dict[int, int] = defaultdict(int)  # text streamed so far, per choice

    def choice(self, items: list[ChoiceEvent], text: str) -> CompletionChoice:
        last = items[-1]
        logprobs = None
        if self.top_n is not None:
            logprobs = CompletionLogprobs.of([i.event for i in items], self.top_n, self.token_text)
        return CompletionChoice(index=last.index, text=text, logprobs=logprobs, finish_reason=last.event.finish_reason,
                                proofmesh=last.proof)

    def chunk(self, item: ChoiceEvent) -> CompletionResponse | None:
        event = item.event
        if not event.text and self.top_n is None and event.finish_reason is None:
            self._token_ids(item, sending=False)
            return None
        logprobs = None
        if self.top_n is not None:
            logprobs = CompletionLogprobs.of([event], self.top_n, self.token_text, self._offsets[item.index])
        self._offsets[item.index] += len(event.text)
        choice = CompletionChoice(index=item.index, text=event.text, logprobs=logprobs, finish_reason=event.finish_reason,
                                  token_ids=self._token_ids(item, sending=True))
        return CompletionResponse(**self.common, choices=[choice], proofmesh=item.proof)

    def usage_chunk(self, usage: UsageInfo) -> CompletionResponse:
        return CompletionResponse(**self.common, choices=[], usage=usage)


class ChatRenderer(Renderer):
    """Chat responses. With tools in effect, an answer that is a tool call (``verify.structured``)
    is served as ``tool_calls`` with finish_reason ``"tool_calls"``; a stream holds back text that
    may still become a call until it cannot, or until the end."""

    id_prefix = "chatcmpl"
    response_model = ChatCompletionResponse

    def __init__(self, model: str, backend: str | None, token_text: TokenTexts, asked: Asked):
        super().__init__(model, backend, token_text, asked)
        self._started: set[int] = set()  # choices whose first delta (with the role) went out
        self.functions = asked.tools
        self._held: dict[int, str] = defaultdict(str)  # text that may be the start of a tool call
        self._plain: set[int] = set()  # choices known to be text
        self._texts: dict[int, str] = defaultdict(str)  # a streamed choice's whole text so far

    def _logprobs(self, items: list[ChoiceEvent]) -> ChatLogprobs | None:
        if self.top_n is None:
            return None
        return ChatLogprobs.of([i.event for i in items], self.top_n, self.token_text)

    def _calls(self, text: str, finish_reason: str | None) -> list[ToolCall] | None:
        """The tool calls a finished answer's whole text makes (None: it is text)."""
        if not self.functions or finish_reason != "stop":
            return None
        return read_tool_calls(text, self.functions)

    def choice(self, items: list[ChoiceEvent], text: str) -> ChatChoice:
        last = items[-1]
        calls = self._calls(text, last.event.finish_reason)
        message = AssistantMessage(content=text)
        if calls:
            message = AssistantMessage(content=None, tool_calls=ServedToolCall.of(calls, last.proof.receipt.receipt_id))
        return ChatChoice(index=last.index, message=message, logprobs=self._logprobs(items),
                          finish_reason="tool_calls" if calls else last.event.finish_reason, proofmesh=last.proof)

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
        self._texts[item.index] += event.text
        calls = self._calls(self._texts[item.index], event.finish_reason)
        text = "" if calls else self._visible(item)
        if not (first or text or self.top_n is not None or event.finish_reason):
            self._token_ids(item, sending=False)
            return None
        self._started.add(item.index)
        delta = DeltaMessage(role="assistant" if first else None, content=text if (text or first) else None,
                             tool_calls=ServedToolCall.of(calls, item.proof.receipt.receipt_id, streamed=True) if calls else None)
        choice = ChatChunkChoice(index=item.index, delta=delta, logprobs=self._logprobs([item]),
                                 finish_reason="tool_calls" if calls else event.finish_reason,
                                 token_ids=self._token_ids(item, sending=True))
        return ChatCompletionChunk(**self.common, choices=[choice], proofmesh=item.proof)

    def usage_chunk(self, usage: UsageInfo) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.common, choices=[], usage=usage)


def make_renderer(model: str, backend: str | None, token_text: TokenTexts, asked: Asked) -> Renderer:
    """The renderer of the endpoint ``asked`` came to (see ``Renderer.__init__``)."""
    kind = ChatRenderer if asked.endpoint == "chat" else CompletionRenderer
    return kind(model, backend, token_text, asked)

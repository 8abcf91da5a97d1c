"""OpenAI wire models for the node's HTTP API (OpenAI API reference: Completions, Chat
Completions, Models, error objects), modeled on vLLM's ``entrypoints/openai/protocol.py``.

Requests accept fields they do not know (clients send many; they are logged and ignored) but
validate the fields they do know strictly: a string where a number belongs is a 400, never a
silent coercion. A few OpenAI features this node cannot honour (logit_bias, echo, audio, ...)
are rejected rather than ignored, so a client never gets an answer to a question it did not ask.
A validated request is converted once (``SamplingRequest.to_asked``, as vLLM's
``to_sampling_params``) into ``verify.binding.Asked``: the prompt ids and every choice's sampling
parameters by the rules a client's binding check expects, so the engine never sees API objects.

Responses add a ``proofmesh`` object (receipt, signature, public key, backend, evidence token): on the response
and on each choice (with ``n > 1`` every choice has its own receipt; the top-level one is the
first choice's), and on the stream chunk that carries a choice's ``finish_reason``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Annotated, Any, Callable, ClassVar, Literal, Sequence

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from verify.binding import Asked, Endpoint, Tokenization, asked_of, call_id, completion_top, token_bytes
from verify.evidence import FINGERPRINT_K
from verify.receipts import FinishReason, Receipt
from verify.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS, U64
from verify.structured import ToolCall

if TYPE_CHECKING:  # the wire models never load the engine (nor TVM) at run time
    from node.runtime.events import TokenEvent

log = logging.getLogger(__name__)

MAX_CHOICES = 16  # prompts x n per request: one request must not fill the batch alone
# A request's cost is bounded before it is templated, tokenized or scheduled (attack 8 of issue
# 21: 29,000 one-letter messages in a 1 MiB body cost 0.5-0.8 s of parsing, templating and
# tokenizing each). Messages: a long agent conversation runs to a few hundred; each one costs its
# validation and its pass through the template. Characters: prompt text, all of it together;
# 256 Ki characters is ~64k tokens at 4 characters a token, more than any context served here
# (the default model's 8,192 tokens are ~40 KB of text), so only a prompt that could never fit
# is refused, before the tokenizer is made to read it.
MAX_MESSAGES = 1024
MAX_PROMPT_CHARS = 1 << 18
# Tools per chat request, bounded before they cost anything, for the same reason: each one is
# described in the prompt (templated by the node and again by every client that binds the
# answer) and, under a forced tool choice, joins the call grammar every verifier compiles.
# (OpenAI allows 128.)
MAX_TOOLS = 64
MAX_TOP_LOGPROBS = FINGERPRINT_K  # top logprobs come from the committed top-k fingerprints
# Below this a temperature is greedy in all but name, and logits / T can overflow float64 (a
# failed sampling step would fail the whole batch): 0 is how to ask for greedy.
MIN_TEMPERATURE = 1e-4

def _encodable(text: str) -> str:
    """JSON can spell a lone surrogate (``"\\udc80"``), which is no text: refuse it at the edge
    (the tokenizer would fail on it mid-request)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode text (a lone surrogate at {exc.start})") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
TokenText = Callable[[int], str]  # token id -> its text, for logprobs


# ---------------------------------------------------------------------- errors


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---------------------------------------------------------------------- requests


class OpenAIRequest(BaseModel):
    """Base of every request: unknown fields allowed (and logged), known fields strict."""

    model_config = ConfigDict(extra="allow", strict=True)

    # Fields OpenAI defines that this node cannot honour: a truthy value is a 400.
    unsupported: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in cls.unsupported:
                if data.get(name) not in (None, False, [], {}):
                    raise ValueError(f"'{name}' is not supported by this node")
        return data

    @model_validator(mode="after")
    def _log_unknown(self) -> "OpenAIRequest":
        if self.model_extra:
            log.info("ignoring unknown request fields: %s", ", ".join(sorted(self.model_extra)))
        return self


class StreamOptions(OpenAIRequest):
    include_usage: bool = False


class TextFormat(OpenAIRequest):
    type: Literal["text"]


class JsonObjectFormat(OpenAIRequest):
    type: Literal["json_object"]


class JsonSchema(OpenAIRequest):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(OpenAIRequest):
    type: Literal["json_schema"]
    json_schema: JsonSchema


class GrammarFormat(OpenAIRequest):
    """Extension: a Lark grammar in llguidance's dialect (``verify.grammar``)."""

    type: Literal["grammar"]
    grammar: Annotated[Text, Field(min_length=1)]


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat | GrammarFormat, Field(discriminator="type")]
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class SamplingRequest(OpenAIRequest):
    """Fields both endpoints share, in the order of OpenAI's reference; ``None`` = default.
    ``response_format`` (and a chat's ``tools``) become the answer's grammar: ``verify.structured``."""

    model: Text
    frequency_penalty: Penalty | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    presence_penalty: Penalty | None = None
    response_format: ResponseFormat | None = None
    seed: Annotated[int, Field(ge=0, lt=U64)] | None = None
    stop: Text | list[Text] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    user: Text | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # extension (as vLLM): 0 disables

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        """As OpenAI caps them, and each of bounded length (``verify.sampling`` says why): checked
        here, before the prompt is tokenized or anything is stored."""
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, each of 1 to {MAX_STOP_CHARS} characters")
        return value

    @field_validator("temperature")
    @classmethod
    def _not_vanishing(cls, value: float | None) -> float | None:
        if value is not None and 0.0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return value

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    endpoint: ClassVar[Endpoint]  # which default budget applies (``verify.binding.default_max_tokens``)

    def to_asked(self, tokenizer: Tokenization, max_context: int) -> Asked:
        """The one conversion at the edge: this request's prompt ids and every choice's sampling
        parameters (``verify.binding.asked_of``, the rules a client's binding check holds the
        answer to; its body as the client sent it converts alike). ``max_context``: the serving
        model's. Templates, tokenizes and compiles the grammar: call it off the event loop.
        Raises ``GrammarError`` for a schema, grammar or tool choice that cannot be compiled."""
        return asked_of(self.endpoint, self.model_dump(by_alias=True), tokenizer, max_context)


class CompletionRequest(SamplingRequest):
    """POST /v1/completions. ``prompt``: a string, token ids, or a batch of either."""

    unsupported: ClassVar[tuple[str, ...]] = ("suffix", "echo", "logit_bias")
    endpoint: ClassVar[Endpoint] = "completions"

    prompt: Text | list[Text] | TokenIds | list[TokenIds]
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts, each a string or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: list | str) -> list | str:
        if isinstance(value, list) and not value:
            raise ValueError("the prompt list must not be empty")
        texts = [value] if isinstance(value, str) else [p for p in value if isinstance(p, str)]
        _check_prompt_chars(sum(map(len, texts)))
        return value

    @model_validator(mode="after")
    def _check_batch(self) -> "CompletionRequest":
        if len(self.prompts()) * self.choices_per_prompt > MAX_CHOICES:
            raise ValueError(f"prompts x n must be at most {MAX_CHOICES}")
        return self


class TextPart(OpenAIRequest):
    type: Literal["text"]
    text: Text


class CalledFunction(OpenAIRequest):
    name: FunctionName
    arguments: Text


class MessageToolCall(OpenAIRequest):
    id: Text
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(OpenAIRequest):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None  # None only for an assistant's tool calls
    name: Text | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: Text | None = None

    @model_validator(mode="after")
    def _has_content(self) -> "ChatMessage":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text_chars(self) -> int:
        """Characters of text this message brings to the prompt (content, name, call arguments)."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        calls = sum(len(c.function.arguments) + len(c.function.name) for c in self.tool_calls or [])
        return len(content) + len(self.name or "") + calls


class FunctionDefinition(OpenAIRequest):
    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; the grammar checks it compiles
    strict: bool | None = None


class Tool(OpenAIRequest):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIRequest):
    name: FunctionName


class NamedToolChoice(OpenAIRequest):
    type: Literal["function"]
    function: NamedFunction



class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    unsupported: ClassVar[tuple[str, ...]] = ("functions", "function_call", "logit_bias", "audio")
    endpoint: ClassVar[Endpoint] = "chat"

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted; a forced choice makes exactly one call
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _few_enough(cls, value: Any) -> Any:
        """Counted before any message is validated: too many costs nothing but this."""
        if isinstance(value, list) and len(value) > MAX_MESSAGES:
            raise ValueError(f"{len(value):,} messages; at most {MAX_MESSAGES:,} are served")
        return value

    @field_validator("messages")
    @classmethod
    def _short_enough(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        _check_prompt_chars(sum(m.text_chars() for m in value))
        return value

    @model_validator(mode="after")
    def _check_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("'tool_choice' other than 'none' or 'auto' needs 'tools'")
        return self


def _check_prompt_chars(chars: int) -> None:
    if chars > MAX_PROMPT_CHARS:
        raise ValueError(f"{chars:,} characters of prompt text; at most {MAX_PROMPT_CHARS:,} are served")


# ---------------------------------------------------------------------- responses


class _LeavesOutNone(BaseModel):
    """A response part that leaves out the fields named in ``left_out_when_none`` (``None``:
    every field) while they are None, as OpenAI's objects do (a delta names only what changed)."""

    left_out_when_none: ClassVar[tuple[str, ...] | None] = None

    @model_serializer(mode="wrap")
    def _leave_out_none(self, handler) -> dict[str, Any]:
        names = self.left_out_when_none
        return {k: v for k, v in handler(self).items() if v is not None or (names is not None and k not in names)}


class ProofMeshInfo(BaseModel):
    """What lets a client check an answer: the signed receipt and who signed it, and the token
    that opens its answer file (``GET /v1/receipts/{id}?token=``; ``node.api.evidence_tokens``).
    The token is the asking client's alone: it is in no receipt or answer file (those are shown
    to others), only here."""

    receipt: Receipt
    signature: str
    public_key: str
    backend: str
    evidence_token: str


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "UsageInfo":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]

    @classmethod
    def of(cls, events: Sequence[TokenEvent], top_n: int, token_text: TokenText, start: int = 0) -> "CompletionLogprobs":
        """``start``: the text offset of the first event (earlier chunks of a stream)."""
        tokens = [token_text(e.token_id) for e in events]
        offsets = []
        for tok in tokens:
            offsets.append(start)
            start += len(tok)
        tops = [completion_top([(token_text(i), lp) for i, lp in e.top_logprobs[:top_n]], (token_text(e.token_id), e.logprob))
                for e in events]
        return cls(tokens=tokens, token_logprobs=[e.logprob for e in events], top_logprobs=tops, text_offset=offsets)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None

    @classmethod
    def of(cls, token_id: int, logprob: float, token_text: TokenText) -> "TopLogprob":
        text = token_text(token_id)
        return cls(token=text, logprob=logprob, bytes=token_bytes(text))


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None = None

    @classmethod
    def of(cls, events: Sequence[TokenEvent], top_n: int, token_text: TokenText) -> "ChatLogprobs":
        content = []
        for e in events:
            head = TopLogprob.of(e.token_id, e.logprob, token_text)
            tops = [TopLogprob.of(i, lp, token_text) for i, lp in e.top_logprobs[:top_n]]
            content.append(TokenLogprob(**head.model_dump(), top_logprobs=tops))
        return cls(content=content)


class _StreamedTokenIds(_LeavesOutNone):
    """Extension of a stream chunk's choice: the ids of the tokens whose text it shows (the
    verifier sidecar rebuilds a stream's text from them); left out where unset."""

    left_out_when_none: ClassVar[tuple[str, ...]] = ("token_ids",)
    token_ids: list[int] | None = None


class CompletionChoice(_StreamedTokenIds):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    proofmesh: ProofMeshInfo | None = None


class _ResponseHead(BaseModel):
    """What every completion, chat completion and chunk starts with."""

    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    proofmesh: ProofMeshInfo | None = None


class CompletionResponse(_ResponseHead):
    """A completion, and also each chunk of a completion stream (OpenAI uses one shape)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ServedFunction(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI serves it


class ServedToolCall(_LeavesOutNone):
    index: int | None = None  # streams only: which call a delta belongs to
    id: str
    type: Literal["function"] = "function"
    function: ServedFunction

    @classmethod
    def of(cls, calls: Sequence[ToolCall], receipt_id: str, streamed: bool = False) -> list["ServedToolCall"]:
        """Call ids follow from the receipt, so the same answer always names its calls alike."""
        return [cls(index=k if streamed else None, id=call_id(receipt_id, k),
                    function=ServedFunction(name=c.name, arguments=c.arguments_json)) for k, c in enumerate(calls)]


ServedFinishReason = FinishReason | Literal["tool_calls"]


class AssistantMessage(_LeavesOutNone):
    left_out_when_none: ClassVar[tuple[str, ...]] = ("tool_calls",)  # content and refusal are shown as null
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ServedToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: ServedFinishReason
    proofmesh: ProofMeshInfo | None = None


class ChatCompletionResponse(_ResponseHead):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(_LeavesOutNone):
    """OpenAI's deltas name only what changed: the role once, then content."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ServedToolCall] | None = None


class ChatChunkChoice(_StreamedTokenIds):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: ServedFinishReason | None = None


class ChatCompletionChunk(_ResponseHead):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "proofmesh"
    model_id: str  # sha256 of the model's manifest: what receipts name
    backend: str
    max_context: int
    format: str | None = None  # the checkpoint's stored weight types ("gguf:F32+Q4_1+Q8_0"); None for a peer's offer
    peers: list[str] | None = None  # a model served through the network: the peers that serve it


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

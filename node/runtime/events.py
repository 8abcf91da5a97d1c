"""What an answer is made of: the request the engine serves (``GenerationRequest``), the events
it streams token by token (the last one holds the finished answer, ``GenerationResult``), and the
same events rebuilt from a signed answer file. No model code: the verifier sidecar uses it too.

An answer's text, finish and logprobs are functions of its output ids, its sampling parameters
(stop strings, max_tokens), the tokenizer and its fingerprints. ``AnswerText`` is that function
for text and finish, applied one token at a time; the engine runs it while generating and
``replay`` runs it over an answer file's committed ids. So the verifier sidecar can serve a
client the very events a node's engine made, built from what the node signed and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from node.models.tokenizer import IncrementalDecoder, TextTokenizer
from verify.evidence import AnswerFile, Fingerprint
from verify.finish import StopChecker
from verify.receipts import FinishReason, SeedSource
from verify.sampling import SamplingParams

@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    seed_source: SeedSource = "node"  # who chose params.seed (committed in the receipt)
    # Who asked (``node.api.clients.client_identity``): the queue, the slots and the prefill
    # are shared out by it. Requests that name none (the CLI, benches) are one client.
    client: str = ""


@dataclass
class GenerationResult:
    """Everything about a finished answer: what receipts and evidence are made of."""

    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: FinishReason
    request_hash: str
    params: SamplingParams
    seed_source: SeedSource
    client: str  # who asked (``GenerationRequest.client``): whose share its evidence takes
    fingerprints: list[Fingerprint]  # per output position
    time_to_first_token: float
    duration: float

    @property
    def logprobs(self) -> list[float]:
        """Each output token's log-softmax, as its fingerprint commits it."""
        return [f.token_logprob() for f in self.fingerprints]


@dataclass(frozen=True)
class TokenEvent:
    """One step of one answer: a sampled token and the text it completed; the last one ends it."""

    token_id: int  # the sampled token (a stop token ends the answer and shows no text)
    text: str  # text that became safe to show with this token (may be empty)
    logprob: float  # log-softmax of the raw logits at this position
    # The fingerprint's top-k (token id, log-softmax) at this position, best first: what an API
    # serves as top_logprobs, normalised exactly as ``logprob`` is.
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: FinishReason | None = None
    result: "GenerationResult | None" = None  # set on the engine's last event

    @classmethod
    def of(cls, token_id: int, text: str, fingerprint: Fingerprint | None, finish_reason: FinishReason | None = None,
           result: "GenerationResult | None" = None) -> "TokenEvent":
        """The event of one position; its logprobs come from the position's fingerprint (none
        yet: a stream's token whose evidence has not arrived)."""
        if fingerprint is None:
            return cls(token_id, text, 0.0, (), finish_reason, result)
        return cls(token_id, text, fingerprint.token_logprob(), tuple(fingerprint.top_logprobs()), finish_reason, result)


class AnswerText:
    """The text an answer shows, token by token: incremental UTF-8-safe decoding, stop strings
    held back until decided, EOS and stop tokens shown as nothing (OpenAI's semantics)."""

    def __init__(self, tokenizer: TextTokenizer, params: SamplingParams):
        self._eos = frozenset(tokenizer.eos_token_ids)
        self._decoder = IncrementalDecoder(tokenizer)
        self._stop = StopChecker(params.stop, params.stop_token_ids)
        self._max_tokens = params.max_tokens
        self.n_tokens = 0
        self.finish_reason: FinishReason | None = None

    def push(self, token: int) -> tuple[str, FinishReason | None]:
        """The text that ``token`` makes safe to show, and the finish it causes (None: go on)."""
        if self.finish_reason is not None:
            raise ValueError("the answer has already finished")
        self.n_tokens += 1
        finish: FinishReason | None = None
        if token in self._eos or self._stop.check_token(token):
            finish = "stop"  # the stop token itself is not shown; text held back is released
            text = self._stop.feed_text(self._decoder.flush())[0] + self._stop.flush()
        else:
            at_limit = self.n_tokens >= self._max_tokens
            text, hit_stop = self._stop.feed_text(self._decoder.push(token) + (self._decoder.flush() if at_limit else ""))
            if hit_stop:
                finish = "stop"
            elif at_limit:
                finish = "length"
                text += self._stop.flush()
        self.finish_reason = finish
        return text, finish


def replay(answer: AnswerFile, tokenizer: TextTokenizer) -> list[TokenEvent]:
    """The events of a signed answer as the engine streamed them, rebuilt from its evidence.
    Tokens after the answer's finish (evidence an honest node never signs) end the replay."""
    ev = answer.evidence
    text = AnswerText(tokenizer, ev.sampling)
    events = []
    for token, fingerprint in zip(ev.output_ids, ev.fingerprints):
        shown, finish = text.push(token)
        events.append(TokenEvent.of(token, shown, fingerprint, finish))
        if finish is not None:
            break
    return events


__all__ = ["AnswerText", "GenerationRequest", "GenerationResult", "TokenEvent", "replay"]

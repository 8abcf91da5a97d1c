"""Answers in bulk, for calibration, the cheat suite and the verification benchmark.

A ``Generator`` is a runtime that answers under a *claimed* model id: honest when the runtime
holds that model's weights, a cheat when it does not (the engine binds request hashes and the
seeded noise to the claimed id, so a cheat's answers look right in every commitment).
``request_mix`` draws a reproducible spread of prompts and sampling parameters; with
``grammar_share`` some of them ask for structured output (``STRUCTURED``: JSON mode, a JSON
schema, a forced tool call), so their answers are drawn under a grammar's mask.

Why in tests/: no node, verifier or client runs this (a runtime that answers under any claimed id
is the cheat suite's tool, bulk answers are a workload); the tests of verification use it, and
the benches (``bench/calibrate.py``, ``bench/bench_cheats.py``, ...) import it from here, so the
tests never import bench/.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from node.api.service import answer_file
from node.runtime.engine import Engine, GenerationRequest
from node.runtime.loading import LoadedModel
from node.models.llama.reference import NumpyLlama
from node.runtime.model_runtime import ModelRuntime
from node.models.tokenizer import TextTokenizer
from verify.evidence import AnswerFile
from verify.identity import NodeKey
from verify.sampling import SamplingParams
from verify.structured import request_grammar, tools_in_effect

SYSTEM = "You are a helpful assistant who answers carefully and at length."
PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a map.",
    "Explain how a refrigerator works, step by step.",
    "What is the capital of France, and what is it famous for?",
    "Describe the water cycle to a ten-year-old.",
    "Give me a recipe for pancakes with all the steps.",
    "Why is the sky blue? Explain in detail.",
    "Write a poem about the sea in winter.",
    "List ten ideas for a weekend trip and say why each is good.",
    "How do vaccines train the immune system?",
    "Summarise the plot of a detective novel you invent.",
    "Tell me about the history of the printing press.",
    "Compare cats and dogs as pets.",
    "What should I know before learning to play the guitar?",
    "Explain what a prime number is, with examples.",
    "Write a letter to a friend describing a trip to the mountains.",
    "How does a bill become a law? Walk me through it.",
]
COMPLETIONS = [
    "The history of the printing press begins in",
    "Once upon a time, in a village by the river,",
    "def fibonacci(n):\n",
    "The three most important things about photosynthesis are",
    "In 1969, the first humans landed on the Moon. The mission",
]

# Structured output as clients ask for it (``verify.structured``): the request body's format
# fields, and questions that suit them. A schema with a few typed fields (bounded, so that a
# small model cannot write one string forever) and two tools, one of which must be called.
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 40},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "member", "tags"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                       "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "search_books", "description": "Search a library catalogue",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"},
                                                        "max_results": {"type": "integer", "minimum": 1, "maximum": 20}},
                       "required": ["query"], "additionalProperties": False}}},
]
STRUCTURED: dict[str, tuple[dict[str, Any], list[str]]] = {
    "json_object": ({"response_format": {"type": "json_object"}}, [
        "Describe a fictional person as a JSON object.",
        "Give me a pancake recipe as JSON, with ingredients and steps.",
        "Describe a city you would like to visit, as a JSON object.",
    ]),
    "json_schema": ({"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}}, [
        "Invent a library member: name, age, city, whether the membership is active, and a few tags.",
        "Describe a fictional lighthouse keeper.",
        "Tell me about a person who lives in Paris.",
    ]),
    "tool_call": ({"tools": TOOLS, "tool_choice": "required"}, [
        "What is the weather like in Paris today?",
        "Find me a few books about lighthouses.",
        "Is it cold in Oslo right now, in celsius?",
    ]),
}


@functools.lru_cache(maxsize=None)
def structured_grammar(kind: str) -> str:
    """The canonical grammar of a ``STRUCTURED`` kind (compiled once per process)."""
    return request_grammar(STRUCTURED[kind][0])


def structured_prompt(tokenizer: TextTokenizer, kind: str, question: str, system: bool = False) -> tuple[tuple[int, ...], str]:
    """Prompt ids and grammar of a chat request asking ``question`` in the ``kind`` format, as
    the node would build them (the tool prompt added for templates that do not know tools)."""
    body = STRUCTURED[kind][0]
    if tokenizer.chat_template is None:  # a base model: the question as a raw prompt, the grammar all the same
        return tuple(tokenizer.encode_prompt(question)), structured_grammar(kind)
    messages = ([{"role": "system", "content": SYSTEM}] if system else []) + [{"role": "user", "content": question}]
    return tuple(tokenizer.encode_chat(messages, tools_in_effect(body))), structured_grammar(kind)


class StructuredTurns:
    """Structured requests in turn: each ``STRUCTURED`` kind after the other, each kind's
    questions after the other; a kind whose prompt plus ``max_tokens`` does not fit
    ``max_context`` is passed over (a tiny model's context cannot hold the tool prompt)."""

    def __init__(self, tokenizer: TextTokenizer, max_context: int | None = None) -> None:
        self.tokenizer, self.max_context = tokenizer, max_context
        self.kinds, self.turn = list(STRUCTURED), 0
        self.asked = dict.fromkeys(self.kinds, 0)

    def next(self, max_tokens: int, system: bool = False) -> tuple[tuple[int, ...], str] | None:
        """(prompt ids, grammar) of the next structured request, or None when no kind fits."""
        for k in range(len(self.kinds)):
            kind = self.kinds[(self.turn + k) % len(self.kinds)]
            questions = STRUCTURED[kind][1]
            ids, grammar = structured_prompt(self.tokenizer, kind, questions[self.asked[kind] % len(questions)], system)
            if self.max_context is None or len(ids) + max_tokens <= self.max_context:
                self.turn, self.asked[kind] = (self.turn + k + 1) % len(self.kinds), self.asked[kind] + 1
                return ids, grammar
        return None


def with_structure(tokenizer: TextTokenizer, requests: Sequence[GenerationRequest], max_context: int | None = None) -> list[GenerationRequest]:
    """The same sampling parameters, each request now a chat asking for structured output (the
    ``STRUCTURED`` kinds in turn, with their grammars); a request no kind fits stays as it was."""
    turns, out = StructuredTurns(tokenizer, max_context), []
    for r in requests:
        structured = turns.next(r.params.max_tokens)
        out.append(r if structured is None else
                   GenerationRequest(structured[0], r.params.model_copy(update={"grammar": structured[1]}), r.seed_source))
    return out


@dataclass
class Generator:
    """A runtime answering under ``model_id`` (the one it claims) with ``backend`` in receipts."""

    runtime: ModelRuntime
    tokenizer: TextTokenizer
    model_id: str
    backend: str
    max_context: int

    @classmethod
    def of(cls, model: LoadedModel) -> "Generator":
        return cls(model.runtime, model.tokenizer, model.model_id, model.backend, model.max_context)

    def answers(self, requests: Sequence[GenerationRequest], key: NodeKey, concurrency: int = 1) -> list[AnswerFile]:
        """Answer every request, ``concurrency`` at a time (the engine batches them)."""

        async def run() -> list[AnswerFile]:
            gate = asyncio.Semaphore(concurrency)
            queue = len(requests) + 1  # every request may wait: this one caller is the engine's only client
            async with Engine(self.runtime, self.tokenizer, self.model_id, max_context=self.max_context,
                              max_queue=queue, max_queue_per_client=queue) as engine:

                async def one(request: GenerationRequest) -> AnswerFile:
                    async with gate:
                        result = await engine.complete(request)
                    return answer_file(result, key, model_id=self.model_id, backend=self.backend)

                return list(await asyncio.gather(*(one(r) for r in requests)))

        return asyncio.run(run())

    def timed_answers(self, requests: Sequence[GenerationRequest], key: NodeKey) -> list[tuple[AnswerFile, float]]:
        """Answer the requests one after another in one engine (as a serving node does: its thread
        and TVM pool already running), each with the seconds it took; the first is a warm-up."""

        async def run() -> list[tuple[AnswerFile, float]]:
            async with Engine(self.runtime, self.tokenizer, self.model_id, max_context=self.max_context) as engine:
                await engine.complete(requests[0])
                out = []
                for request in requests:
                    t = time.perf_counter()
                    result = await engine.complete(request)
                    out.append((answer_file(result, key, model_id=self.model_id, backend=self.backend), time.perf_counter() - t))
                return out

        return asyncio.run(run())


def request_mix(
    tokenizer: TextTokenizer,
    count: int,
    *,
    seed: int,
    temperatures: Sequence[float] = (0.0, 0.3, 0.7, 1.0, 1.5),
    lengths: Sequence[int] = (16, 64, 256, 512),
    extras: bool = True,
    grammar_share: float = 0.0,
    max_context: int | None = None,
) -> list[GenerationRequest]:
    """``count`` reproducible requests: chat (with or without a system message) and raw
    completion prompts, each temperature and length; with ``extras`` also top-k, top-p and
    penalties now and then. ``grammar_share`` of them (evenly spaced) are chat requests for
    structured output instead, the ``STRUCTURED`` kinds in turn, each with its grammar (kinds
    whose prompt and length do not fit ``max_context`` are passed over: a tiny model's context
    cannot hold the tool prompt); every other request is the one the same seed gives without
    grammars."""
    rng = random.Random(seed)
    out, turns = [], StructuredTurns(tokenizer, max_context)
    for i in range(count):
        if i % 3 == 2 or tokenizer.chat_template is None:  # a base model gets raw prompts only
            prompt_ids = tokenizer.encode_prompt(rng.choice(COMPLETIONS))
        else:
            messages = [{"role": "user", "content": rng.choice(PROMPTS)}]
            if i % 2:
                messages.insert(0, {"role": "system", "content": SYSTEM})
            prompt_ids = tokenizer.encode_chat(messages)
        sampling = {"temperature": temperatures[i % len(temperatures)], "max_tokens": rng.choice(list(lengths)),
                    "seed": rng.getrandbits(64)}
        if extras and rng.random() < 0.3:
            sampling.update(rng.choice([{"top_p": 0.9}, {"top_k": 40}, {"frequency_penalty": 0.5, "presence_penalty": 0.3},
                                        {"top_p": 0.8, "top_k": 20}]))
        if math.floor((i + 1) * grammar_share) > math.floor(i * grammar_share):
            if (structured := turns.next(sampling["max_tokens"], system=bool(i % 2))) is not None:
                prompt_ids, sampling["grammar"] = structured
        out.append(GenerationRequest(tuple(prompt_ids), SamplingParams(**sampling)))
    return out


class NumpyBackend:
    """The independent float64 numpy forward as a verifier backend (no TVM involved)."""

    def __init__(self, model: LoadedModel, reference: NumpyLlama):  # or any architecture's reference (same interface)
        self.model_id = model.model_id
        self.vocab_size = model.vocab_size
        # the finish rules and grammar masks: the tokenizer's
        self.eos_token_ids, self.decode, self.grammar_vocabulary = model.eos_token_ids, model.decode, model.grammar_vocabulary
        self._reference = reference

    def score_blocks(self, token_ids: Sequence[int], from_position: int = 0) -> list[np.ndarray]:
        return [self._reference.logits(token_ids)[from_position:]]

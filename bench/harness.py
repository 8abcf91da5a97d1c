"""Answers in bulk, for calibration, the cheat suite and the verification benchmark.

A ``Generator`` is a runtime that answers under a *claimed* model id: honest when the runtime
holds that model's weights, a cheat when it does not (the engine binds request hashes and the
seeded noise to the claimed id, so a cheat's answers look right in every commitment).
``request_mix`` draws a reproducible spread of prompts and sampling parameters.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from node.api.answers import answer_file
from node.runtime.engine import Engine, GenerationRequest
from node.runtime.loading import LoadedModel
from node.models.llama.reference import NumpyLlama
from node.runtime.model_runtime import ModelRuntime
from node.models.tokenizer import TextTokenizer
from verify.evidence import AnswerFile
from verify.identity import NodeKey
from verify.sampling import SamplingParams

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
            async with Engine(self.runtime, self.tokenizer, self.model_id, max_context=self.max_context,
                              max_queue=len(requests) + 1) as engine:

                async def one(request: GenerationRequest) -> AnswerFile:
                    async with gate:
                        result = await engine.complete(request)
                    return answer_file(result, key, model_id=self.model_id, backend=self.backend)

                return list(await asyncio.gather(*(one(r) for r in requests)))

        return asyncio.run(run())


def request_mix(
    tokenizer: TextTokenizer,
    count: int,
    *,
    seed: int,
    temperatures: Sequence[float] = (0.0, 0.3, 0.7, 1.0, 1.5),
    lengths: Sequence[int] = (16, 64, 256, 512),
    extras: bool = True,
) -> list[GenerationRequest]:
    """``count`` reproducible requests: chat (with or without a system message) and raw
    completion prompts, each temperature and length; with ``extras`` also top-k, top-p and
    penalties now and then."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        if i % 3 == 2:
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
        out.append(GenerationRequest(tuple(prompt_ids), SamplingParams(**sampling)))
    return out


class NumpyBackend:
    """The independent float64 numpy forward as a verifier backend (no TVM involved)."""

    def __init__(self, model: LoadedModel, reference: NumpyLlama):
        self.model_id = model.model_id
        self.vocab_size = model.vocab_size
        # the finish rules and grammar masks: the tokenizer's
        self.eos_token_ids, self.decode, self.grammar_vocabulary = model.eos_token_ids, model.decode, model.grammar_vocabulary
        self._reference = reference

    def score_blocks(self, token_ids: Sequence[int], from_position: int = 0) -> list[np.ndarray]:
        return [self._reference.logits(token_ids)[from_position:]]

"""Generate one chat answer on a loaded model through the real engine (tests share this)."""

from __future__ import annotations

import asyncio

from node.runtime.engine import Engine, GenerationRequest
from verify.sampling import SamplingParams


def generate(model, prompt_text: str, **sampling):
    """The engine's result for ``prompt_text`` as a chat turn; sampling defaults: 16 tokens, seed 5."""
    params = SamplingParams(**{"max_tokens": 16, "seed": 5, **sampling})
    ids = model.tokenizer.encode_chat([{"role": "user", "content": prompt_text}])

    async def go():
        async with Engine(model.runtime, model.tokenizer, model.model_id, max_context=512) as engine:
            return await engine.complete(GenerationRequest(tuple(ids), params))

    return asyncio.run(go())

"""One conversion at the edge: a validated OpenAI request becomes the prompt ids and the engine
requests it asks for, by ``verify.binding``'s rules. The node serves with these; the verifier
sidecar rebuilds and checks an upstream's answers with the very same ones.

Choice ``j`` of a request with ``seed = s`` samples with seed ``s + j`` (so ``n = 1`` uses ``s``
itself and every choice differs); without a seed the node draws one per choice. Either way the
seed is committed in that choice's receipt, so every answer can be re-checked.
"""

from __future__ import annotations

import secrets
from typing import Any, Mapping

from node.api.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from node.models.tokenizer import TextTokenizer
from node.runtime.events import GenerationRequest
from verify.binding import choice_seed, default_max_tokens, requested_max_tokens, requested_sampling
from verify.structured import tools_in_effect


def tools_of(body: SamplingRequest) -> list[Mapping[str, Any]]:
    """The functions a chat request lets the model call (none for completions)."""
    if not isinstance(body, ChatCompletionRequest):
        return []
    return tools_in_effect(body.model_dump(include={"tools", "tool_choice"}))


def prompt_ids(body: SamplingRequest, tokenizer: TextTokenizer) -> list[list[int]]:
    """The token ids of every prompt of a request: a chat's templated messages (and tools), or
    each completion prompt encoded (token ids taken as they are)."""
    if isinstance(body, ChatCompletionRequest):
        return [tokenizer.encode_chat([m.for_template() for m in body.messages], tools_of(body))]
    assert isinstance(body, CompletionRequest)
    return [tokenizer.encode_prompt(p) if isinstance(p, str) else list(p) for p in body.prompts()]


def generation_requests(body: SamplingRequest, prompts: list[list[int]], max_context: int,
                        client: str = "") -> list[GenerationRequest]:
    """One engine request per choice, prompt-major (choice index = prompt * n + j), each ``client``'s
    (``node.api.clients``). ``max_context``: the serving model's, which bounds a chat's default budget."""
    requests, fields = [], body.model_dump(by_alias=True)  # once: a body may hold a long chat
    for ids in prompts:
        max_tokens = requested_max_tokens(fields) or default_max_tokens(body.endpoint, len(ids), max_context)
        for j in range(body.choices_per_prompt):
            seed = choice_seed(fields, j)  # seed + j
            params = requested_sampling(fields, max_tokens=max_tokens, seed=secrets.randbits(64) if seed is None else seed)
            requests.append(GenerationRequest(tuple(ids), params, "node" if seed is None else "client", client))
    return requests


__all__ = ["generation_requests", "prompt_ids", "tools_of"]

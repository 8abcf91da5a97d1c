"""The engine's side of the one conversion at the edge: what a request asks for
(``verify.binding.Asked``, from ``SamplingRequest.to_asked``) becomes one engine request per
choice. The node serves with these; the verifier sidecar rebuilds and checks an upstream's
answers with the very same ones.

Choice ``j`` of a request with ``seed = s`` samples with seed ``s + j`` (so ``n = 1`` uses ``s``
itself and every choice differs); without a seed each choice gets a fresh one, drawn in the
conversion. Either way the seed is committed in that choice's receipt, so every answer can be
re-checked.
"""

from __future__ import annotations

from node.runtime.events import GenerationRequest
from verify.binding import Asked


def generation_requests(asked: Asked, client: str = "") -> list[GenerationRequest]:
    """One engine request per choice, prompt-major (choice index = prompt * n + j), each
    ``client``'s (``node.api.clients``)."""
    return [GenerationRequest(asked.prompt_of(index), params, asked.seed_source, client)
            for index, params in enumerate(asked.choices)]


__all__ = ["generation_requests"]

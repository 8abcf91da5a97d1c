"""What every route of the node shares: the served models and their engines, the identity key
and the evidence tokens derived from it, the evidence store and metrics (errors and their
statuses: ``node.api.errors``).

``Node.answers`` is the single path from an HTTP request to the engine: it runs a request's
choices, signs each answer as it finishes and keeps its evidence, so no route can hand out an
answer without a receipt. Signing and the evidence commit run off the event loop
(``node.blocking.off_loop``), and a choice's last event, which carries its receipt, is yielded
only once its evidence is committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Sequence

from aiohttp import web

from node.api.errors import RETRY_AFTER_S, APIError
from node.api.evidence_tokens import EvidenceTokens
from node.api.metrics import NodeMetrics, TokenRate
from node.api.protocol import ModelCard, ProofMeshInfo
from node.api.rendering import ChoiceEvent, TokenTexts
from node.blocking import off_loop
from node.errors import ClientShareError, ConfigError
from node.runtime.engine import Engine, GenerationRequest
from node.runtime.events import GenerationResult
from node.runtime.loading import LoadedModel
from verify.evidence import AnswerFile, sign_answer
from verify.evidence_store import EvidenceStore
from verify.identity import NodeKey

if TYPE_CHECKING:
    from p2p.network import PeerNetwork

log = logging.getLogger(__name__)

# The answers signed last that the node remembers for its status page (``node.api.status_page``
# lists the newest of them): kept in memory, since the store would need a decode per row for
# the model and token count; a hundred bytes each.
SIGNED_ANSWERS_KEPT = 50

# ---------------------------------------------------------------------- node state


def served_name(model: LoadedModel) -> str:
    """The name clients pass as ``model``: the registry name, or a path's last component."""
    return Path(model.name).name


@dataclass
class ServedModel:
    """One loaded model and the engine that owns its runtime."""

    name: str
    loaded: LoadedModel
    engine: Engine
    created: int = field(default_factory=lambda: int(time.time()))  # when this node began serving it
    token_texts: TokenTexts = field(init=False)

    def __post_init__(self) -> None:
        self.token_texts = TokenTexts(self.loaded.tokenizer)


@dataclass(frozen=True)
class SignedAnswer:
    """One answer this node signed, as the status page lists it (its answer file is in the store)."""

    receipt_id: str
    model: str  # the served name
    output_tokens: int
    signed_at: float  # unix seconds


class Node:
    """What the routes share: models, identity, evidence store and who may read it, metrics,
    shutdown state, and what the status page shows live (the token rate, the answers signed last)."""

    def __init__(self, models: Sequence[LoadedModel], key: NodeKey, store: EvidenceStore, *, max_queue: int):
        self.key = key
        self.evidence_tokens = EvidenceTokens(key)
        self.store = store
        self.metrics = NodeMetrics()
        self.token_rate = TokenRate()
        self.signed_answers: deque[SignedAnswer] = deque(maxlen=SIGNED_ANSWERS_KEPT)  # since this process started
        self.shutting_down = False
        self.url: str | None = None  # set once the HTTP server is bound
        self.network: PeerNetwork | None = None  # set when the node joins a p2p network
        self.models: dict[str, ServedModel] = {}
        for m in models:
            name = served_name(m)
            if name in self.models:
                raise ConfigError(f"two models are served as {name!r}")
            engine = Engine(m.runtime, m.tokenizer, m.model_id, max_context=m.max_context, max_queue=max_queue)
            self.models[name] = ServedModel(name, m, engine)

    def model_cards(self) -> list[ModelCard]:
        """The models served here, then those only a known peer serves (GET /v1/models)."""
        cards = [ModelCard(id=s.name, created=s.created, model_id=s.loaded.model_id, backend=s.loaded.backend,
                           max_context=s.loaded.max_context, format=s.loaded.weight_format) for s in self.models.values()]
        if self.network is not None:
            cards += [ModelCard(id=name, created=0, owned_by="proofmesh-network", model_id=offer.model_id,
                                backend=offer.backend, max_context=offer.max_context, peers=peers)
                      for name, (offer, peers) in sorted(self.network.table.offers().items()) if not self.serves(name)]
        return cards

    def by_model_id(self, model_id: str) -> ServedModel | None:
        """The served model whose weights hash to ``model_id`` (what receipts and answer files name)."""
        return next((s for s in self.models.values() if s.loaded.model_id == model_id), None)

    def serves(self, name: str) -> bool:
        """Whether a model called ``name`` (or whose model_id is ``name``) is served here."""
        return name in self.models or self.by_model_id(name) is not None

    def model(self, name: str) -> ServedModel:
        """The served model called ``name`` (or whose model_id is ``name``)."""
        served = self.models.get(name) or self.by_model_id(name)
        if served is None:
            raise APIError(400, f"model {name!r} is not served here; GET /v1/models lists them",
                           param="model", code="model_not_found")
        return served

    async def answers(self, served: ServedModel, requests: Sequence[GenerationRequest]) -> AsyncIterator[ChoiceEvent]:
        """Run every choice at once and yield their events as they come, each choice's last one
        with its signed receipt. Leaving early (or being cancelled: a client gone) cancels every
        choice, which frees its batch slot at the engine's next step.

        The requests are one client's (``GenerationRequest.client``), and their evidence is kept
        under it. Submission errors (queue full, prompt too long) arrive before any token: all
        choices are submitted before the engine can run a step for any of them. A client whose
        evidence takes its share of the store is refused up front (429), and so is everyone while
        the store is full of evidence still inside its audit window (503): evidence is never
        dropped for room."""
        client = requests[0].client
        over_share, has_room = await off_loop(lambda: (self.store.over_share(client), self.store.has_room()))
        if over_share:
            raise ClientShareError("this client's evidence takes its share of the evidence store until it ages "
                                   "past the audit window; retry later")
        if not has_room:
            raise APIError(503, "the evidence store is full of answers still inside their audit window; retry later",
                           code="evidence_store_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        queue: asyncio.Queue[ChoiceEvent | Exception] = asyncio.Queue()

        async def run(index: int, request: GenerationRequest) -> None:
            try:
                async for event in served.engine.generate(request):
                    self.token_rate.add(1)  # every event is one sampled token
                    proof = await self._seal(served, event.result) if event.result is not None else None
                    queue.put_nowait(ChoiceEvent(index, event, proof))  # a receipt only once its evidence is kept
            except Exception as exc:  # handed to the consumer, which raises it
                queue.put_nowait(exc)

        tasks = [asyncio.create_task(run(i, r)) for i, r in enumerate(requests)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                remaining -= item.event.finish_reason is not None
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _seal(self, served: ServedModel, result: GenerationResult) -> ProofMeshInfo:
        """Sign a finished answer and keep its evidence (one SQLite transaction: all or nothing),
        both off the loop; the asking client gets the token that opens its answer file."""
        answer = await off_loop(self._sign_and_keep, served, result)
        self.metrics.observe_answer(served.name, len(result.prompt_ids), len(result.output_ids), result.time_to_first_token)
        self.signed_answers.append(SignedAnswer(answer.receipt.receipt_id, served.name, len(result.output_ids), answer.receipt.created))
        return ProofMeshInfo(receipt=answer.receipt, signature=answer.signature, public_key=answer.public_key,
                             backend=served.loaded.backend, evidence_token=self.evidence_tokens.token(answer.receipt.receipt_id))

    def _sign_and_keep(self, served: ServedModel, result: GenerationResult) -> AnswerFile:
        """On a worker thread: the Ed25519 signature, zlib and the fsync'd commit."""
        answer = answer_file(result, self.key, model_id=served.loaded.model_id, backend=served.loaded.backend)
        self.store.put(answer, client=result.client)
        return answer

    async def close(self) -> None:
        for served in self.models.values():
            await served.engine.close()


def answer_file(result: GenerationResult, key: NodeKey, *, model_id: str, backend: str) -> AnswerFile:
    """A finished generation as the answer file verifiers take, its receipt signed with ``key``."""
    return sign_answer(key, model_id=model_id, backend=backend, prompt_ids=result.prompt_ids, output_ids=result.output_ids,
                       params=result.params, fingerprints=result.fingerprints, finish_reason=result.finish_reason,
                       seed_source=result.seed_source)


NODE = web.AppKey("node", Node)

"""The nodes the sidecar proxies: who each says it is, which one serves a request, and the
evidence behind what it served.

Blame follows signatures: a refusal (an answer that is not bound, a replayed receipt, evidence
withheld) counts against the upstream connection that served it (``Upstream.ledger_id``), never
against the node a response or an unverified file names; a node id loses reputation only through
audits of evidence its own signature covers. What an upstream says of itself (its node id) is
not trusted for anything it costs others.

With several upstreams each request goes to one of them, drawn with probability proportional to
reputation (the lower of its connection's and its declared node's, so declaring another's id
gains nothing) and never to a node the ledger has convicted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
from pydantic import ValidationError

from node.api.errors import APIError
from node.api.evidence_tokens import peer_receipt_path, receipt_path
from node.blocking import off_loop
from verify.evidence import AnswerFile
from verify.ledger import Ledger

log = logging.getLogger("proofmesh.sidecar")

UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=600, sock_connect=10)
# How long the evidence behind a served receipt may take to arrive (retried): past it, withheld.
EVIDENCE_DEADLINE_S = 5.0


@dataclass
class Upstream:
    url: str
    node_id: str | None = None  # what its /health declares, once it answered: never trusted to blame

    @property
    def ledger_id(self) -> str:
        """Who refusals count against: this connection, whatever node it says it is."""
        return f"upstream:{self.url}"


def reputation_order(weights: Sequence[float], rng: random.Random) -> list[int]:
    """The indices of ``weights`` (all > 0) in the order of a draw without replacement, each
    next one drawn with probability proportional to its weight among those left: every index gets
    the key ``u ** (1 / w)`` for a uniform ``u`` and the largest key comes first (Efraimidis and
    Spirakis, "Weighted random sampling with a reservoir", 2006). The key is taken as its log,
    ``log(u) / w``, the same order without underflow when ``w`` is small."""
    keys = [math.log(1.0 - rng.random()) / w for w in weights]  # 1 - random(): u in (0, 1], log finite
    return sorted(range(len(weights)), key=keys.__getitem__, reverse=True)


class Upstreams(Sequence[Upstream]):
    """The upstream nodes, in the order given, with the sidecar's one HTTP client (``session``,
    opened with the app: the auditor's calls into the network use it too)."""

    def __init__(self, urls: Sequence[str], ledger: Ledger, *, evidence_deadline_s: float = EVIDENCE_DEADLINE_S,
                 rng: random.Random | None = None):
        if not urls:
            raise ValueError("the sidecar needs at least one upstream node")
        self._all = [Upstream(url.rstrip("/")) for url in urls]
        self.ledger = ledger
        self.evidence_deadline_s = evidence_deadline_s
        self.rng = rng or random.Random()  # routing's draws; a test injects a seeded one
        self.session: aiohttp.ClientSession | None = None

    def __getitem__(self, index):
        return self._all[index]

    def __len__(self) -> int:
        return len(self._all)

    async def identify(self) -> None:
        """Learn each upstream's node id (its /health), for routing by reputation and conviction."""
        for up in self._all:
            if up.node_id is None:
                try:
                    async with self.session.get(f"{up.url}/health") as resp:
                        up.node_id = (await resp.json())["node_id"]
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as exc:
                    log.warning("upstream %s: no node id yet (%s)", up.url, exc)

    async def pick(self, n: int) -> list[Upstream]:
        """``n`` distinct upstreams in failover order (``reputation_order``), never a convicted
        node nor one without reputation left (weight 0)."""
        convicted, weights = await off_loop(self._standing)
        routable = [(up, w) for up, w in zip(self._all, weights) if up.node_id not in convicted and w > 0]
        if len(routable) < n:
            raise APIError(503, f"{n} node(s) needed, {len(routable)} routable (of {len(self)}; "
                           f"{len(self) - len(routable)} convicted of fraud or without reputation)", code="not_enough_nodes")
        order = reputation_order([w for _, w in routable], self.rng)
        return [routable[i][0] for i in order[:n]]

    def _standing(self) -> tuple[set[str], list[float]]:
        """The convicted node ids and every upstream's weight: the ledger's reads for one pick."""
        return self.ledger.convicted(), [self.weight(up) for up in self._all]

    def weight(self, up: Upstream) -> float:
        """The lower of the connection's reputation and its declared node's: refusals lower the
        first, failed audits of the node's own signed answers the second."""
        score = self.ledger.reputation(up.ledger_id).score
        return min(score, self.ledger.reputation(up.node_id).score) if up.node_id else score

    async def evidence(self, up: Upstream, receipt_id: str, node_id: str, token: str | None,
                       headers: dict[str, str]) -> AnswerFile | None:
        """The answer file behind a receipt: from ``up`` if it signed it, else through ``up`` from
        the peer that did (a gateway relays other nodes' answers; their evidence stays with them).
        Fetched as the client that asked would fetch it (its token, its key: ``headers``).
        Retried until ``evidence_deadline_s``: None then means it was withheld."""
        deadline = asyncio.get_running_loop().time() + self.evidence_deadline_s
        delay = 0.05
        while True:
            for path in (receipt_path(receipt_id, token), peer_receipt_path(node_id, receipt_id, token)):
                try:
                    async with self.session.get(f"{up.url}{path}", headers=headers,
                                                timeout=aiohttp.ClientTimeout(total=self.evidence_deadline_s)) as resp:
                        body, status = await resp.read(), resp.status
                    if status == 200:
                        return AnswerFile.model_validate_json(body)
                    log.info("no evidence for %s at %s%s (%d)", receipt_id, up.url, path, status)
                except (aiohttp.ClientError, asyncio.TimeoutError, ValidationError) as exc:
                    log.warning("evidence for %s through %s unusable: %s", receipt_id, up.url, str(exc)[:200])
                if up.node_id == node_id or not node_id:
                    break
            if asyncio.get_running_loop().time() + delay > deadline:
                return None
            await asyncio.sleep(delay)
            delay *= 2


__all__ = ["EVIDENCE_DEADLINE_S", "UPSTREAM_TIMEOUT", "Upstream", "Upstreams"]

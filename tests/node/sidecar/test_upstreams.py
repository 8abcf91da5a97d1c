"""Routing's draw: reputation-proportional, without replacement, never to a convicted node or one
without reputation; checked by its distribution over many seeded draws."""

from __future__ import annotations

import asyncio
import math
import random
from types import SimpleNamespace

import pytest

from node.api.errors import APIError
from node.sidecar.upstreams import Upstreams, reputation_order

DRAWS = 20_000


def within_sigmas(hits: int, p: float, draws: int = DRAWS, sigmas: float = 4.0) -> bool:
    """``hits`` of ``draws`` is within ``sigmas`` binomial standard deviations of ``p``."""
    return abs(hits - p * draws) <= sigmas * math.sqrt(draws * p * (1 - p))


class FakeLedger:
    """The two reads routing makes: convictions, and a reputation score per id."""

    def __init__(self, scores: dict[str, float], convicted: set[str] = frozenset()):
        self.scores, self._convicted = scores, set(convicted)

    def convicted(self) -> set[str]:
        return self._convicted

    def reputation(self, node_id: str) -> SimpleNamespace:
        return SimpleNamespace(score=self.scores.get(node_id, 1.0))  # connections: full marks


def pool(scores: dict[str, float], convicted: set[str] = frozenset(), seed: int = 7) -> Upstreams:
    """Upstreams ``http://<name>`` that declared node id ``<name>``, scored by ``scores``."""
    upstreams = Upstreams([f"http://{name}" for name in scores], FakeLedger(scores, convicted), rng=random.Random(seed))
    for up, name in zip(upstreams, scores):
        up.node_id = name
    return upstreams


def test_the_first_drawn_is_proportional_to_weight():
    rng = random.Random(1)
    firsts = sum(reputation_order([1.0, 3.0], rng)[0] == 1 for _ in range(DRAWS))
    assert within_sigmas(firsts, 0.75), firsts / DRAWS


def test_the_second_is_drawn_among_those_left():
    """Without replacement: with weights 1:2:3, index 0 comes second with probability
    P(1 first) * 1/4 + P(2 first) * 1/3 = 2/6 * 1/4 + 3/6 * 1/3 = 1/4."""
    rng = random.Random(2)
    orders = [reputation_order([1.0, 2.0, 3.0], rng) for _ in range(DRAWS)]
    assert all(sorted(order) == [0, 1, 2] for order in orders)
    assert within_sigmas(sum(order[1] == 0 for order in orders), 0.25)


def test_pick_routes_by_reputation_and_never_to_the_convicted_or_worthless():
    upstreams = pool({"low": 0.2, "high": 0.6, "convicted": 0.9, "worthless": 0.0}, convicted={"convicted"})

    async def picks() -> list[str]:
        return [(await upstreams.pick(1))[0].node_id for _ in range(DRAWS)]

    chosen = asyncio.run(picks())
    assert set(chosen) == {"low", "high"}
    assert within_sigmas(chosen.count("high"), 0.75), chosen.count("high") / DRAWS


def test_pick_gives_distinct_nodes_in_failover_order_or_refuses():
    upstreams = pool({"a": 0.5, "b": 0.5, "c": 0.5, "gone": 0.5, "worthless": 0.0}, convicted={"gone"})
    three = asyncio.run(upstreams.pick(3))
    assert sorted(up.node_id for up in three) == ["a", "b", "c"]
    with pytest.raises(APIError) as refused:  # the worthless one is no spare either
        asyncio.run(upstreams.pick(4))
    assert refused.value.status == 503 and "3 routable (of 5; 2 convicted" in str(refused.value)


def test_a_declared_node_id_gains_nothing_over_its_connection():
    """The weight is the lower of the connection's score and the declared node's."""
    upstreams = pool({"good": 0.9})
    upstreams.ledger.scores[upstreams[0].ledger_id] = 0.1
    assert upstreams.weight(upstreams[0]) == 0.1

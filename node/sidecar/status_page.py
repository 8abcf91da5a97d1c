"""The verifier sidecar's status page (``GET /``, rendered by ``node.api.status_page``): who this
verifier is, the nodes it routes to with their reputation, and its latest audits.

Every receipt id, node id and model id in the audits table came from a node the sidecar does not
trust (a withheld answer is recorded under whatever receipt id the node sent): the template
escapes them and only a well-formed receipt id becomes a link to its audit record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from node.api.metrics import TokenRate
from node.api.status_page import MAX_ROWS, Cell, StatusPage, Table, Tone, ago, locked_table, rate_cell, receipt_cell
from node.blocking import off_loop
from verify.identity import NodeKey
from verify.ledger import FAILED_STATES, NEUTRAL_STATES, AuditRecord, AuditState, Ledger, PeerReputation


class UpstreamState(Protocol):
    url: str
    node_id: str | None


class SidecarState(Protocol):
    """What the page reads of ``node.sidecar.app.Sidecar`` (named here, so the app, which serves
    the page, is not imported back)."""

    key: NodeKey
    audit_rate: float
    validators: int
    backends: Mapping[str, object]
    token_rate: TokenRate
    upstreams: Sequence[UpstreamState]
    ledger: Ledger


def _state_cell(state: AuditState) -> Cell:
    tone: Tone = ("good" if state == "pass" else "bad" if state in FAILED_STATES else "warn" if state in NEUTRAL_STATES
                  else "muted")  # pending
    return Cell(state, tone=tone)


async def sidecar_page(sidecar: SidecarState, is_operator: bool) -> StatusPage:
    """The page; its ledger reads run off the event loop. Audits are the operator's, as on the
    /v1 routes (which answers were audited must stay hidden from the nodes, and receipt ids from
    other clients); upstreams and reputation say no more than /health's conviction list and
    audit rate."""
    known = [up.node_id for up in sidecar.upstreams if up.node_id is not None]
    reputations = await off_loop(lambda: {node_id: sidecar.ledger.reputation(node_id) for node_id in known})
    facts = [
        ("verifier id", Cell(sidecar.key.node_id)),
        ("audit rate", Cell(f"{sidecar.audit_rate:g}" + (f", each also on {sidecar.validators} peers" if sidecar.validators else ""))),
        ("models held", Cell(", ".join(sorted(sidecar.backends)))),
        ("relaying", rate_cell(sidecar.token_rate.per_second(), sidecar.token_rate.window_s)),
    ]
    upstreams = Table("Upstream nodes", ("url", "node id", "reputation", "passes", "failures", "standing"), [
        (Cell(up.url), *_reputation_cells(reputations.get(up.node_id))) for up in sidecar.upstreams], "none")
    if not is_operator:
        return StatusPage("ProofMesh verifier", facts, [upstreams, locked_table("Audits", operator=True)])
    audits = await off_loop(sidecar.ledger.audits, limit=MAX_ROWS)
    return StatusPage("ProofMesh verifier", facts, [upstreams, _audits_table(audits)])


def _reputation_cells(reputation: PeerReputation | None) -> tuple[Cell, ...]:
    """Node id, score, passes, failures, standing (None: the upstream has not told its node id yet)."""
    if reputation is None:
        return Cell("not identified yet (no answer from its /health)", tone="muted"), Cell("-"), Cell("-"), Cell("-"), Cell("-")
    standing = Cell("convicted of fraud", tone="bad") if reputation.convicted else Cell("routable", tone="good")
    return (Cell(reputation.node_id), Cell(f"{reputation.score:.3f}"), Cell(str(reputation.passes)), Cell(str(reputation.failures)),
            standing)


def _audits_table(audits: list[AuditRecord]) -> Table:
    rows = [(receipt_cell(a.receipt_id, "v1/audits"), Cell(a.node_id), Cell(a.model_id[:16] + "…" if a.model_id else "-"),
             _state_cell(a.state), Cell(str(len(a.verdicts))), ago(a.updated)) for a in audits]
    return Table(f"Audits (the last {MAX_ROWS}; each receipt links to its audit record)",
                 ("receipt", "node id", "model_id", "state", "verdicts", "updated"), rows, "none yet")

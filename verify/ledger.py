"""The verifier's ledger: audits, signed verdicts, fraud proofs and per-peer reputation in SQLite.

One SQLite file in WAL mode with ``synchronous=FULL``: every record is one transaction, so a
``kill -9`` (or a power cut) at any moment leaves each record either wholly there or not at
all, and an audit's closing, its verdicts and the reputation change it causes land together.

Reputation rule (what routing reads; ``score`` in [0, 1], unknown peers start at ``NEUTRAL``):

- between events the score relaxes toward ``NEUTRAL`` with a half-life of ``HALF_LIFE_S`` (a
  day): old evidence counts less, for good and for bad;
- a passed audit moves it a share ``GAIN`` of the way to 1;
- a failed audit that is not a proven fraud — evidence withheld or substituted (``withheld``),
  evidence the node signed but that breaks the protocol (``malformed``) — and an answer refused
  to a client because it was not the answer to the client's request (``record_refusal``) each
  move it a share ``LOSS`` of the way to 0 — it recovers by the decay and by later passes;
- an audit of evidence that is not the node's own (``unattributable``: someone else's alteration)
  or that could not be decided (``error``) moves nothing: nobody can be framed;
- an upheld fraud proof convicts the peer: score 0 for good, never decaying. A new identity
  starts again at ``NEUTRAL``, which is why a stake, not reputation, is what a cheat forfeits.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from verify.durable import DurableDB
from verify.fraud import FraudProof, SignedVerdict

NEUTRAL = 0.5
HALF_LIFE_S = 24 * 3600.0
GAIN = 0.1
LOSS = 0.3

AuditState = Literal["pending", "pass", "fraud", "withheld", "malformed", "unattributable", "error"]
AUDIT_STATES = AuditState.__args__
FAILED_STATES = ("fraud", "withheld", "malformed")  # the node's own failures: its reputation falls
NEUTRAL_STATES = ("unattributable", "error")  # nothing is known against the node

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audits (
    receipt_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    model_id TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS audits_by_node ON audits (node_id, created);
CREATE INDEX IF NOT EXISTS audits_by_created ON audits (created);
CREATE TABLE IF NOT EXISTS verdicts (
    receipt_id TEXT NOT NULL REFERENCES audits (receipt_id),
    verifier_id TEXT NOT NULL,
    verdict TEXT NOT NULL,
    body TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (receipt_id, verifier_id)
);
CREATE TABLE IF NOT EXISTS fraud_proofs (
    receipt_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    body TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS refusals (
    receipt_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS receipts_seen (
    receipt_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS reputation (
    node_id TEXT PRIMARY KEY,
    score REAL NOT NULL,
    updated REAL NOT NULL,
    passes INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    convicted INTEGER NOT NULL DEFAULT 0
);
"""


class AuditRecord(BaseModel):
    receipt_id: str
    node_id: str
    model_id: str
    state: AuditState
    created: float
    updated: float
    verdicts: list[SignedVerdict]


class Conviction(BaseModel):
    """An upheld fraud proof, without its body (``Ledger.fraud_proof`` has it)."""

    receipt_id: str
    node_id: str
    created: float


class PeerReputation(BaseModel):
    node_id: str
    score: float
    passes: int
    failures: int
    convicted: bool


def decayed(score: float, elapsed_s: float) -> float:
    """``score`` after ``elapsed_s`` of relaxing toward NEUTRAL with half-life HALF_LIFE_S."""
    return NEUTRAL + (score - NEUTRAL) * 0.5 ** (max(elapsed_s, 0.0) / HALF_LIFE_S)


class Ledger:
    """The sidecar's records; safe to share between threads (one connection, one lock)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._sql = DurableDB(self.path)  # a committed record survives more than the process
        self._migrate_audit_states()
        self._sql.db.execute("PRAGMA foreign_keys=ON")
        self._sql.db.executescript(_SCHEMA)

    def _migrate_audit_states(self) -> None:
        """Ledgers written before audits could end withheld, malformed or unattributable held a
        CHECK on the state column: copy their audits into a table without it."""
        row = self._sql.db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'audits'").fetchone()
        if row is None or "CHECK" not in row[0]:
            return
        create = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS audits"):_SCHEMA.index(");") + 2]
        with self._sql.transaction() as db:
            db.execute("ALTER TABLE audits RENAME TO audits_before_states")
            db.execute(create)
            db.execute("INSERT INTO audits SELECT * FROM audits_before_states")
            db.execute("DROP TABLE audits_before_states")

    def first_sight(self, receipt_id: str, node_id: str, *, now: float | None = None) -> bool:
        """Remember a receipt served to a client; False if it was served before (a replay)."""
        with self._sql.transaction() as db:
            cursor = db.execute("INSERT OR IGNORE INTO receipts_seen VALUES (?, ?, ?)",
                                (receipt_id, node_id, time.time() if now is None else now))
            return cursor.rowcount == 1

    def record_refusal(self, receipt_id: str, node_id: str, reason: str, *, now: float | None = None) -> None:
        """An answer refused to a client (not the answer to its request, a replayed receipt): kept
        with its reason, and the node's reputation falls as for a failed audit. Not a conviction:
        the HTTP body the mismatch is about is not signed."""
        now = time.time() if now is None else now
        with self._sql.transaction() as db:
            db.execute("INSERT INTO refusals VALUES (?, ?, ?, ?)", (receipt_id, node_id, reason, now))
            self._move(db, node_id, passed=False, now=now)

    def refusals(self, node_id: str) -> list[str]:
        with self._sql.reading() as db:
            return [r for (r,) in db.execute("SELECT reason FROM refusals WHERE node_id = ? ORDER BY created", (node_id,))]

    def close(self) -> None:
        self._sql.close()

    def open_audit(self, receipt_id: str, node_id: str, model_id: str, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._sql.transaction() as db:
            db.execute("INSERT OR IGNORE INTO audits VALUES (?, ?, ?, 'pending', ?, ?)", (receipt_id, node_id, model_id, now, now))

    def add_verdict(self, signed: SignedVerdict, *, now: float | None = None) -> None:
        """A validator's signed verdict on an open audit (one per validator)."""
        now = time.time() if now is None else now
        v = signed.verdict
        with self._sql.transaction() as db:
            db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?)",
                       (v.receipt_id, signed.verifier_id, v.verdict, signed.model_dump_json(), now))

    def close_audit(self, receipt_id: str, state: AuditState, *, now: float | None = None) -> None:
        """Settle an audit and move the audited peer's reputation, in one transaction (only the
        first settling of an audit moves it)."""
        if state not in AUDIT_STATES or state == "pending":
            raise ValueError(f"an audit closes as one of {', '.join(AUDIT_STATES[1:])}")
        now = time.time() if now is None else now
        with self._sql.transaction() as db:
            row = db.execute("SELECT node_id, state FROM audits WHERE receipt_id = ?", (receipt_id,)).fetchone()
            if row is None:
                raise KeyError(receipt_id)
            db.execute("UPDATE audits SET state = ?, updated = ? WHERE receipt_id = ?", (state, now, receipt_id))
            if state not in NEUTRAL_STATES and row[1] == "pending":  # an audit moves reputation once
                self._move(db, row[0], passed=state == "pass", now=now)

    def record_validator(self, node_id: str, *, agreed: bool, now: float | None = None) -> None:
        """A validator's verdict agreed with the audit's outcome or not (a lazy or lying validator
        loses reputation as a cheating node does)."""
        with self._sql.transaction() as db:
            self._move(db, node_id, passed=agreed, now=time.time() if now is None else now)

    def _move(self, db: sqlite3.Connection, node_id: str, *, passed: bool, now: float) -> None:
        current = self._reputation(db, node_id, now)
        if current.convicted:
            return
        score = current.score + (1 - current.score) * GAIN if passed else current.score * (1 - LOSS)
        db.execute(
            "INSERT INTO reputation (node_id, score, updated, passes, failures) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (node_id) DO UPDATE SET score = excluded.score, updated = excluded.updated, "
            "passes = passes + excluded.passes, failures = failures + excluded.failures",
            (node_id, score, now, int(passed), int(not passed)),
        )

    def add_fraud_proof(self, proof: FraudProof, *, now: float | None = None) -> None:
        """Record an upheld fraud proof and convict the node that signed the answer."""
        now = time.time() if now is None else now
        receipt = proof.answer.receipt
        with self._sql.transaction() as db:
            db.execute("INSERT OR IGNORE INTO fraud_proofs VALUES (?, ?, ?, ?)",
                       (receipt.receipt_id, receipt.node_id, proof.model_dump_json(), now))
            db.execute("INSERT INTO reputation (node_id, score, updated, failures, convicted) VALUES (?, 0, ?, 1, 1) "
                       "ON CONFLICT (node_id) DO UPDATE SET score = 0, updated = excluded.updated, convicted = 1",
                       (receipt.node_id, now))

    @staticmethod
    def _reputation(db: sqlite3.Connection, node_id: str, now: float) -> PeerReputation:
        row = db.execute("SELECT score, updated, passes, failures, convicted FROM reputation WHERE node_id = ?",
                         (node_id,)).fetchone()
        if row is None:
            return PeerReputation(node_id=node_id, score=NEUTRAL, passes=0, failures=0, convicted=False)
        score, updated, passes, failures, convicted = row
        return PeerReputation(node_id=node_id, score=0.0 if convicted else decayed(score, now - updated),
                              passes=passes, failures=failures, convicted=bool(convicted))

    def reputation(self, node_id: str, *, now: float | None = None) -> PeerReputation:
        with self._sql.reading() as db:
            return self._reputation(db, node_id, time.time() if now is None else now)

    def convicted(self) -> set[str]:
        with self._sql.reading() as db:
            return {r[0] for r in db.execute("SELECT node_id FROM reputation WHERE convicted = 1")}

    def fraud_proof(self, receipt_id: str) -> FraudProof | None:
        with self._sql.reading() as db:
            row = db.execute("SELECT body FROM fraud_proofs WHERE receipt_id = ?", (receipt_id,)).fetchone()
        return None if row is None else FraudProof.model_validate_json(row[0])

    def convictions(self, *, limit: int = 100) -> list[Conviction]:
        """Newest first: who was convicted, for which receipt, when (a listing reads no proof bodies)."""
        with self._sql.reading() as db:
            rows = db.execute("SELECT receipt_id, node_id, created FROM fraud_proofs ORDER BY created DESC LIMIT ?",
                                    (limit,)).fetchall()
        return [Conviction(receipt_id=r[0], node_id=r[1], created=r[2]) for r in rows]

    def audit(self, receipt_id: str) -> AuditRecord | None:
        found = self.audits(receipt_id=receipt_id, limit=1)
        return found[0] if found else None

    def audits(self, *, receipt_id: str | None = None, node_id: str | None = None, state: AuditState | None = None,
               limit: int = 100) -> list[AuditRecord]:
        """Newest first, filtered by any of receipt, node and state."""
        where, args = [], []
        for column, value in (("receipt_id", receipt_id), ("node_id", node_id), ("state", state)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = "SELECT receipt_id, node_id, model_id, state, created, updated FROM audits"
        sql += (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY created DESC LIMIT ?"
        with self._sql.reading() as db:
            rows = db.execute(sql, (*args, limit)).fetchall()
            bodies = {
                r[0]: [b for (b,) in db.execute("SELECT body FROM verdicts WHERE receipt_id = ? ORDER BY created", (r[0],))]
                for r in rows
            }
        return [
            AuditRecord(receipt_id=r[0], node_id=r[1], model_id=r[2], state=r[3], created=r[4], updated=r[5],
                        verdicts=[SignedVerdict.model_validate_json(b) for b in bodies[r[0]]])
            for r in rows
        ]


__all__ = ["AUDIT_STATES", "FAILED_STATES", "GAIN", "HALF_LIFE_S", "LOSS", "NEUTRAL", "AuditRecord", "AuditState", "Conviction", "Ledger", "PeerReputation", "decayed"]

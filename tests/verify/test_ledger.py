"""The verifier's ledger: audit records with signed verdicts, fraud proofs, the reputation rule,
and every committed record surviving kill -9 of the writer in the middle of a burst."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.verify.test_evidence_store import make_answer
from verify.fraud import make_fraud_proof, sign_verdict
from verify.identity import NodeKey
from verify.ledger import GAIN, HALF_LIFE_S, LOSS, NEUTRAL, Ledger
from verify.verifier import Verdict

VALIDATORS = [NodeKey.generate(), NodeKey.generate()]
ROOT = Path(__file__).resolve().parents[2]


def verdict(receipt_id: str, outcome: str = "pass") -> Verdict:
    return Verdict(receipt_id=receipt_id, verdict=outcome, reasons=[] if outcome == "pass" else ["sampling"], failures=[])


def test_an_audit_keeps_its_signed_verdicts_and_filters(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.open_audit("r1", "nodeA", "m", now=10.0)
    ledger.open_audit("r2", "nodeB", "m", now=11.0)
    for key in VALIDATORS:
        ledger.add_verdict(sign_verdict(verdict("r1"), key), now=12.0)
    ledger.close_audit("r1", "pass", now=13.0)
    record = ledger.audit("r1")
    assert record.state == "pass" and record.node_id == "nodeA" and record.updated == 13.0
    assert {v.verifier_id for v in record.verdicts} == {k.node_id for k in VALIDATORS}
    assert all(v.signature_is_valid() for v in record.verdicts)
    assert [a.receipt_id for a in ledger.audits()] == ["r2", "r1"]  # newest first
    assert [a.receipt_id for a in ledger.audits(state="pending")] == ["r2"]
    assert [a.receipt_id for a in ledger.audits(node_id="nodeA")] == ["r1"]
    assert ledger.audit("nope") is None
    with pytest.raises(KeyError):
        ledger.close_audit("nope", "pass")
    ledger.close()
    assert Ledger(tmp_path / "ledger.sqlite").audit("r1").state == "pass"  # reopened


def test_reputation_rises_falls_decays_and_conviction_sticks(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert ledger.reputation("n", now=0.0).score == NEUTRAL
    ledger.open_audit("a", "n", "m", now=0.0)
    ledger.close_audit("a", "pass", now=0.0)
    up = NEUTRAL + (1 - NEUTRAL) * GAIN
    assert ledger.reputation("n", now=0.0).score == pytest.approx(up)
    ledger.open_audit("b", "n", "m", now=0.0)
    ledger.close_audit("b", "fraud", now=0.0)  # failed, not (yet) a proven fraud
    down = up * (1 - LOSS)
    assert ledger.reputation("n", now=0.0).score == pytest.approx(down)
    later = ledger.reputation("n", now=HALF_LIFE_S)
    assert later.score == pytest.approx(NEUTRAL + (down - NEUTRAL) / 2) and (later.passes, later.failures) == (1, 1)
    ledger.open_audit("c", "n", "m", now=1.0)
    ledger.close_audit("c", "error", now=1.0)  # an error says nothing about the node
    assert ledger.reputation("n", now=1.0).passes == 1

    cheat = make_answer(8, seed=3)
    proof = make_fraud_proof(cheat, verdict(cheat.receipt.receipt_id, "fraud"), VALIDATORS[0])
    ledger.add_fraud_proof(proof, now=5.0)
    convicted = cheat.receipt.node_id
    assert ledger.reputation(convicted, now=5.0 + 100 * HALF_LIFE_S).score == 0.0
    assert ledger.convicted() == {convicted}
    assert ledger.fraud_proof(cheat.receipt.receipt_id) == proof
    ledger.open_audit("d", convicted, "m", now=6.0)
    ledger.close_audit("d", "pass", now=6.0)  # a later pass does not undo a conviction
    assert ledger.reputation(convicted, now=6.0).convicted


WRITER = textwrap.dedent("""
    import sys
    from tests.verify.ledger_writer import burst
    burst(sys.argv[1])
""")


def test_kill_9_during_a_burst_loses_no_committed_record(tmp_path):
    path = tmp_path / "ledger.sqlite"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    committed = []
    try:
        for line in writer.stdout:
            committed.append(line.strip())
            if len(committed) >= 60:
                break
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
    assert len(committed) >= 60
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    ledger = Ledger(path)
    for receipt_id in committed:  # each line was printed after its closing transaction committed
        record = ledger.audit(receipt_id)
        assert record is not None and record.state == "pass" and len(record.verdicts) == 2, receipt_id
    for record in ledger.audits(limit=10_000):  # and nothing half-written: every verdict parses and is signed
        assert record.state in ("pending", "pass") and all(v.signature_is_valid() for v in record.verdicts)
    assert ledger.reputation("burst-node").passes >= len(committed)

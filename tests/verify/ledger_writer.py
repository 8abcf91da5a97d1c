"""A ledger writer for the kill -9 test (tests/verify/test_ledger.py): audits in a burst, each
printed once its closing transaction has committed; runs until killed."""

from __future__ import annotations

import itertools
from pathlib import Path

from verify.fraud import sign_verdict
from verify.identity import NodeKey
from verify.ledger import Ledger
from verify.verifier import Verdict


def burst(path: str) -> None:
    ledger = Ledger(Path(path))
    keys = [NodeKey.generate(), NodeKey.generate()]
    for i in itertools.count():
        receipt_id = f"r{i:06d}"
        ledger.open_audit(receipt_id, "burst-node", "m")
        for key in keys:
            ledger.add_verdict(sign_verdict(Verdict(receipt_id=receipt_id, verdict="pass", reasons=[], failures=[]), key))
        ledger.close_audit(receipt_id, "pass")
        print(receipt_id, flush=True)

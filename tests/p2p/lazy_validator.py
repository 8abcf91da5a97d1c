"""A lazy validator for tests: a real ``proofmesh run`` node whose re-checks say "pass" to every
answer without computing, returning the answer's own claimed fingerprints as if they were its own
(signed, like an honest attestation). Run as ``python -m tests.p2p.lazy_validator run ...``."""

from __future__ import annotations

import sys

from node.api import peering
from node.cli import main
from verify.attestation import Attestation
from verify.evidence import AnswerFile
from verify.fraud import sign_verdict
from verify.verifier import Verdict


async def _yes(self: peering.NodeServices, answer: AnswerFile) -> Attestation:
    verdict = Verdict(receipt_id=answer.receipt.receipt_id, verdict="pass", reasons=[], failures=[])
    return Attestation.sign(sign_verdict(verdict, self.node.key), list(answer.evidence.fingerprints), self.node.key)


if __name__ == "__main__":
    peering.NodeServices.verify = _yes
    sys.exit(main(sys.argv[1:]))

"""Turn a finished generation into a signed receipt and the answer file verifiers take."""

from __future__ import annotations

from node.engine import GenerationResult
from verify.evidence import AnswerFile, Evidence, Fingerprint
from verify.identity import NodeKey
from verify.receipts import make_receipt


def answer_file(result: GenerationResult, key: NodeKey, *, model_id: str, backend: str) -> AnswerFile:
    receipt, signature = make_receipt(
        key,
        model_id=model_id,
        backend=backend,
        request_hash=result.request_hash,
        seed=result.params.seed,
        prompt_ids=result.prompt_ids,
        output_ids=result.output_ids,
        fingerprints=result.fingerprints,
        finish_reason=result.finish_reason,
    )
    return AnswerFile(
        receipt=receipt,
        signature=signature,
        public_key=key.public_key.hex(),
        evidence=Evidence(
            prompt_ids=result.prompt_ids,
            output_ids=result.output_ids,
            sampling=result.params,
            fingerprints=[Fingerprint(ids=ids, logits=logits) for ids, logits in result.fingerprints],
        ),
    )

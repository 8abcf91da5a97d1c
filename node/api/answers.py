"""Turn a finished generation into a signed receipt and the answer file verifiers take."""

from __future__ import annotations

from node.runtime.events import GenerationResult
from verify.evidence import AnswerFile, sign_answer
from verify.identity import NodeKey


def answer_file(result: GenerationResult, key: NodeKey, *, model_id: str, backend: str) -> AnswerFile:
    return sign_answer(key, model_id=model_id, backend=backend, prompt_ids=result.prompt_ids, output_ids=result.output_ids,
                       params=result.params, fingerprints=result.fingerprints, finish_reason=result.finish_reason,
                       seed_source=result.seed_source)

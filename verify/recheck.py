"""Re-checking what a client holds (``proofmesh verify``): an answer file by teacher-forced
re-execution, or a fraud proof from scratch; then, given the client's request and what it
received, that the answer is that request's (``verify.binding``).

The inputs are read as the sidecar reads them: a response is one JSON document or a stream's
server-sent events, decoded by ``verify.sse`` up to ``[DONE]`` (where the ``openai`` client
stops), so a client's re-check and the sidecar's binding see the same chunks. Needs nothing of
node/: the model comes in as the verifier's ``ScoringBackend`` with its tokenizer.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Protocol, Sequence

from pydantic import ValidationError

from verify.binding import BindingReport, Tokenization, asked_of, bind_answers
from verify.evidence import AnswerFile
from verify.fraud import FraudProof
from verify.grammar import GrammarError
from verify.sse import SSEDecoder
from verify.verifier import ScoringBackend


class RecheckModel(ScoringBackend, Protocol):
    """A model to re-check on: what re-execution scores with, and what binding renders with."""

    tokenizer: Tokenization
    max_context: int


def read_document(raw: bytes) -> AnswerFile | FraudProof:
    """An answer file or a fraud proof, whichever ``raw`` is; a ``ValueError`` says what it
    lacks as each."""
    problems = []
    for schema in (AnswerFile, FraudProof):
        try:
            return schema.model_validate_json(raw)
        except ValidationError as exc:
            problems.append(f"{exc.error_count()} problems as {schema.__name__}, first: {exc.errors()[0]['msg']}")
    raise ValueError(f"not a valid answer file or fraud proof ({'; '.join(problems)})")


def read_response(text: str) -> dict | list[dict]:
    """What the client received: one JSON document, or a stream's events (their data, each a
    JSON chunk, up to ``[DONE]``). ``ValueError``: neither."""
    if text.lstrip().startswith("{"):
        return json.loads(text)
    chunks = []
    for event in SSEDecoder().feed(text.encode("utf-8")):
        if event.data.startswith("[DONE]"):
            break
        chunks.append(json.loads(event.data))
    if not chunks:
        raise ValueError("neither a JSON response nor a stream of server-sent events with chunks")
    return chunks


def bind_to_request(answer: AnswerFile, request: Mapping[str, Any], response: Mapping[str, Any] | Sequence[Mapping[str, Any]],
                    model: RecheckModel, *, require_client_seed: bool = False) -> BindingReport:
    """Is ``answer`` the answer to ``request`` (the client's body), as ``response`` shows it?
    The endpoint is the request's own: a chat has ``messages``. A request whose output format
    cannot be enforced binds nothing: no honest node serves it."""
    endpoint = "chat" if "messages" in request else "completions"
    try:
        asked = asked_of(endpoint, request, model.tokenizer, model.max_context)
    except GrammarError as exc:
        return BindingReport({-1: [f"the request's output format cannot be enforced: {exc}"]}, {})
    return bind_answers(asked, response, {answer.receipt.receipt_id: answer}, model.tokenizer,
                        require_client_seed=require_client_seed)


__all__ = ["RecheckModel", "bind_to_request", "read_document", "read_response"]

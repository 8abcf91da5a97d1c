"""What ``proofmesh verify`` reads: a response as the sidecar reads it (one JSON document, or a
stream's events up to ``[DONE]`` in any framing SSE allows), and a document that must be an
answer file or a fraud proof."""

from __future__ import annotations

import json

import pytest

from verify.recheck import read_document, read_response

CHUNKS = [{"id": "a", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}, {"id": "a", "choices": []}]


def test_a_stream_is_read_in_any_framing_and_stops_at_done():
    framed = (": keep-alive\r\n" + "".join(f"data:{json.dumps(c)}\r\n\r\n" for c in CHUNKS)
              + "data: [DONE]\n\n" + 'data: {"after": "done"}\n\n')
    assert read_response(framed) == CHUNKS


def test_a_json_response_is_one_document():
    assert read_response(json.dumps(CHUNKS[0], indent=1)) == CHUNKS[0]


@pytest.mark.parametrize("text", ["", "not json", "data: {broken\n\n"])
def test_neither_is_a_value_error(text):
    with pytest.raises(ValueError):
        read_response(text)


def test_a_document_that_is_neither_says_what_it_lacks_as_each():
    with pytest.raises(ValueError, match="problems as AnswerFile.*problems as FraudProof"):
        read_document(b'{"receipt": {}}')

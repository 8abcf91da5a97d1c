"""The sidecar's SSE reader against the framings the HTML standard allows (and the openai client
reads): whatever an upstream sends, the sidecar must see the events a client would."""

from __future__ import annotations

import pytest

from verify.sse import SSEDecoder, ServerSentEvent

STREAM = (b": a comment\r\n"
          b"data:{\"a\":1}\r\n\r\n"  # no space after the colon
          b"event: message\ndata: first line\ndata: second line\n\n"
          b"data: [DONE]\r\r"  # bare CR line ends
          b"id: 7\nretry: 10\ndata: cut off")  # the stream ends inside an event: discarded
EXPECTED = [ServerSentEvent('{"a":1}'), ServerSentEvent("first line\nsecond line", "message"), ServerSentEvent("[DONE]")]


@pytest.mark.parametrize("size", [len(STREAM), 1, 2, 3, 7])
def test_events_are_the_standard_s_however_the_bytes_are_split(size):
    decoder = SSEDecoder()
    events = [e for at in range(0, len(STREAM), size) for e in decoder.feed(STREAM[at:at + size])]
    assert events == EXPECTED


def test_a_crlf_split_between_chunks_is_one_line_end():
    """Its LF is not a second, blank line: that would end the event after its first data line."""
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r") == [] and decoder.feed(b"\ndata: y\r\n\r\n") == [ServerSentEvent("x\ny")]

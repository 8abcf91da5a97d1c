"""Server-sent events read as the HTML standard defines them (and as the ``openai`` client reads
them): lines end in ``\\r\\n``, ``\\n`` or ``\\r``; a line starting with ``:`` is a comment;
``field:value`` drops one optional space after the colon; ``data`` lines of one event are joined
with ``\\n``; a blank line dispatches the event; an event the stream ends inside is discarded.

The sidecar binds what this parser reads and sends its clients only what it builds itself, so no
other framing an upstream might use (no space after ``data:``, ``\\r`` line ends, a ``[DONE]``
split over lines) can show a client something the binding did not see. It lives in verify/ so a
client re-checking a stream it received (``verify.recheck``, ``proofmesh verify --response``)
reads the same events the sidecar bound.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSentEvent:
    data: str
    event: str | None = None


class SSEDecoder:
    """Feed bytes as they arrive; get the events they complete."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event: str | None = None
        self._pending_cr = False  # the last chunk ended in \r: a \n opening the next one belongs to it

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._pending_cr = chunk.endswith(b"\r")
        self._buffer += chunk
        events = []
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                return events
            end, width = cut
            line, self._buffer = self._buffer[:end], self._buffer[end + width:]
            if event := self._line(line.decode("utf-8", errors="replace")):
                events.append(event)

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            if not self._data and self._event is None:
                return None
            event = ServerSentEvent("\n".join(self._data), self._event)
            self._data, self._event = [], None
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None  # id and retry do not change what the sidecar reads


def _line_end(buffer: bytes) -> tuple[int, int] | None:
    """Where the first line of ``buffer`` ends and how wide its end is (None: no complete line).
    A trailing ``\\r`` counts as an end: ``feed`` drops the ``\\n`` that may follow it."""
    cr, lf = buffer.find(b"\r"), buffer.find(b"\n")
    if cr < 0 and lf < 0:
        return None
    if cr >= 0 and (lf < 0 or cr < lf):
        return cr, 2 if buffer[cr + 1:cr + 2] == b"\n" else 1
    return lf, 1


__all__ = ["SSEDecoder", "ServerSentEvent"]

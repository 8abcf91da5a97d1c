"""The operator's status page (``GET /``) of a node and of a verifier sidecar: one server-rendered
HTML page that the browser reloads every ``REFRESH_S`` seconds; no script, no build step.

Both pages have one shape — a few facts, then tables — so one template renders either
(``templates/status.html``); ``node/api/app.py`` and ``node/sidecar/status_page.py`` say what goes in.
Much of what is shown comes from strangers (peers' records, receipt ids a node sent a sidecar,
model names), so the template escapes every value (autoescape), and a link is only ever a
relative path built from an id that matched the receipt id pattern: no value chooses where a
link leads. Tables hold at most ``MAX_ROWS`` rows of values cut at ``MAX_CELL_CHARS``, and the
callers read SQLite off the event loop.

Loads neither TVM nor libp2p (the sidecar renders with it too).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import jinja2
from aiohttp import web

from verify.receipts import RECEIPT_ID_PATTERN

MAX_ROWS = 50  # per table: a page that renders in a millisecond or two and still reads at a glance
# Per value, past which it is cut: a stranger's "receipt id" may be megabytes; the longest honest
# values (a node's listen addresses, a peer's model names) fit.
MAX_CELL_CHARS = 400
REFRESH_S = 5

Tone = Literal["good", "bad", "warn", "muted"]

_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("node.api", "templates"), autoescape=True,
                                undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_RECEIPT_ID = re.compile(RECEIPT_ID_PATTERN)


@dataclass(frozen=True)
class Cell:
    """One value on the page; ``href`` is a relative link, ``tone`` a colour for a state."""

    text: str
    href: str | None = None
    tone: Tone | None = None


@dataclass(frozen=True)
class Table:
    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[Cell]]
    empty: str  # what the page says instead of an empty table ("no network", "none yet")


@dataclass(frozen=True)
class StatusPage:
    title: str
    facts: Sequence[tuple[str, Cell]]
    tables: Sequence[Table] = field(default_factory=list)


def receipt_cell(receipt_id: str, route: str) -> Cell:
    """A receipt id linked to ``route/<receipt id>`` (relative, e.g. ``v1/receipts``), or plain
    text when it is no well-formed receipt id (a stranger's string must not shape a URL)."""
    return Cell(receipt_id, href=f"{route}/{receipt_id}" if _RECEIPT_ID.fullmatch(receipt_id) else None)


def ago(unix_s: float, *, now: float | None = None) -> Cell:
    """How long ago, in the largest unit that is at least one: "4 s ago", "3 min ago", "2 h ago"."""
    seconds = max(0.0, (time.time() if now is None else now) - unix_s)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return Cell(f"{int(seconds // size)} {unit} ago", tone="muted")
    return Cell(f"{int(seconds)} s ago", tone="muted")


def rate_cell(tokens_per_second: float, window_s: int) -> Cell:
    return Cell(f"{tokens_per_second:.1f} tokens/s (last {window_s} s)")


def locked_table(title: str, *, operator: bool = False) -> Table:
    """A table whose rows come from ``/v1`` routes, for a request without the key those routes
    need: their rule holds here too. ``operator``: rows only the operator may see (the receipts a
    node signed, a sidecar's audits: clients must not learn one another's receipt ids, nor
    nodes which of their answers were audited)."""
    if operator:
        return Table(title, (), (), "for the operator only (send Authorization: Bearer OPERATOR_KEY)")
    return Table(title, (), (), "needs the API key (send Authorization: Bearer KEY), as the /v1 routes do")


def html_response(page: StatusPage) -> web.Response:
    html = _TEMPLATES.get_template("status.html").render(page=page, refresh_s=REFRESH_S, max_chars=MAX_CELL_CHARS,
                                                         rendered=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})


__all__ = ["MAX_CELL_CHARS", "MAX_ROWS", "REFRESH_S", "Cell", "StatusPage", "Table", "ago", "html_response", "locked_table", "rate_cell",
           "receipt_cell"]

"""The node's evidence store: answer files kept in SQLite (WAL) for a retention window.

A node must hand out the evidence behind any receipt it signed while the receipt is young
enough to be audited, without letting the store grow without bound. Answers are kept in one
SQLite table in WAL mode with ``synchronous=FULL`` (readers never block the writer; once a
receipt is handed out its evidence survives a crash or a power cut, since withheld evidence is
a failed audit) and dropped when older than ``retention_s`` or, oldest first, when the store
passes ``max_bytes`` — but never while younger than ``audit_window_s``: one peer's traffic
cannot flush evidence before an audit could fetch it. A store full of young evidence says so
(``has_room``): the node then refuses new work (503 with Retry-After) instead.

No one client may take what everyone shares (DESIGN.md, "Who signed what"): every answer is
kept under the client it was served to (``put(..., client=)``, ``node.api.clients``), and a
client holding ``client_share`` of ``max_bytes`` is over its share (``over_share``): the node
refuses that client (429) while everyone else is still served. A client over its share first
makes room from its own evidence past the audit window; nobody else's is touched for it.

Rows are compact: the small JSON parts (receipt, signature, key) plus the token ids and
fingerprints as packed little-endian arrays, zlib-compressed (about 50 bytes per output token
with top-8 fingerprints, where the JSON answer file takes about 200; each position's output-token
logit is stored as the logits are, its log-normaliser as float64). The sampling parameters
but the seed (stop strings, a grammar of up to 64 KiB) are the same for every choice of a
request: they are kept once per client in their own table, keyed by their hash, and each
answer names that hash and keeps its own seed. Fingerprint logits are stored as float32 when
that is exact (the engine's are) and as float64 otherwise, so what comes back always hashes to
the same ``fingerprint_root``; an answer file read back is the one that was signed.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from verify.durable import DurableDB
from verify.evidence import AnswerFile

DEFAULT_RETENTION_S = 7 * 24 * 3600
DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_AUDIT_WINDOW_S = 24 * 3600  # evidence younger than this is never evicted for room
# The most of ``max_bytes`` one client's evidence may take. Half: one client alone (a client
# of one node's whole output, ~100 tokens/s at ~50 bytes a token, makes ~430 MB a day) never
# meets it on the default 1 GiB, while one flooding client leaves the other half to the rest.
DEFAULT_CLIENT_SHARE = 0.5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    receipt_id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    body BLOB NOT NULL,
    client TEXT NOT NULL DEFAULT '',
    sampling_hash TEXT  -- NULL: a row from before the sampling table, its sampling in its body
);
"""
# Rows written before the per-client share lack its columns: added in place (their sampling
# stays in their bodies, which ``decode_answer`` still reads).
_ADDED_COLUMNS = {"client": "TEXT NOT NULL DEFAULT ''", "sampling_hash": "TEXT"}
_INDEXES_AND_TOTALS = """
CREATE INDEX IF NOT EXISTS answers_by_created ON answers (created);
CREATE INDEX IF NOT EXISTS answers_by_client ON answers (client, created);
CREATE INDEX IF NOT EXISTS answers_by_sampling ON answers (client, sampling_hash);
-- Sampling parameters but the seed, once per client and hash: every choice of a request shares them.
CREATE TABLE IF NOT EXISTS sampling (
    client TEXT NOT NULL,
    hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (client, hash)
);
-- The bytes kept, in all and per client, maintained by SQLite itself so the caps cost O(1) per
-- answer, not a scan.
CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (0, (SELECT COALESCE(SUM(size), 0) FROM answers));
CREATE TABLE IF NOT EXISTS client_totals (client TEXT PRIMARY KEY, bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO client_totals SELECT client, SUM(size) FROM answers GROUP BY client;
DROP TRIGGER IF EXISTS answers_added;
DROP TRIGGER IF EXISTS answers_dropped;
CREATE TRIGGER answers_added AFTER INSERT ON answers BEGIN
    UPDATE totals SET bytes = bytes + NEW.size WHERE id = 0;
    INSERT INTO client_totals VALUES (NEW.client, NEW.size)
        ON CONFLICT (client) DO UPDATE SET bytes = bytes + NEW.size;
END;
CREATE TRIGGER answers_dropped AFTER DELETE ON answers BEGIN
    UPDATE totals SET bytes = bytes - OLD.size WHERE id = 0;
    UPDATE client_totals SET bytes = bytes - OLD.size WHERE client = OLD.client;
    -- the last answer naming a sampling row takes it along
    DELETE FROM sampling WHERE client = OLD.client AND hash = OLD.sampling_hash AND NOT EXISTS (
        SELECT 1 FROM answers WHERE client = OLD.client AND sampling_hash = OLD.sampling_hash);
END;
CREATE TRIGGER IF NOT EXISTS sampling_added AFTER INSERT ON sampling BEGIN
    UPDATE totals SET bytes = bytes + NEW.size WHERE id = 0;
    UPDATE client_totals SET bytes = bytes + NEW.size WHERE client = NEW.client;
END;
CREATE TRIGGER IF NOT EXISTS sampling_dropped AFTER DELETE ON sampling BEGIN
    UPDATE totals SET bytes = bytes - OLD.size WHERE id = 0;
    UPDATE client_totals SET bytes = bytes - OLD.size WHERE client = OLD.client;
END;
"""


@dataclass(frozen=True)
class EncodedAnswer:
    """An answer file as the store keeps it: its own row, and its sampling parameters but the
    seed (``sampling``), shared by every answer of one client whose parameters hash alike."""

    row: bytes
    sampling: bytes
    sampling_hash: str

    @property
    def size(self) -> int:
        return len(self.row) + len(self.sampling)


def _exact_float32(values: np.ndarray) -> bool:
    return bool(np.array_equal(values.astype(np.float32).astype(np.float64), values))


def encode_answer(answer: AnswerFile) -> EncodedAnswer:
    """Pack an answer file into the store's compact row format (see the module docstring)."""
    ev = answer.evidence
    widths = np.array([len(f.ids) for f in ev.fingerprints], dtype=np.uint8)
    fp_ids = np.array([i for f in ev.fingerprints for i in f.ids], dtype=np.int32)
    fp_logits = np.array([x for f in ev.fingerprints for x in f.logits], dtype=np.float64)
    token_logits = np.array([f.token_logit for f in ev.fingerprints], dtype=np.float64)
    logit_dtype = "<f4" if _exact_float32(fp_logits) and _exact_float32(token_logits) else "<f8"
    header = {
        "version": answer.version,
        "receipt": answer.receipt.model_dump(),
        "signature": answer.signature,
        "public_key": answer.public_key,
        "seed": ev.sampling.seed,
        "n_prompt": len(ev.prompt_ids),
        "n_output": len(ev.output_ids),
        "logit_dtype": logit_dtype,
    }
    arrays = [
        np.asarray(ev.prompt_ids, dtype="<i4"),
        np.asarray(ev.output_ids, dtype="<i4"),
        widths,
        fp_ids.astype("<i4"),
        fp_logits.astype(logit_dtype),
        token_logits.astype(logit_dtype),
        np.asarray([f.log_normalizer for f in ev.fingerprints], dtype="<f8"),
    ]
    head = json.dumps(header, separators=(",", ":")).encode()
    raw = len(head).to_bytes(4, "little") + head + b"".join(a.tobytes() for a in arrays)
    sampling = json.dumps(ev.sampling.model_dump(exclude={"seed"}), sort_keys=True, separators=(",", ":")).encode()
    return EncodedAnswer(zlib.compress(raw, 6), zlib.compress(sampling, 6), hashlib.sha256(sampling).hexdigest())


def decode_answer(blob: bytes, sampling_blob: bytes | None) -> AnswerFile:
    """The answer file behind a row and its sampling row (``None`` for a row that keeps its
    sampling in its body, as rows from before the sampling table do)."""
    raw = zlib.decompress(blob)
    n_head = int.from_bytes(raw[:4], "little")
    header = json.loads(raw[4 : 4 + n_head])
    offset = 4 + n_head

    def take(dtype: str, count: int) -> np.ndarray:
        nonlocal offset
        arr = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
        offset += arr.nbytes
        return arr

    prompt = take("<i4", header["n_prompt"]).tolist()
    output = take("<i4", header["n_output"]).tolist()
    widths = take("u1", header["n_output"])
    total = int(widths.sum())
    ids = take("<i4", total).tolist()
    logits = take(header["logit_dtype"], total).astype(np.float64).tolist()
    token_logits = take(header["logit_dtype"], header["n_output"]).astype(np.float64).tolist()
    normalizers = take("<f8", header["n_output"]).tolist()
    bounds = [0] + np.cumsum(widths, dtype=np.int64).tolist()
    fingerprints = [{"ids": ids[a:b], "logits": logits[a:b], "token_logit": t, "log_normalizer": z}
                    for a, b, t, z in zip(bounds, bounds[1:], token_logits, normalizers)]
    sampling = header["sampling"] if sampling_blob is None else {**json.loads(zlib.decompress(sampling_blob)), "seed": header["seed"]}
    return AnswerFile.model_validate(
        {
            "version": header["version"],
            "receipt": header["receipt"],
            "signature": header["signature"],
            "public_key": header["public_key"],
            "evidence": {"prompt_ids": prompt, "output_ids": output, "sampling": sampling, "fingerprints": fingerprints},
        }
    )


class EvidenceStore:
    """Answer files by receipt id, in one SQLite file; safe to share between threads."""

    def __init__(self, path: Path, *, retention_s: float = DEFAULT_RETENTION_S, max_bytes: int = DEFAULT_MAX_BYTES,
                 audit_window_s: float = DEFAULT_AUDIT_WINDOW_S, client_share: float = DEFAULT_CLIENT_SHARE):
        if not 0.0 < client_share <= 1.0:
            raise ValueError(f"client_share must be in (0, 1], not {client_share}")
        self.path = Path(path)
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        self.audit_window_s = min(audit_window_s, retention_s)
        self.client_share_bytes = int(max_bytes * client_share)  # what one client's evidence may take
        self._sql = DurableDB(self.path)  # durable before the receipt goes out
        self._sql.db.execute("PRAGMA recursive_triggers=ON")  # so a REPLACE's implicit delete is counted
        self._sql.db.executescript(_SCHEMA)
        columns = {row[1] for row in self._sql.db.execute("PRAGMA table_info(answers)")}
        for name, kind in _ADDED_COLUMNS.items():
            if name not in columns:
                self._sql.db.execute(f"ALTER TABLE answers ADD COLUMN {name} {kind}")
        self._sql.db.executescript(_INDEXES_AND_TOTALS)

    def put(self, answer: AnswerFile, *, client: str = "", now: float | None = None) -> int:
        """Keep ``answer`` under ``client`` (who it was served to); returns the bytes it added
        (its sampling row only when no answer of this client shares it yet). Expired rows go
        first, then, over the cap, the oldest rows past the audit window. An answer is always
        kept, even past the cap (its receipt is signed already): ``has_room`` and ``over_share``
        are what stop new work."""
        encoded = encode_answer(answer)
        now = time.time() if now is None else now
        with self._sql.transaction():
            before = self._kept_bytes()
            self._sql.db.execute(
                "INSERT OR REPLACE INTO answers (receipt_id, created, size, body, client, sampling_hash) VALUES (?, ?, ?, ?, ?, ?)",
                (answer.receipt.receipt_id, now, len(encoded.row), encoded.row, client, encoded.sampling_hash),
            )
            # after the answer: a replaced row's delete may have taken a sampling row it alone named
            self._sql.db.execute("INSERT OR IGNORE INTO sampling (client, hash, size, body) VALUES (?, ?, ?, ?)",
                                 (client, encoded.sampling_hash, len(encoded.sampling), encoded.sampling))
            added = self._kept_bytes() - before
            self._evict(now)
        return added

    def get(self, receipt_id: str, *, now: float | None = None) -> AnswerFile | None:
        """The answer file behind ``receipt_id`` while it is retained, else ``None``."""
        now = time.time() if now is None else now
        with self._sql.reading() as db:
            row = db.execute(
                """SELECT a.body, s.body FROM answers a LEFT JOIN sampling s ON s.client = a.client AND s.hash = a.sampling_hash
                   WHERE a.receipt_id = ? AND a.created >= ?""", (receipt_id, now - self.retention_s)
            ).fetchone()
        return decode_answer(row[0], row[1]) if row else None

    def has_room(self, *, now: float | None = None) -> bool:
        """Whether new answers fit under the cap without evicting evidence younger than the
        audit window (after dropping what may go). Asked before every request: under the cap it
        is one read that waits for no commit; only a full store takes a write transaction to evict."""
        now = time.time() if now is None else now
        with self._sql.reading() as db:
            if self._kept_bytes(db) < self.max_bytes:
                return True
        with self._sql.transaction():
            self._evict(now)
            return self._kept_bytes() < self.max_bytes

    def over_share(self, client: str, *, now: float | None = None) -> bool:
        """Whether ``client``'s evidence takes its whole share (``client_share_bytes``) even after
        its own rows past the audit window went, oldest first: then it waits while others are
        served. Asked before every request: under the share it is one read that waits for no commit."""
        now = time.time() if now is None else now
        with self._sql.reading() as db:
            if self._client_bytes(client, db) < self.client_share_bytes:
                return False
        with self._sql.transaction():
            self._drop_oldest(self.client_share_bytes, now, client)
            return self._client_bytes(client) >= self.client_share_bytes

    def stats(self) -> tuple[int, int]:
        """(answers kept, bytes they take)."""
        with self._sql.reading() as db:
            (count,) = db.execute("SELECT COUNT(*) FROM answers").fetchone()
            size = self._kept_bytes(db)
        return int(count), int(size)

    def client_bytes(self, client: str) -> int:
        """Bytes kept for ``client``'s answers (their rows and their sampling rows)."""
        with self._sql.reading() as db:
            return self._client_bytes(client, db)

    def close(self) -> None:
        self._sql.close()

    def _kept_bytes(self, db: sqlite3.Connection | None = None) -> int:
        return int((db or self._sql.db).execute("SELECT bytes FROM totals WHERE id = 0").fetchone()[0])

    def _client_bytes(self, client: str, db: sqlite3.Connection | None = None) -> int:
        row = (db or self._sql.db).execute("SELECT bytes FROM client_totals WHERE client = ?", (client,)).fetchone()
        return int(row[0]) if row else 0

    def _evict(self, now: float) -> None:
        self._sql.db.execute("DELETE FROM answers WHERE created < ?", (now - self.retention_s,))
        if self._kept_bytes() <= self.max_bytes:
            return
        self._drop_oldest(self.max_bytes, now)

    def _drop_oldest(self, keep_bytes: int, now: float, client: str | None = None) -> None:
        """Drop the oldest answers (of ``client``, or of everyone) until the rest and their
        sampling rows fit in ``keep_bytes`` (a running sum in creation order), sparing every row
        younger than the audit window."""
        where, args = ("WHERE client = ?", (client,)) if client is not None else ("", ())
        (sampling,) = self._sql.db.execute(f"SELECT COALESCE(SUM(size), 0) FROM sampling {where}", args).fetchone()
        self._sql.db.execute(
            f"""DELETE FROM answers WHERE receipt_id IN (
                   SELECT receipt_id FROM (
                       SELECT receipt_id, created, SUM(size) OVER (ORDER BY created DESC, receipt_id) AS kept
                       FROM answers {where})
                   WHERE kept > ? AND created < ?)""",
            (*args, keep_bytes - int(sampling), now - self.audit_window_s),
        )

"""The node's evidence store: answer files kept in SQLite (WAL) for a retention window.

A node must hand out the evidence behind any receipt it signed while the receipt is young
enough to be audited, without letting the store grow without bound. Answers are kept in one
SQLite table in WAL mode with ``synchronous=FULL`` (readers never block the writer; once a
receipt is handed out its evidence survives a crash or a power cut, since withheld evidence is
a failed audit) and dropped when older than ``retention_s`` or, oldest first, when the store
passes ``max_bytes`` — but never while younger than ``audit_window_s``: one peer's traffic
cannot flush evidence before an audit could fetch it. A store full of young evidence says so
(``has_room``): the node then refuses new work (503 with Retry-After) instead.

Rows are compact: the small JSON parts (receipt, signature, key, sampling) plus the token ids
and fingerprints as packed little-endian arrays, zlib-compressed (about 50 bytes per output
token with top-8 fingerprints, where the JSON answer file takes about 200); each position's
output-token logit is stored as the logits are, its log-normaliser as float64. Fingerprint logits
are stored as float32 when that is exact (the engine's are) and as float64 otherwise, so what
comes back always hashes to the same ``fingerprint_root``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import zlib
from pathlib import Path

import numpy as np

from verify.evidence import AnswerFile

DEFAULT_RETENTION_S = 7 * 24 * 3600
DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_AUDIT_WINDOW_S = 24 * 3600  # evidence younger than this is never evicted for room

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    receipt_id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS answers_by_created ON answers (created);
-- The bytes kept, maintained by SQLite itself so the size cap costs O(1) per answer, not a scan.
CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (0, (SELECT COALESCE(SUM(size), 0) FROM answers));
CREATE TRIGGER IF NOT EXISTS answers_added AFTER INSERT ON answers
    BEGIN UPDATE totals SET bytes = bytes + NEW.size WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS answers_dropped AFTER DELETE ON answers
    BEGIN UPDATE totals SET bytes = bytes - OLD.size WHERE id = 0; END;
"""


def _exact_float32(values: np.ndarray) -> bool:
    return bool(np.array_equal(values.astype(np.float32).astype(np.float64), values))


def encode_answer(answer: AnswerFile) -> bytes:
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
        "sampling": ev.sampling.model_dump(),
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
    return zlib.compress(raw, 6)


def decode_answer(blob: bytes) -> AnswerFile:
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
    return AnswerFile.model_validate(
        {
            "version": header["version"],
            "receipt": header["receipt"],
            "signature": header["signature"],
            "public_key": header["public_key"],
            "evidence": {"prompt_ids": prompt, "output_ids": output, "sampling": header["sampling"], "fingerprints": fingerprints},
        }
    )


class EvidenceStore:
    """Answer files by receipt id, in one SQLite file; safe to share between threads."""

    def __init__(self, path: Path, *, retention_s: float = DEFAULT_RETENTION_S, max_bytes: int = DEFAULT_MAX_BYTES,
                 audit_window_s: float = DEFAULT_AUDIT_WINDOW_S):
        self.path = Path(path)
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        self.audit_window_s = min(audit_window_s, retention_s)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # durable before the receipt goes out
        self._db.execute("PRAGMA recursive_triggers=ON")  # so a REPLACE's implicit delete is counted
        self._db.executescript(_SCHEMA)

    def put(self, answer: AnswerFile, *, now: float | None = None) -> int:
        """Keep ``answer``; returns the stored size in bytes. Expired rows go first, then, over
        the cap, the oldest rows past the audit window. An answer is always kept, even past the
        cap (its receipt is signed already): ``has_room`` is what stops new work."""
        blob = encode_answer(answer)
        now = time.time() if now is None else now
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT OR REPLACE INTO answers (receipt_id, created, size, body) VALUES (?, ?, ?, ?)",
                (answer.receipt.receipt_id, now, len(blob), blob),
            )
            self._evict(now)
        return len(blob)

    def get(self, receipt_id: str, *, now: float | None = None) -> AnswerFile | None:
        """The answer file behind ``receipt_id`` while it is retained, else ``None``."""
        now = time.time() if now is None else now
        with self._lock:
            row = self._db.execute(
                "SELECT body FROM answers WHERE receipt_id = ? AND created >= ?", (receipt_id, now - self.retention_s)
            ).fetchone()
        return decode_answer(row[0]) if row else None

    def has_room(self, *, now: float | None = None) -> bool:
        """Whether new answers fit under the cap without evicting evidence younger than the
        audit window (after dropping what may go). Asked before every request: under the cap it
        is one read; only a full store takes a write transaction to evict."""
        now = time.time() if now is None else now
        with self._lock:
            if self._kept_bytes() < self.max_bytes:
                return True
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._evict(now)
                return self._kept_bytes() < self.max_bytes

    def stats(self) -> tuple[int, int]:
        """(answers kept, bytes they take)."""
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM answers").fetchone()
            size = self._kept_bytes()
        return int(count), int(size)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _kept_bytes(self) -> int:
        return int(self._db.execute("SELECT bytes FROM totals WHERE id = 0").fetchone()[0])

    def _evict(self, now: float) -> None:
        self._db.execute("DELETE FROM answers WHERE created < ?", (now - self.retention_s,))
        if self._kept_bytes() <= self.max_bytes:
            return
        # Drop the oldest rows until the rest fit (a running sum in creation order), sparing every
        # row younger than the audit window.
        self._db.execute(
            """DELETE FROM answers WHERE receipt_id IN (
                   SELECT receipt_id FROM (
                       SELECT receipt_id, created, SUM(size) OVER (ORDER BY created DESC, receipt_id) AS kept
                       FROM answers)
                   WHERE kept > ? AND created < ?)""",
            (self.max_bytes, now - self.audit_window_s),
        )

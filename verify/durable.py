"""One SQLite file that a committed write survives a crash in, shared by threads.

The evidence store and the ledger both keep records that must outlive the process the moment
they are committed (a receipt goes out only once its evidence is on disk; an audit's verdicts and
the reputation change they cause land together): WAL mode (readers never block the writer) with
``synchronous=FULL`` (a commit is fsync'd), one connection opened with ``check_same_thread=False``
and ``isolation_level=None`` (transactions are ours, begun with ``BEGIN IMMEDIATE``), and one lock
that every use of the connection holds. The commits block for an fsync: coroutines reach them
through ``node.blocking.off_loop``.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class DurableDB:
    """The connection (``db``) and the lock (``lock``) every use of it holds."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock: reads inside it see what the write will change."""
        with self.lock, self.locked_transaction() as db:
            yield db

    @contextmanager
    def locked_transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction for a caller that holds ``lock`` already (it read first, then
        decided to write): committed when the block ends, rolled back if it raises."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        with self.lock:
            self.db.close()

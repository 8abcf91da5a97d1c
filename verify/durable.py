"""One SQLite file that a committed write survives a crash in, shared by threads.

The evidence store and the ledger both keep records that must outlive the process the moment
they are committed (a receipt goes out only once its evidence is on disk; an audit's verdicts and
the reputation change they cause land together): WAL mode (readers never block the writer) with
``synchronous=FULL`` (a commit is fsync'd), one writing connection opened with
``check_same_thread=False`` and ``isolation_level=None`` (transactions are ours, begun with
``BEGIN IMMEDIATE``), and one lock that every use of it holds (``transaction``). The commits block for an fsync:
coroutines reach them through ``node.blocking.off_loop``.

A plain read (``reading``) takes neither: it runs on its thread's own connection in a read
transaction, which in WAL mode sees the last commit and waits for no writer. Otherwise a
``/health`` probe or a routing decision would queue behind every fsync in flight (with a 20 ms
disk, ``bench/bench_loop_lag.py --fsync-ms 20`` measured the sidecar's ``/health`` p99 at 36 ms).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class DurableDB:
    """The writing connection (``db``) and the lock (``lock``) every write holds; plain reads
    go through ``reading`` and hold neither."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._readers = threading.local()
        self._reader_list: list[sqlite3.Connection] = []  # to close them all, from whichever thread closes
        self._reader_list_lock = threading.Lock()  # not ``lock``: a first read must not wait for a commit
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock: reads inside it see what the write will change;
        committed when the block ends, rolled back if it raises."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot of the last commit, on this thread's own connection, without the
        lock: for reads that decide no write. An in-memory database has no file a second
        connection could open: there the read shares the writer's connection and its lock."""
        if str(self.path) == ":memory:":
            with self.lock:
                yield self.db
            return
        reader = getattr(self._readers, "db", None)
        if reader is None:
            reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            reader.execute("PRAGMA query_only=ON")
            self._readers.db = reader
            with self._reader_list_lock:
                self._reader_list.append(reader)
        reader.execute("BEGIN")
        try:
            yield reader
        finally:
            reader.execute("COMMIT")

    def close(self) -> None:
        with self.lock, self._reader_list_lock:
            for reader in self._reader_list:
                reader.close()
            self.db.close()

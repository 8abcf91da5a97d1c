"""The SQLite evidence store: exact round trips, compact rows, retention and the size cap,
WAL mode, answers surviving a reopen, sampling parameters kept once per request and each
client's share of the store."""

from __future__ import annotations

import json
import sqlite3
import zlib
from contextlib import closing

import numpy as np
import pytest

from verify.evidence import AnswerFile, Fingerprint, sign_answer
from verify.evidence_store import EvidenceStore, decode_answer, encode_answer
from verify.identity import NodeKey
from verify.receipts import fingerprint_root
from verify.sampling import MAX_STOP_CHARS, SamplingParams

KEY = NodeKey.generate()
MODEL_ID = "ab" * 32


def make_answer(n_out: int = 64, *, seed: int = 0, float64_logits: bool = False, stop: tuple[str, ...] = ()) -> AnswerFile:
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, 49152, size=20).tolist()
    output = rng.integers(0, 49152, size=n_out).tolist()
    logits = rng.normal(10, 4, size=(n_out, 8))
    if not float64_logits:
        logits = logits.astype(np.float32)
    fps = [Fingerprint(ids=rng.integers(0, 49152, size=8).tolist(), logits=[float(x) for x in row], token_logit=float(row[0]),
                       log_normalizer=float(rng.normal(20, 1))) for row in logits]
    params = SamplingParams(temperature=0.7, seed=seed, max_tokens=n_out, stop=stop)
    return sign_answer(KEY, model_id=MODEL_ID, backend="test", prompt_ids=prompt, output_ids=output, params=params,
                       fingerprints=fps, finish_reason="length")


@pytest.mark.parametrize("float64_logits", [False, True])
def test_round_trip_is_exact(float64_logits):
    answer = make_answer(float64_logits=float64_logits)
    encoded = encode_answer(answer)
    back = decode_answer(encoded.row, encoded.sampling)
    assert back == answer
    assert fingerprint_root([(f.ids, f.logits) for f in back.evidence.fingerprints]) == answer.receipt.fingerprint_root


def test_rows_are_compact():
    answer = make_answer(512)
    per_token = encode_answer(answer).size / 512
    # top-8 ids and float32 logits, the output token's logit and a float64 normaliser: ~76 bytes raw
    assert per_token <= 72, per_token
    assert encode_answer(answer).size < len(answer.model_dump_json()) / 2


def test_store_keeps_and_expires(tmp_path):
    store = EvidenceStore(tmp_path / "evidence.sqlite", retention_s=100)
    a, b = make_answer(seed=1), make_answer(seed=2)
    store.put(a, now=1000.0)
    store.put(b, now=1050.0)
    assert store.get(a.receipt.receipt_id, now=1060.0) == a
    assert store.get(a.receipt.receipt_id, now=1101.0) is None  # past its window: not served
    assert store.get("0" * 32) is None
    store.put(make_answer(seed=3), now=1120.0)  # a write drops rows past the window
    assert store.stats()[0] == 2
    store.close()
    with sqlite3.connect(tmp_path / "evidence.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_size_cap_drops_oldest_first_past_the_audit_window(tmp_path):
    answers = [make_answer(seed=s) for s in range(10)]
    one = encode_answer(answers[0]).size
    store = EvidenceStore(tmp_path / "e.sqlite", max_bytes=int(one * 3.5), audit_window_s=5)
    for i, answer in enumerate(answers):
        store.put(answer, now=1000.0 + 10 * i)  # each one is past the audit window when the next comes
    count, size = store.stats()
    assert count == 3 and size <= store.max_bytes
    kept = [a for a in answers if store.get(a.receipt.receipt_id, now=1100.0)]
    assert kept == answers[-3:]


def test_a_flood_cannot_evict_evidence_younger_than_the_audit_window(tmp_path):
    """One peer's burst of answers fills the cap: nothing young is deleted, the store says it is
    full (the node then refuses new work), and room comes back as evidence ages out of the window."""
    answers = [make_answer(seed=s) for s in range(6)]
    one = encode_answer(answers[0]).size
    store = EvidenceStore(tmp_path / "e.sqlite", max_bytes=int(one * 3.5), audit_window_s=60)
    for i, answer in enumerate(answers):
        store.put(answer, now=1000.0 + i)
    assert store.stats()[0] == 6  # all kept, past the cap: every one is still auditable
    assert all(store.get(a.receipt.receipt_id, now=1010.0) for a in answers)
    assert not store.has_room(now=1010.0)
    assert store.has_room(now=1100.0)  # past the window the oldest may go


def test_answers_survive_a_reopen(tmp_path):
    """An answer is committed once ``put`` returns (another connection reads it while the writer
    is still open: the receipt goes out then), and it is still there after the writer closed
    (closing rolls back whatever was not committed)."""
    answer = make_answer()
    writer = EvidenceStore(tmp_path / "e.sqlite")
    writer.put(answer, client="c")
    with closing(sqlite3.connect(tmp_path / "e.sqlite")) as reader:
        assert reader.execute("SELECT COUNT(*) FROM answers WHERE receipt_id = ?", (answer.receipt.receipt_id,)).fetchone() == (1,)
    writer.close()
    reopened = EvidenceStore(tmp_path / "e.sqlite")
    assert reopened.get(answer.receipt.receipt_id) == answer
    assert reopened.stats() == (1, encode_answer(answer).size) and reopened.client_bytes("c") == encode_answer(answer).size
    reopened.close()


def test_the_choices_of_one_request_keep_their_sampling_once(tmp_path):
    """n choices differ only in their seeds: their shared parameters (here four long stop
    strings, incompressible) are stored once, and each answer file comes back exactly as signed."""
    rng = np.random.default_rng(0)
    stops = tuple("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz0123456789"), MAX_STOP_CHARS)) for _ in range(4))
    answers = [make_answer(4, seed=s, stop=stops) for s in range(16)]
    store = EvidenceStore(tmp_path / "e.sqlite")
    added = [store.put(a, client="c") for a in answers]
    sampling = len(encode_answer(answers[0]).sampling)
    row = added[0] - sampling
    assert sampling > 500 and all(abs(a - row) < 64 for a in added[1:])  # later choices add their rows alone
    assert store.stats()[1] == sum(added)
    for answer in answers:
        back = store.get(answer.receipt.receipt_id)
        assert back.model_dump_json() == answer.model_dump_json()  # byte for byte what was signed


def test_one_client_over_its_share_leaves_room_for_the_others(tmp_path):
    """A client that fills its share is told so (the node answers it 429) while the store still
    has room for everyone else; nobody's evidence inside the audit window is evicted for it, and
    its own old evidence makes room for it first."""
    answers = [make_answer(seed=s) for s in range(12)]
    one = encode_answer(answers[0]).size
    store = EvidenceStore(tmp_path / "e.sqlite", max_bytes=one * 8, audit_window_s=60, client_share=0.5)
    for i, answer in enumerate(answers[:5]):
        store.put(answer, client="flood", now=1000.0 + i)
    assert store.over_share("flood", now=1010.0) and not store.over_share("victim", now=1010.0)
    assert store.has_room(now=1010.0)  # the other half is still there for the victim
    store.put(answers[5], client="victim", now=1011.0)
    assert all(store.get(a.receipt.receipt_id, now=1012.0) for a in answers[:6])
    assert not store.over_share("flood", now=1100.0)  # past the window its own oldest answers go
    assert store.get(answers[5].receipt.receipt_id, now=1100.0) is not None
    assert store.client_bytes("flood") < store.client_share_bytes


def test_kept_bytes_follow_sampling_rows_and_a_store_from_before_them(tmp_path):
    """Totals stay exact with shared sampling rows through replacement and eviction; a store
    written before the sampling table opens and serves its old rows."""
    path = tmp_path / "e.sqlite"
    old = make_answer(seed=9)
    with sqlite3.connect(path) as db:  # the schema and row format before per-client shares
        db.executescript("CREATE TABLE answers (receipt_id TEXT PRIMARY KEY, created REAL NOT NULL, size INTEGER NOT NULL, body BLOB NOT NULL);"
                         "CREATE TABLE totals (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL);")
        raw = zlib.decompress(encode_answer(old).row)
        n = int.from_bytes(raw[:4], "little")
        header = json.loads(raw[4 : 4 + n])
        header["sampling"] = old.evidence.sampling.model_dump()
        head = json.dumps(header, separators=(",", ":")).encode()
        body = zlib.compress(len(head).to_bytes(4, "little") + head + raw[4 + n :])
        db.execute("INSERT INTO answers VALUES (?, ?, ?, ?)", (old.receipt.receipt_id, 1000.0, len(body), body))
        db.execute("INSERT INTO totals VALUES (0, ?)", (len(body),))
    store = EvidenceStore(path, retention_s=100)
    assert store.get(old.receipt.receipt_id, now=1001.0) == old
    answers = [make_answer(seed=s, stop=("x" * 100,)) for s in range(4)]
    for i, answer in enumerate(answers):
        store.put(answer, client="c", now=1000.0 + 40 * i)  # the old row and the first expire on the way
    store.put(answers[-1], client="c", now=1121.0)
    with sqlite3.connect(path) as db:
        (summed,) = db.execute("SELECT (SELECT COALESCE(SUM(size), 0) FROM answers) + (SELECT SUM(size) FROM sampling)").fetchone()
        assert db.execute("SELECT COUNT(*) FROM sampling").fetchone()[0] == 1
    assert store.stats() == (3, summed) and store.client_bytes("c") == summed
    assert store.get(answers[-1].receipt.receipt_id, now=1122.0) == answers[-1]


def test_reads_wait_for_no_commit_in_flight(tmp_path):
    """While a writer holds the store (as during an fsync'd commit), get, stats, has_room and
    over_share still answer from the last commit: a /health probe never queues behind a disk."""
    from concurrent.futures import ThreadPoolExecutor

    store = EvidenceStore(tmp_path / "evidence.sqlite")
    answer = make_answer()
    store.put(answer, client="alice")
    with ThreadPoolExecutor(1) as pool, store._sql.lock:  # a commit in flight, from the reads' view (released first)
        reads = pool.submit(lambda: (store.get(answer.receipt.receipt_id), store.stats(), store.has_room(),
                                     store.over_share("alice"), store.client_bytes("alice")))
        got, (count, size), room, over, alice = reads.result(timeout=10)
    assert got == answer and count == 1 and size == alice > 0 and room and not over
    store.close()

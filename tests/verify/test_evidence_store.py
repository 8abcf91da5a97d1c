"""The SQLite evidence store: exact round trips, compact rows, retention and the size cap,
WAL mode, and answers surviving a reopen."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from verify.evidence import AnswerFile, Fingerprint, sign_answer
from verify.evidence_store import EvidenceStore, decode_answer, encode_answer
from verify.identity import NodeKey
from verify.receipts import fingerprint_root
from verify.sampling import SamplingParams

KEY = NodeKey.generate()
MODEL_ID = "ab" * 32


def make_answer(n_out: int = 64, *, seed: int = 0, float64_logits: bool = False) -> AnswerFile:
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, 49152, size=20).tolist()
    output = rng.integers(0, 49152, size=n_out).tolist()
    logits = rng.normal(10, 4, size=(n_out, 8))
    if not float64_logits:
        logits = logits.astype(np.float32)
    fps = [Fingerprint(ids=rng.integers(0, 49152, size=8).tolist(), logits=[float(x) for x in row], token_logit=float(row[0]),
                       log_normalizer=float(rng.normal(20, 1))) for row in logits]
    params = SamplingParams(temperature=0.7, seed=seed, max_tokens=n_out)
    return sign_answer(KEY, model_id=MODEL_ID, backend="test", prompt_ids=prompt, output_ids=output, params=params,
                       fingerprints=fps, finish_reason="length")


@pytest.mark.parametrize("float64_logits", [False, True])
def test_round_trip_is_exact(float64_logits):
    answer = make_answer(float64_logits=float64_logits)
    back = decode_answer(encode_answer(answer))
    assert back == answer
    assert fingerprint_root([(f.ids, f.logits) for f in back.evidence.fingerprints]) == answer.receipt.fingerprint_root


def test_rows_are_compact():
    answer = make_answer(512)
    per_token = len(encode_answer(answer)) / 512
    # top-8 ids and float32 logits, the output token's logit and a float64 normaliser: ~76 bytes raw
    assert per_token <= 72, per_token
    assert len(encode_answer(answer)) < len(answer.model_dump_json()) / 2


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
    one = len(encode_answer(answers[0]))
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
    one = len(encode_answer(answers[0]))
    store = EvidenceStore(tmp_path / "e.sqlite", max_bytes=int(one * 3.5), audit_window_s=60)
    for i, answer in enumerate(answers):
        store.put(answer, now=1000.0 + i)
    assert store.stats()[0] == 6  # all kept, past the cap: every one is still auditable
    assert all(store.get(a.receipt.receipt_id, now=1010.0) for a in answers)
    assert not store.has_room(now=1010.0)
    assert store.has_room(now=1100.0)  # past the window the oldest may go


def test_answers_survive_a_reopen(tmp_path):
    answer = make_answer()
    EvidenceStore(tmp_path / "e.sqlite").put(answer)
    assert EvidenceStore(tmp_path / "e.sqlite").get(answer.receipt.receipt_id) == answer


def test_kept_bytes_follow_inserts_replacements_and_evictions(tmp_path):
    store = EvidenceStore(tmp_path / "e.sqlite", retention_s=100)
    answers = [make_answer(seed=s) for s in range(4)]
    for i, answer in enumerate(answers):
        store.put(answer, now=1000.0 + 40 * i)  # the first expires by the time the last arrives
    store.put(answers[-1], now=1121.0)  # the same receipt again replaces its row
    with sqlite3.connect(tmp_path / "e.sqlite") as db:
        (summed,) = db.execute("SELECT COALESCE(SUM(size), 0) FROM answers").fetchone()
    assert store.stats() == (3, summed)

"""Loading by name or path: model_id, manifests, and the prepared-weights cache for warm starts."""

from __future__ import annotations

import json
import os

import numpy as np

from node.runtime.loading import load_model
from node.runtime.prepared_cache import load_prepared
from node.runtime.model_runtime import CacheLimits
from tests.models_fixtures import make_tiny_gguf, make_tiny_hf_checkpoint

LIMITS = CacheLimits(max_batch_size=2, max_total_tokens=256, prefill_chunk=64)


def test_warm_load_gives_the_same_model(tmp_path, store):
    folder = make_tiny_hf_checkpoint(tmp_path / "m")
    cold = load_model(str(folder), device="cpu", limits=LIMITS, root=store)
    assert load_prepared(store, folder) is not None
    warm = load_model(str(folder), device="cpu", limits=LIMITS, root=store)
    assert warm.model_id == cold.model_id
    manifest = json.loads((store / "manifests" / f"{cold.model_id}.json").read_text())
    assert manifest["weights_sha256"] == cold.manifest.weights_sha256
    ids = cold.tokenizer.encode_chat([{"role": "user", "content": "Hello there"}])
    assert warm.tokenizer.encode_chat([{"role": "user", "content": "Hello there"}]) == ids
    np.testing.assert_array_equal(cold.runtime.score(ids), warm.runtime.score(ids))


def test_changed_file_is_prepared_again_and_changes_model_id(tmp_path, store):
    path = tmp_path / "m.gguf"
    first = load_model(str(make_tiny_gguf(path, seed=1).path), device="cpu", limits=LIMITS, root=store)
    os.remove(path)
    second = load_model(str(make_tiny_gguf(path, seed=2).path), device="cpu", limits=LIMITS, root=store)
    assert first.model_id != second.model_id
    assert first.manifest.architecture == second.manifest.architecture

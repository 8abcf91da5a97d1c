"""The architecture registry and the Qwen3 and Gemma 3 loaders (no TVM: names, layouts, configs, model_id).

Each source is written as its own converter writes it (tests.models_fixtures) and must load into the
same Checkpoint: for Gemma 3 that means norms held as ``1 + w`` from a Hugging Face folder (which
stores ``w``) and from a GGUF file (which stores ``w + 1``). Every key that changes the computation
must change ``model_id`` or be refused by name.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from node.errors import ConfigError
from node.models import architectures
from node.models.gemma3.config import Gemma3Config
from node.models.llama.load import load_checkpoint
from node.runtime.loading import manifest_of
from tests.models_fixtures import (
    make_tiny_arch_gguf,
    make_tiny_arch_hf_checkpoint,
    make_tiny_gguf,
    random_llama_weights,
    tiny_config,
    tiny_gemma3_config,
    tiny_qwen3_config,
)

TINY = {"qwen3": tiny_qwen3_config, "gemma3": tiny_gemma3_config}


def _assert_weights_equal(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_hf_folder_and_gguf_load_the_same_checkpoint(tmp_path, arch):
    cfg = TINY[arch]()
    folder, want = make_tiny_arch_hf_checkpoint(tmp_path / "hf", cfg)
    hf = load_checkpoint(folder)
    gg = load_checkpoint(make_tiny_arch_gguf(tmp_path / "m.gguf", cfg).path)
    assert hf.config == gg.config == cfg
    _assert_weights_equal(hf.weights, want)
    _assert_weights_equal(gg.weights, want)


def test_gemma3_norms_are_held_as_one_plus_w(tmp_path):
    cfg = tiny_gemma3_config()
    folder, _ = make_tiny_arch_hf_checkpoint(tmp_path, cfg)
    stored = random_llama_weights(cfg)["model.layers.0.self_attn.q_norm.weight"]  # what config.json's model holds
    held = load_checkpoint(folder).weights["model.layers.0.self_attn.q_norm.weight"]
    assert abs(float(stored.mean())) < 0.1  # Gemma's w sits near 0 ...
    np.testing.assert_array_equal(held, stored + np.float32(1))  # ... the multiplier near 1


def test_qwen3_gguf_quantized_rows_are_not_permuted(tmp_path):
    """Qwen3Model's converter keeps HF's rows: a loader that un-permuted them would give other rows."""
    cfg = tiny_qwen3_config()
    g = make_tiny_arch_gguf(tmp_path / "q.gguf", cfg, quant_types=("Q8_0", "F16"))
    ck = load_checkpoint(g.path)
    _assert_weights_equal(ck.weights, g.weights)
    assert {"Q8_0", "F16", "F32"} <= set(g.types.values())


def test_qwen2_gguf_loads_with_hf_rows(tmp_path):
    g = make_tiny_gguf(tmp_path / "q2.gguf", arch="qwen2")
    ck = load_checkpoint(g.path)
    assert ck.config == dataclasses.replace(tiny_config(tie=True), model_type="qwen2")
    _assert_weights_equal(ck.weights, g.weights)


def test_unknown_hf_architecture_is_refused_by_name(tmp_path):
    folder, _ = make_tiny_arch_hf_checkpoint(tmp_path, tiny_qwen3_config())
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3"}))
    with pytest.raises(ConfigError, match=r"'Phi3ForCausalLM'.*supported: LlamaForCausalLM.*Gemma3ForCausalLM"):
        load_checkpoint(folder)


def _gemma_hf(**changes) -> dict:
    cfg = tiny_gemma3_config()
    raw = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
           "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
           "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "sliding_window": 24,
           "query_pre_attn_scalar": 32, "rms_norm_eps": 1e-6, "final_logit_softcapping": 30.0,
           "max_position_embeddings": 256, "rope_theta": 1e6, "rope_local_base_freq": 1e4}
    return {k: v for k, v in {**raw, **changes}.items() if v is not ...}


def test_gemma3_config_forms_agree():
    """Old keys, transformers 5's rope_parameters, and the pattern instead of layer_types: one config."""
    cfg = tiny_gemma3_config()
    assert Gemma3Config.from_hf_dict(_gemma_hf()) == cfg
    assert Gemma3Config.from_hf_dict(_gemma_hf(rope_theta=..., rope_local_base_freq=..., rope_parameters={
        "full_attention": {"rope_theta": 1e6, "rope_type": "default"},
        "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}})) == cfg
    assert Gemma3Config.from_hf_dict(_gemma_hf(layer_types=list(cfg.layer_types))) == cfg
    assert Gemma3Config.from_hf_dict(_gemma_hf(sliding_window_pattern=2)).layer_types[:2] == (
        "sliding_attention", "full_attention")
    assert Gemma3Config.from_shape_dict(json.loads(json.dumps(cfg.shape_dict()))) == cfg


@pytest.mark.parametrize("key, value", [
    ("attn_logit_softcapping", 50.0),
    ("rope_scaling", {"rope_type": "linear", "factor": 8.0}),
    ("hidden_activation", "gelu"),
    ("use_bidirectional_attention", True),
    ("attention_bias", True),
])
def test_gemma3_keys_it_cannot_compute_are_refused_by_name(key, value):
    with pytest.raises(ConfigError, match=key):
        Gemma3Config.from_hf_dict(_gemma_hf(**{key: value}))


@pytest.mark.parametrize("use_window, limit", [(False, 256), (True, 16)])
def test_qwen3_sliding_window_applies_only_with_use_sliding_window(tmp_path, use_window, limit):
    """Released Qwen3 configs write a sliding_window beside use_sliding_window=false: no window then."""
    folder, _ = make_tiny_arch_hf_checkpoint(tmp_path, tiny_qwen3_config())
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "use_sliding_window": use_window, "sliding_window": 16}))
    assert load_checkpoint(folder).config.context_limit == limit


@pytest.mark.parametrize("change", [
    {"sliding_window": 25}, {"query_pre_attn_scalar": 24}, {"rope_local_base_freq": 20_000.0},
    {"rope_theta": 2e6}, {"final_logit_softcapping": None}, {"rms_norm_eps": 1e-5},
    {"layer_types": ("full_attention",) * 6}, {"tie_word_embeddings": False},
])
def test_every_gemma3_computation_key_changes_model_id(gemma3_ckpt, change):
    flipped = dataclasses.replace(gemma3_ckpt, config=dataclasses.replace(gemma3_ckpt.config, **change))
    assert manifest_of(flipped).model_id != manifest_of(gemma3_ckpt).model_id


def test_qwen3_is_not_qwen2_with_the_same_weights(tmp_path):
    """QK-norm is what model_type qwen3 says: the same numbers as qwen2 would be another model_id."""
    folder, _ = make_tiny_arch_hf_checkpoint(tmp_path, tiny_qwen3_config())
    ck = load_checkpoint(folder)
    as_qwen2 = dataclasses.replace(ck, config=architectures.ARCHITECTURES["qwen2"].config_class(
        **{**ck.config.shape_dict(), "model_type": "qwen2", "rope_scaling": None}))
    assert manifest_of(as_qwen2).model_id != manifest_of(ck).model_id


def test_gemma3_gguf_pattern_key_is_refused(tmp_path):
    import gguf

    from node.models.gemma3.loader import config_from_gguf

    meta = {"general.architecture": "gemma3", gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch="gemma3"): 6}
    with pytest.raises(ConfigError, match="sliding_window_pattern"):
        config_from_gguf(meta, set(), "x.gguf")


@pytest.fixture(scope="module")
def gemma3_ckpt(tmp_path_factory):
    folder, _ = make_tiny_arch_hf_checkpoint(tmp_path_factory.mktemp("g3"), tiny_gemma3_config())
    return load_checkpoint(folder)


def test_gemma3_quantized_folder_keeps_its_norms(tmp_path, gemma3_ckpt):
    """``proofmesh compile --quantize`` writes HF folders: Gemma's norms go back to ``w`` on disk, so
    the folder reloads with the same ``1 + w`` multipliers (not ``2 + w``)."""
    from node.models.llama.hf_loader import save_quantized

    out = save_quantized(gemma3_ckpt, Path(gemma3_ckpt.source), tmp_path / "q8", "Q8_0")
    again = load_checkpoint(out)
    for name in (n for n in gemma3_ckpt.weights if n.endswith("norm.weight")):
        np.testing.assert_array_equal(again.weights[name], gemma3_ckpt.weights[name], err_msg=name)

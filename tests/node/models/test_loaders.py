"""Checkpoint loaders (Hugging Face folder, GGUF), weights digest, tokenizer rules, numpy reference."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from node.errors import ConfigError, ModelLoadError, NoChatTemplateError, RequestError
from node.models.llama.checkpoint import WeightsDigest, expected_weight_shapes
from node.models.llama.load import load_checkpoint
from node.models.llama.gguf_loader import permute_qk_rows, unpermute_qk_rows
from node.models.llama.reference import NumpyLlama, rope_inv_freq
from node.models.tokenizer import TextTokenizer
from tests.models_fixtures import (
    BOS_ID,
    CHATML_TEMPLATE,
    EOS_ID,
    llama_cpp_permute,
    make_tiny_gguf,
    make_tiny_hf_checkpoint,
    tiny_config,
    tiny_hf_expected_weights,
    write_safetensors,
)

ALL_GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1", "F16", "F32")
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = [
    "Hello, world!",
    "The capital of France is Paris. 1234567890",
    "  runs of   whitespace\n\n\tand tabs",
    "Café naïve résumé — 日本語のテキスト 😀",
]


def _assert_weights_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert got[name].dtype == np.float32 and got[name].flags.c_contiguous, name
        np.testing.assert_array_equal(got[name], w, err_msg=name)


# ---------------------------------------------------------------------- Hugging Face folder


@pytest.mark.parametrize("dtype,fmt", [("float32", "f32"), ("float16", "f16"), ("bfloat16", "bf16")])
def test_hf_load_dtypes_to_float32(tmp_path, dtype, fmt):
    folder = make_tiny_hf_checkpoint(tmp_path / dtype, dtype=dtype)
    ck = load_checkpoint(folder)
    assert ck.weight_format == f"safetensors:{fmt}"
    assert ck.config == tiny_config()
    _assert_weights_equal(ck.weights, tiny_hf_expected_weights(folder))
    if dtype != "bfloat16":  # our safetensors writer is readable by the reference implementation
        from safetensors.numpy import load_file

        for name, arr in load_file(folder / "model.safetensors").items():
            np.testing.assert_array_equal(arr.astype(np.float32), ck.weights[name])


def test_hf_bf16_is_exact_upper_half_of_float32(tmp_path):
    folder = make_tiny_hf_checkpoint(tmp_path, dtype="bfloat16")
    w = load_checkpoint(folder).weights["model.layers.0.mlp.up_proj.weight"]
    assert not np.any(w.view(np.uint32) & 0xFFFF)


@pytest.mark.parametrize("tie", [False, True])
def test_hf_tied_and_untied(tmp_path, tie):
    ck = load_checkpoint(make_tiny_hf_checkpoint(tmp_path, tie=tie))
    assert ck.config.tie_word_embeddings is tie
    assert ("lm_head.weight" in ck.weights) is (not tie)


def test_hf_tied_with_stored_lm_head_is_dropped_but_digested(tmp_path):
    a = load_checkpoint(make_tiny_hf_checkpoint(tmp_path / "a", tie=True))
    b = load_checkpoint(make_tiny_hf_checkpoint(tmp_path / "b", tie=True, store_tied_lm_head=True))
    assert "lm_head.weight" not in b.weights
    assert a.weights_digest != b.weights_digest  # the digest covers every stored tensor


def test_hf_qwen2_qkv_bias(tmp_path):
    folder = make_tiny_hf_checkpoint(tmp_path, qkv_bias=True)
    ck = load_checkpoint(folder)
    assert ck.config.model_type == "qwen2" and ck.config.attention_bias
    assert ck.weights["model.layers.1.self_attn.k_proj.bias"].shape == (2 * 16,)
    _assert_weights_equal(ck.weights, tiny_hf_expected_weights(folder))


@pytest.mark.parametrize("in_parameters", [False, True])
def test_hf_rope_theta_top_level_and_rope_parameters(tmp_path, in_parameters):
    folder = make_tiny_hf_checkpoint(tmp_path, rope_theta=100000.0, rope_in_parameters=in_parameters)
    raw = json.loads((folder / "config.json").read_text())
    assert ("rope_theta" in raw) is (not in_parameters)
    assert load_checkpoint(folder).config.rope_theta == 100000.0


@pytest.mark.parametrize("in_jinja", [False, True])
def test_hf_chat_template_sources(tmp_path, in_jinja):
    folder = make_tiny_hf_checkpoint(tmp_path, template_in_jinja=in_jinja)
    assert (folder / "chat_template.jinja").exists() is in_jinja
    tok = load_checkpoint(folder).tokenizer
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.render_chat(CHAT).endswith("<|im_start|>assistant\n")


def test_hf_chat_template_jinja_wins_over_tokenizer_config(tmp_path):
    folder = make_tiny_hf_checkpoint(tmp_path)
    (folder / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    tok = load_checkpoint(folder).tokenizer
    assert tok.render_chat(CHAT) == "<|im_start|>What is the capital of France?"


def test_hf_eos_ids_from_generation_config(tmp_path):
    folder = make_tiny_hf_checkpoint(tmp_path)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS_ID, 0]}))
    assert load_checkpoint(folder).tokenizer.eos_token_ids == (EOS_ID, 0)


def test_hf_error_unsupported_architecture(tmp_path):
    folder = make_tiny_hf_checkpoint(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        load_checkpoint(folder)


def test_hf_error_missing_path_config_weights_tokenizer(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    folder = make_tiny_hf_checkpoint(tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load_checkpoint(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_checkpoint(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_checkpoint(folder)


def _rewrite_weights(folder: Path, edit) -> None:
    weights = tiny_hf_expected_weights(folder)
    edit(weights)
    write_safetensors(folder / "model.safetensors", weights)


def test_hf_error_missing_tensor(tmp_path):
    folder = make_tiny_hf_checkpoint(tmp_path)
    _rewrite_weights(folder, lambda w: w.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"missing tensor 'model\.layers\.1\.mlp\.down_proj\.weight'.*\[64, 128\]"):
        load_checkpoint(folder)


def test_hf_error_missing_untied_lm_head(tmp_path):
    folder = make_tiny_hf_checkpoint(tmp_path, tie=False)
    _rewrite_weights(folder, lambda w: w.pop("lm_head.weight"))
    with pytest.raises(ModelLoadError, match="lm_head.weight.*tie_word_embeddings"):
        load_checkpoint(folder)


def test_hf_error_wrong_shape(tmp_path):
    folder = make_tiny_hf_checkpoint(tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite_weights(folder, lambda w: w.__setitem__(name, np.zeros((16, 64), np.float32)))
    with pytest.raises(ModelLoadError, match=r"k_proj\.weight' has shape \[16, 64\], expected \[32, 64\]"):
        load_checkpoint(folder)


def test_hf_error_unexpected_tensor(tmp_path):
    folder = make_tiny_hf_checkpoint(tmp_path)
    _rewrite_weights(folder, lambda w: w.__setitem__("model.layers.0.self_attn.q_norm.weight", np.ones(16, np.float32)))
    with pytest.raises(ModelLoadError, match="q_norm"):
        load_checkpoint(folder)


def test_hf_ignores_rotary_inv_freq(tmp_path):
    folder = make_tiny_hf_checkpoint(tmp_path)
    _rewrite_weights(folder, lambda w: w.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", np.ones(8, np.float32)))
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in load_checkpoint(folder).weights


# ---------------------------------------------------------------------- GGUF


def test_qk_permutation_inverse_and_layout():
    rng = np.random.default_rng(3)
    for n_head, hd in [(4, 16), (2, 16), (9, 64), (3, 64)]:
        w = rng.standard_normal((n_head * hd, 24))
        p = llama_cpp_permute(w, n_head)
        np.testing.assert_array_equal(permute_qk_rows(w, n_head), p)
        np.testing.assert_array_equal(unpermute_qk_rows(p, n_head), w)
        np.testing.assert_array_equal(permute_qk_rows(unpermute_qk_rows(w, n_head), n_head), w)
        # GGML row h*hd + 2i (+1) is HF row h*hd + i (+ hd/2): rotate-half pairs become adjacent.
        for h in range(n_head):
            for i in range(hd // 2):
                np.testing.assert_array_equal(p[h * hd + 2 * i], w[h * hd + i])
                np.testing.assert_array_equal(p[h * hd + 2 * i + 1], w[h * hd + hd // 2 + i])
        b = rng.standard_normal(n_head * hd)  # biases permute the same way
        np.testing.assert_array_equal(unpermute_qk_rows(llama_cpp_permute(b, n_head), n_head), b)


def test_qk_permutation_maps_interleaved_rope_to_rotate_half():
    """Why the permutation exists: GGML's interleaved RoPE on permuted rows = rotate-half RoPE on HF rows."""
    rng = np.random.default_rng(4)
    n_head, hd, theta, pos = 2, 16, 10000.0, 7
    w, x = rng.standard_normal((n_head * hd, 8)), rng.standard_normal(8)
    ang = pos / theta ** (np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(ang), np.sin(ang)
    q = (w @ x).reshape(n_head, hd)
    a, b = q[:, : hd // 2], q[:, hd // 2:]
    half = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=1)  # HF rotate-half
    g = (llama_cpp_permute(w, n_head) @ x).reshape(n_head, hd // 2, 2)
    inter = np.stack([g[..., 0] * cos - g[..., 1] * sin, g[..., 1] * cos + g[..., 0] * sin], axis=-1)
    np.testing.assert_allclose(unpermute_qk_rows(inter.reshape(-1), n_head), half.reshape(-1), atol=1e-12)


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_round_trip_all_types(tmp_path, tie):
    g = make_tiny_gguf(tmp_path / "tiny.gguf", quant_types=ALL_GGUF_TYPES, tie=tie)
    assert {g.types[f"blk.{i}.attn_{p}.weight"] for i in (0, 1) for p in "qk"} - {"F32", "F16"}, "q/k quantized too"
    ck = load_checkpoint(g.path)
    assert ck.config == tiny_config(tie=tie)
    assert ck.weight_format == "gguf:" + "+".join(sorted(set(g.types.values())))
    _assert_weights_equal(ck.weights, g.weights)
    assert ck.tokenizer.bos_token_id == BOS_ID and ck.tokenizer.eos_token_ids == (EOS_ID,)
    assert ck.tokenizer.add_bos is False and ck.tokenizer.chat_template == CHATML_TEMPLATE


def test_gguf_metadata_values(tmp_path):
    g = make_tiny_gguf(tmp_path / "t.gguf", n_layers=3, hidden=96, heads=6, kv_heads=3, intermediate=80,
                       rope_theta=100000.0, quant_types=("Q8_0",))
    cfg = load_checkpoint(g.path).config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (3, 96, 6, 3)
    assert (cfg.intermediate_size, cfg.head_dim, cfg.rope_theta, cfg.vocab_size) == (80, 16, 100000.0, 320)
    assert g.types["blk.0.ffn_down.weight"] == "F32"  # row length 80 is not a multiple of 32: fallback
    assert g.types["blk.0.ffn_up.weight"] == "Q8_0"


def test_gguf_tokenizer_rebuild_matches_tokenizer_json(tmp_path):
    hf = load_checkpoint(make_tiny_hf_checkpoint(tmp_path / "hf")).tokenizer
    gg = load_checkpoint(make_tiny_gguf(tmp_path / "t.gguf").path).tokenizer
    for text in TEXTS + [hf.render_chat(CHAT)]:
        assert gg.encode_prompt(text) == hf.encode_prompt(text)
    assert gg.fingerprint() == hf.fingerprint()  # same vocab, merges, rules: same tokenizer identity


def test_gguf_file_reads_what_the_gguf_package_reads(tmp_path):
    """Our one-pass reader against gguf's own GGUFReader (independent of us): every key, every
    tensor's type, shape and bytes; a file cut anywhere in its header is refused, not misread."""
    import gguf

    from node.models.gguf_file import GGUFFile

    g = make_tiny_gguf(tmp_path / "t.gguf", quant_types=("Q4_0", "Q8_0", "F16"))
    ours, theirs = GGUFFile.open(g.path), gguf.GGUFReader(str(g.path))
    assert ours.metadata == {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert len(ours.tensors) == len(theirs.tensors)
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert (mine.type_name, mine.shape) == (t.tensor_type.name, tuple(int(d) for d in t.shape))
        assert bytes(mine.data) == np.ascontiguousarray(t.data).tobytes()
    data = g.path.read_bytes()
    first_tensor = min(int(t.data_offset) for t in theirs.tensors)
    for cut in (3, 20, 200, first_tensor - 40, len(data) - 1):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(ModelLoadError):
            GGUFFile.open(tmp_path / "cut.gguf")


def test_gguf_error_names_every_unsupported_tensor_type(tmp_path):
    g = make_tiny_gguf(tmp_path / "t.gguf", raw_types={"blk.0.ffn_up.weight": "IQ4_NL", "blk.1.attn_v.weight": "TQ2_0"})
    with pytest.raises(ModelLoadError, match=r"2 tensor\(s\).*blk\.0\.ffn_up\.weight \(IQ4_NL\), blk\.1\.attn_v\.weight \(TQ2_0\); supported: .*Q4_K"):
        load_checkpoint(g.path)


def test_gguf_error_non_finite_scales(tmp_path):
    """A block whose f16 scale is infinite would dequantize to NaN: refused at load, named."""
    g = make_tiny_gguf(tmp_path / "t.gguf", quant_types=("Q8_0",))
    import gguf

    tensor = next(t for t in gguf.GGUFReader(str(g.path)).tensors if t.name == "blk.1.ffn_down.weight")
    with open(g.path, "r+b") as f:  # the third block's d field
        f.seek(int(tensor.data_offset) + 2 * 34)
        f.write(np.array([np.inf], np.float16).tobytes())
    with pytest.raises(ModelLoadError, match=r"blk\.1\.ffn_down\.weight.*Q8_0.*1 non-finite scales"):
        load_checkpoint(g.path)


# Config keys that change the computation, each flipped from the tiny model's value: the model
# must get another model_id or be refused by name (never the same id for another computation).
FLIPPED_KEYS = {
    "hidden_act": "gelu_pytorch_tanh", "sliding_window": 8, "rope_theta": 500000.0, "rms_norm_eps": 1e-6,
    "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True, "head_dim": 8,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64},
    "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "partial_rotary_factor": 0.5,
    "num_key_value_heads": 4, "max_position_embeddings": 128, "quantization_config": {"quant_method": "gptq"},
}


@pytest.mark.parametrize("key", sorted(FLIPPED_KEYS))
def test_hf_every_computation_key_changes_model_id_or_is_refused(tmp_path, key):
    from node.models.llama.config import LlamaConfig
    from node.runtime.loading import manifest_of

    folder = make_tiny_hf_checkpoint(tmp_path / "base")
    base = json.loads((folder / "config.json").read_text())
    flipped = {**base, key: FLIPPED_KEYS[key]}
    if key == "sliding_window":
        flipped["model_type"], flipped["architectures"] = "mistral", ["MistralForCausalLM"]
    try:
        config = LlamaConfig.from_hf_dict(flipped)
    except ConfigError as exc:
        assert key in str(exc)
        return
    ckpt = load_checkpoint(folder)
    other = type(ckpt)(**{**ckpt.__dict__, "config": config})
    assert manifest_of(other).model_id != manifest_of(ckpt).model_id
    if key == "sliding_window":  # served exactly: no more context than the window
        assert config.context_limit == 8


def test_gguf_error_names_an_unknown_llama_key_before_reading_weights(tmp_path):
    g = make_tiny_gguf(tmp_path / "t.gguf", extra_metadata={"llama.final_logit_softcapping": 30.0})
    with pytest.raises(ConfigError, match="llama.final_logit_softcapping"):
        load_checkpoint(g.path)


def test_gguf_error_unregistered_architecture(tmp_path):
    g = make_tiny_gguf(tmp_path / "t.gguf", arch="phi3")
    with pytest.raises(ConfigError, match=r"unsupported GGUF architecture 'phi3'.*supported: 'llama'.*'gemma3'"):
        load_checkpoint(g.path)


# ---------------------------------------------------------------------- weights digest


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_digest_hf_stable_and_sensitive_to_one_byte(tmp_path):
    folder = make_tiny_hf_checkpoint(tmp_path, dtype="bfloat16")
    d1, d2 = load_checkpoint(folder).weights_digest, load_checkpoint(folder).weights_digest
    assert d1 == d2 and len(d1) == 64
    _flip_byte(folder / "model.safetensors", (folder / "model.safetensors").stat().st_size - 1)
    assert load_checkpoint(folder).weights_digest != d1
    other = load_checkpoint(make_tiny_hf_checkpoint(tmp_path / "f16", dtype="float16")).weights_digest
    assert other != d1  # another dtype is another model


def test_digest_gguf_stable_and_sensitive_to_one_byte(tmp_path):
    import gguf

    g = make_tiny_gguf(tmp_path / "t.gguf", quant_types=ALL_GGUF_TYPES)
    d1 = load_checkpoint(g.path).weights_digest
    assert load_checkpoint(g.path).weights_digest == d1
    t = next(t for t in gguf.GGUFReader(str(g.path)).tensors if t.name == "blk.1.attn_output.weight")
    _flip_byte(g.path, int(t.data_offset) + 5)
    assert load_checkpoint(g.path).weights_digest != d1
    other = make_tiny_gguf(tmp_path / "q8.gguf", quant_types=("Q8_0",))
    assert load_checkpoint(other.path).weights_digest != d1


def test_digest_encoding_is_unambiguous():
    def dig(*tensors):
        d = WeightsDigest(len(tensors))
        for t in tensors:
            d.add(*t)
        return d.hexdigest()

    a = dig(("a", "F32", (2,), b"\x00" * 8))
    assert a != dig(("a", "F32", (2,), b"\x00" * 7 + b"\x01"))
    assert a != dig(("a", "F16", (2,), b"\x00" * 8))
    assert a != dig(("a", "F32", (1, 2), b"\x00" * 8))
    assert dig(("ab", "F32", (1,), b"")) != dig(("a", "bF32", (1,), b""))
    with pytest.raises(ValueError):
        dig(("b", "F32", (1,), b""), ("a", "F32", (1,), b""))


# ---------------------------------------------------------------------- numpy reference


@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory):
    ck = load_checkpoint(make_tiny_hf_checkpoint(tmp_path_factory.mktemp("ref"), qkv_bias=True))
    return ck, NumpyLlama.from_checkpoint(ck)


def test_reference_is_causal(tiny_ref):
    ck, model = tiny_ref
    ids = ck.tokenizer.encode_chat(CHAT)
    full = model.logits(ids)
    assert full.shape == (len(ids), ck.config.vocab_size) and full.dtype == np.float64
    np.testing.assert_allclose(model.logits(ids[:5]), full[:5], rtol=1e-12, atol=1e-12)
    changed = model.logits(ids[:5] + [7] + ids[6:])
    np.testing.assert_allclose(changed[:5], full[:5], rtol=1e-12, atol=1e-12)
    assert not np.allclose(changed[5:], full[5:])


def test_reference_float32_close_to_float64(tiny_ref):
    ck, model = tiny_ref
    ids = ck.tokenizer.encode_prompt("The capital of France is")
    f32 = NumpyLlama.from_checkpoint(ck, dtype=np.float32).logits(ids)
    assert f32.dtype == np.float32
    np.testing.assert_allclose(f32, model.logits(ids), atol=1e-4)


def test_reference_greedy_matches_logits_and_stops_at_eos(tiny_ref):
    ck, model = tiny_ref
    ids = ck.tokenizer.encode_prompt("Hello")
    out = model.greedy(ids, 4, eos_ids=())
    assert len(out) == 4
    for i, tok in enumerate(out):
        assert tok == int(np.argmax(model.logits(ids + out[:i])[-1]))
    assert model.greedy(ids, 4, eos_ids=[out[0]]) == out[:1]


def test_reference_untied_head_and_gguf_weights_agree(tmp_path):
    g = make_tiny_gguf(tmp_path / "t.gguf", quant_types=ALL_GGUF_TYPES, tie=False)
    ck = load_checkpoint(g.path)
    ids = [1, 50, 60, 70, 80]
    np.testing.assert_allclose(NumpyLlama.from_checkpoint(ck).logits(ids),
                               NumpyLlama(g.config, g.weights).logits(ids), rtol=1e-12, atol=1e-12)


def test_rope_llama3_scaling_changes_low_frequencies_only():
    from dataclasses import replace

    base = tiny_config(hidden=128, heads=2, kv_heads=2)  # head_dim 64
    scaled = replace(base, rope_theta=500000.0, rope_scaling=tuple(sorted({
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}.items())))
    plain = rope_inv_freq(replace(base, rope_theta=500000.0))
    got = rope_inv_freq(scaled)
    assert got[0] == plain[0]  # highest frequency untouched
    np.testing.assert_allclose(got[-1], plain[-1] / 8.0)  # lowest divided by the factor
    w = {k: np.zeros(s, np.float32) for k, s in expected_weight_shapes(scaled).items()}
    assert NumpyLlama(scaled, w).logits([1, 2, 3]).shape == (3, base.vocab_size)


# ---------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_checkpoint(make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tok"))).tokenizer


def test_tokenizer_round_trip(tok):
    for text in TEXTS:
        ids = tok.encode_prompt(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_chat_special_tokens_are_single_ids_and_no_double_bos(tmp_path, tok):
    text = tok.render_chat(CHAT)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ids = tok.encode_chat(CHAT)
    assert ids[0] == BOS_ID and ids[1] != BOS_ID
    assert ids.count(BOS_ID) == 3 and ids.count(EOS_ID) == 2  # system, user, assistant / two ends
    assert tok.decode(ids, skip_special_tokens=False) == text
    # a model whose raw prompts do get BOS still renders chats without a second one
    with_bos = load_checkpoint(make_tiny_hf_checkpoint(tmp_path, add_bos_token=True)).tokenizer
    assert with_bos.add_bos and with_bos.encode_prompt("Hi")[0] == BOS_ID
    assert with_bos.encode_chat(CHAT) == ids
    assert with_bos.fingerprint() != tok.fingerprint()


def test_add_bos_follows_gguf_metadata(tmp_path):
    on = load_checkpoint(make_tiny_gguf(tmp_path / "on.gguf", add_bos=True).path).tokenizer
    off = load_checkpoint(make_tiny_gguf(tmp_path / "off.gguf", add_bos=False).path).tokenizer
    assert on.encode_prompt("Hi") == [BOS_ID] + off.encode_prompt("Hi")
    assert on.encode_chat(CHAT) == off.encode_chat(CHAT)


def test_incremental_decoder_never_emits_broken_utf8(tok):
    text = "héllo 日本語 😀 and ü at the end"
    ids = tok.encode_prompt(text)
    assert len(ids) > len(text.encode("utf-8")) // 2, "multi-byte characters span several tokens"
    dec = tok.incremental_decoder()
    chunks = [dec.push(i) for i in ids]
    chunks.append(dec.flush())
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == text
    # special tokens are skipped in the stream
    dec = tok.incremental_decoder()
    assert "".join(dec.push(i) for i in tok.encode_prompt("Hi") + [EOS_ID]) + dec.flush() == "Hi"


def test_chat_template_errors(tmp_path, tok):
    folder = make_tiny_hf_checkpoint(tmp_path)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    bare = load_checkpoint(folder).tokenizer
    assert bare.chat_template is None
    with pytest.raises(NoChatTemplateError, match="no chat template"):
        bare.render_chat(CHAT)
    (folder / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}ok")
    strict = load_checkpoint(folder).tokenizer
    with pytest.raises(RequestError, match="system first"):
        strict.render_chat(CHAT)
    assert strict.render_chat([{"role": "system", "content": "x"}]) == "ok"


def test_fingerprints_are_stable_across_loads_and_follow_what_they_cover(tmp_path):
    """The same files give the same tokenizer fingerprint and model_id on every load; other
    weights give another model_id (the tokenizer's fingerprint stays: it covers text -> ids
    only), another text -> ids rule another fingerprint and another model_id. A constant
    fingerprint, or a model_id blind to either, fails here."""
    from node.runtime.loading import manifest_of

    base = load_checkpoint(make_tiny_hf_checkpoint(tmp_path / "base"))
    again = load_checkpoint(tmp_path / "base")
    assert again.tokenizer.fingerprint() == base.tokenizer.fingerprint()
    assert manifest_of(again).model_id == manifest_of(base).model_id
    reseeded = load_checkpoint(make_tiny_hf_checkpoint(tmp_path / "seed1", seed=1))
    assert reseeded.weights_digest != base.weights_digest
    assert manifest_of(reseeded).model_id != manifest_of(base).model_id
    assert reseeded.tokenizer.fingerprint() == base.tokenizer.fingerprint()
    flipped = load_checkpoint(make_tiny_hf_checkpoint(tmp_path / "bos", add_bos_token=not base.tokenizer.add_bos))
    assert flipped.tokenizer.fingerprint() != base.tokenizer.fingerprint()
    assert manifest_of(flipped).model_id != manifest_of(base).model_id


# ---------------------------------------------------------------------- the real default model

@pytest.fixture(scope="module")
def smollm2_path() -> str:
    """The pulled default model (downloaded on first use), or PROOFMESH_SMOLLM2_GGUF."""
    from compiled_models.registry import DEFAULT_MODEL
    from node.runtime import model_store

    return os.environ.get("PROOFMESH_SMOLLM2_GGUF") or str(model_store.resolve(DEFAULT_MODEL))


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return load_checkpoint(smollm2_path)


@pytest.mark.slow
def test_smollm2_gguf_loads(smollm2, smollm2_path):
    import gguf

    ck = smollm2
    assert len(gguf.GGUFReader(smollm2_path).tensors) == 272
    assert ck.weight_format == "gguf:F32+Q4_1+Q8_0"
    c = ck.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.head_dim, c.vocab_size, c.rope_theta, c.intermediate_size) == (64, 49152, 100000.0, 1536)
    assert c.tie_word_embeddings and c.max_position_embeddings == 8192 and abs(c.rms_norm_eps - 1e-5) < 1e-9
    assert len(ck.weights) == 272  # one HF tensor per GGUF tensor; the tied head is not duplicated
    t = ck.tokenizer
    assert (t.bos_token_id, t.eos_token_ids, t.add_bos) == (1, (2,), False)  # the file says add_bos_token=false
    assert t.encode_prompt("Hello, world!") == [19556, 28, 905, 17]
    assert t.encode_prompt("The year 2024") == [504, 713, 216, 34, 32, 34, 36]  # digits one by one
    for text in TEXTS:
        assert t.decode(t.encode_prompt(text)) == text
    rendered = t.render_chat(CHAT)
    assert rendered == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                        "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                        "<|im_start|>assistant\n")
    ids = t.encode_chat(CHAT)
    assert ids[:3] == [1, 9690, 198] and ids[-4:] == [1, 520, 9531, 198] and ids.count(1) == 3


@pytest.mark.slow
def test_smollm2_numpy_greedy_answers_paris(smollm2):
    model = NumpyLlama.from_checkpoint(smollm2, dtype=np.float32)  # float64 gives the same tokens, slower
    t = smollm2.tokenizer
    out = model.greedy(t.encode_chat(CHAT), 8, t.eos_token_ids)
    assert t.decode(out).startswith("The capital of France is Paris")

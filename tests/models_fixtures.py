"""Tiny checkpoints written to disk for tests: a Hugging Face folder and a GGUF file, for Llama and
for each other registered architecture (Qwen3, Gemma 3).

Both are built from the same deterministic pieces: random weights from a fixed numpy seed and a
small byte-level BPE trained with ``tokenizers`` on a short text, with the ChatML special tokens
``<|endoftext|>`` (0), ``<|im_start|>`` (1), ``<|im_end|>`` (2). The GGUF writer stores q/k rows
permuted as llama.cpp's converter does and quantizes with ``gguf.quants``, so the loaders' name maps,
un-permutation and dequantization are exercised against values computed here independently.
``home_sharing`` gives a subprocess its own ``PROOFMESH_HOME`` whose builds (compiled libraries,
prepared checkpoints, manifests) are another store's, so one shape compiles once a session.
Qwen3 and Gemma 3 GGUF files take their tensor names from ``gguf``'s own ``TensorNameMap`` (llama.cpp's
map, not ours), keep q/k rows unpermuted and, for Gemma 3, store every norm as ``w + 1``, as
``convert_hf_to_gguf.py`` does.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from node.models import architectures
from node.models.gemma3.config import GLOBAL, SLIDING, Gemma3Config
from node.models.llama.config import LlamaConfig
from node.models.quant.blocks import FORMATS, QUANTIZABLE_TYPES
from node.models.qwen3.config import Qwen3Config

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID = 1, 2  # <|im_start|>, <|im_end|> as in SmolLM2
DEFAULT_VOCAB = 320
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. What is the capital of France? "
    "The capital of France is Paris. Paris is a city in France, and Berlin is the capital of Germany.\n"
    "Hello, world! hello there, how are you today? I am fine, thank you. 1234567890 numbers 2024.\n"
    "Café, naïve, résumé, façade. 日本語のテキスト。 Ünïcödé and emoji 😀 too.\n"
    "def main():\n    return 42\n\n"
) * 4

SHARED_DIRS = ("libs", "prepared", "manifests")  # what a model costs to build; keys, evidence, ledgers stay apart
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def home_sharing(home: Path, store: Path) -> Path:
    """``home`` (created if need be) with ``store``'s ``SHARED_DIRS`` as symlinks: a fresh node or
    CLI home that finds every library already built in ``store`` and adds the ones it builds there."""
    home.mkdir(parents=True, exist_ok=True)
    for d in SHARED_DIRS:
        (store / d).mkdir(parents=True, exist_ok=True)
        (home / d).symlink_to(store / d)
    return home


# ---------------------------------------------------------------------- tokenizer


@lru_cache(maxsize=None)
def tiny_tokenizer_json(vocab: int = DEFAULT_VOCAB) -> str:
    """tokenizer.json text of a byte-level BPE with exactly ``vocab`` tokens (padded with reserved specials)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    assert vocab >= 256 + len(SPECIAL_TOKENS), "vocab must hold the 256 byte tokens and the specials"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TRAINING_TEXT], trainer)
    missing = vocab - tok.get_vocab_size(with_added_tokens=True)
    if missing > 0:
        tok.add_special_tokens([AddedToken(f"<|reserved_{i}|>", special=True, normalized=False) for i in range(missing)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    return tok.to_str()


def gguf_vocab(vocab: int = DEFAULT_VOCAB) -> tuple[list[str], list[str], list[int]]:
    """(tokens by id, merges as "a b" strings, GGUF token types) of the tiny tokenizer."""
    doc = json.loads(tiny_tokenizer_json(vocab))
    by_id = {i: t for t, i in doc["model"]["vocab"].items()}
    special = set()
    for added in doc["added_tokens"]:
        by_id[added["id"]] = added["content"]
        special.add(added["id"])
    tokens = [by_id[i] for i in range(vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]]
    types = [3 if i in special else 1 for i in range(vocab)]  # CONTROL / NORMAL
    return tokens, merges, types


# ---------------------------------------------------------------------- weights


def tiny_config(
    *, tie: bool = False, qkv_bias: bool = False, n_layers: int = 2, hidden: int = 64, heads: int = 4,
    kv_heads: int = 2, intermediate: int = 128, vocab: int = DEFAULT_VOCAB, rope_theta: float = 10000.0,
    context: int = 256,
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=n_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads, rms_norm_eps=1e-5,
        rope_theta=rope_theta, tie_word_embeddings=tie, attention_bias=qkv_bias, max_position_embeddings=context,
        model_type="qwen2" if qkv_bias else "llama",
    )


def random_llama_weights(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 HF-named weights as transformers holds them, deterministic in (config, seed), scaled so
    activations stay O(1). Gemma 3's norms hold ``w`` of its ``1 + w`` multiplier, so theirs are near 0."""
    rng = np.random.default_rng(seed)
    norm_offset = 0.0 if cfg.model_type == "gemma3" else 1.0
    out = {}
    for name, shape in sorted(architectures.of_config(cfg).expected_weight_shapes(cfg).items()):
        if name.endswith("norm.weight"):
            w = norm_offset + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            w = 0.1 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight":
            w = rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        out[name] = w.astype(np.float32)
    return out


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even (no NaNs expected)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    return ((u + rounding) >> 16).astype(np.uint16)


def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values a loader must return for ``x`` stored as ``dtype``."""
    if dtype == "float32":
        return np.asarray(x, np.float32)
    if dtype == "float16":
        return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return (to_bf16_bits(x).astype(np.uint32) << 16).view(np.float32)
    raise ValueError(dtype)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "float32") -> None:
    """Minimal safetensors writer (fp32/fp16/bf16; numpy has no bf16, hence not safetensors.numpy)."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name], np.float32)
        if dtype == "bfloat16":
            raw = to_bf16_bits(arr).astype("<u2").tobytes()
        else:
            raw = arr.astype("<f4" if dtype == "float32" else "<f2").tobytes()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = {"format": "pt"}
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    with open(path, "wb") as f:
        f.write(len(hbytes).to_bytes(8, "little"))
        f.write(hbytes)
        for raw in blobs:
            f.write(raw)


# ---------------------------------------------------------------------- Hugging Face folder


def make_tiny_hf_checkpoint(
    folder: str | Path, *, dtype: str = "float32", tie: bool = False, qkv_bias: bool = False, n_layers: int = 2,
    hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128, vocab: int = DEFAULT_VOCAB,
    seed: int = 0, rope_theta: float = 10000.0, rope_in_parameters: bool = False, template_in_jinja: bool = False,
    add_bos_token: bool | None = None, store_tied_lm_head: bool = False, context: int = 256,
) -> Path:
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json (+ chat_template.jinja).

    The float32 values the loader must return: ``round_to_dtype(random_llama_weights(cfg, seed), dtype)``
    with ``cfg = tiny_config(...)`` of the same arguments (``tiny_hf_expected_weights`` does it).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(tie=tie, qkv_bias=qkv_bias, n_layers=n_layers, hidden=hidden, heads=heads,
                      kv_heads=kv_heads, intermediate=intermediate, vocab=vocab, rope_theta=rope_theta, context=context)
    config = {
        "architectures": ["Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM"],
        "model_type": cfg.model_type,
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": n_layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads, "rms_norm_eps": 1e-5, "max_position_embeddings": context,
        "tie_word_embeddings": tie, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "torch_dtype": dtype,
        "_proofmesh_seed": seed,
    }
    if rope_in_parameters:
        config["rope_parameters"] = {"rope_theta": rope_theta, "rope_type": "default"}
    else:
        config["rope_theta"] = rope_theta
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    weights = random_llama_weights(cfg, seed)
    if tie and store_tied_lm_head:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    write_safetensors(folder / "model.safetensors", weights, dtype)
    (folder / "tokenizer.json").write_text(tiny_tokenizer_json(vocab))
    tok_cfg = {"bos_token": SPECIAL_TOKENS[BOS_ID], "eos_token": SPECIAL_TOKENS[EOS_ID],
               "unk_token": SPECIAL_TOKENS[0], "pad_token": SPECIAL_TOKENS[0], "model_max_length": context}
    if add_bos_token is not None:
        tok_cfg["add_bos_token"] = add_bos_token
    if template_in_jinja:
        (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    else:
        tok_cfg["chat_template"] = CHATML_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return folder


def tiny_hf_expected_weights(folder: str | Path) -> dict[str, np.ndarray]:
    """The float32 weights ``load_checkpoint(folder)`` must return for a ``make_tiny_hf_checkpoint`` folder."""
    raw = json.loads((Path(folder) / "config.json").read_text())
    cfg = LlamaConfig.from_hf_dict(raw)
    w = random_llama_weights(cfg, raw["_proofmesh_seed"])
    return {k: round_to_dtype(v, raw["torch_dtype"]) for k, v in w.items()}


# ---------------------------------------------------------------------- GGUF


class TinyGGUF(NamedTuple):
    path: Path
    weights: dict[str, np.ndarray]  # HF names, float32, what the loader must return (dequantized)
    config: LlamaConfig
    types: dict[str, str]  # GGUF tensor name -> stored GGML type


def hf_to_gguf_name(name: str) -> str:
    """Written out independently of the loader's map (llama.cpp ``gguf.constants`` names)."""
    glob = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}
    if name in glob:
        return glob[name]
    parts = name.split(".")  # model.layers.N.<module>.<proj>.weight
    i, rest = parts[2], ".".join(parts[3:])
    table = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{table[module]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Copy of llama.cpp ``convert_hf_to_gguf.py`` ``LlamaModel.permute``."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(x: np.ndarray, ggml_type: str, seed: int) -> np.ndarray:
    """(rows, bytes) random blocks of a K-quant type whose dequantized values have about ``x``'s
    spread (any bytes are a valid block; the f16 scales are set so that a uniform spread has x's
    standard deviation): stand-ins for llama.cpp's quantizer, which the ``gguf`` package does not port."""
    import gguf
    from gguf.quants import dequantize

    qt = gguf.GGMLQuantizationType[ggml_type]
    values, size = gguf.GGML_QUANT_SIZES[qt]
    rows = x.shape[0]
    blocks = np.random.default_rng(seed).integers(0, 256, (rows, x.shape[1] // values, size), dtype=np.uint8)
    scale_fields = FORMATS[ggml_type].f16_fields
    for at in scale_fields:
        blocks[:, :, at:at + 2] = np.array([1.0], np.float16).view(np.uint8)
    spread = float(np.abs(dequantize(blocks.reshape(rows, -1), qt)).max())
    for at in scale_fields:
        blocks[:, :, at:at + 2] = np.array([np.sqrt(3.0) * x.std() / spread], np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def make_tiny_gguf(
    path: str | Path, *, quant_types: Sequence[str] = ("F32",), tie: bool = True, n_layers: int = 2,
    hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128, vocab: int = DEFAULT_VOCAB,
    seed: int = 0, rope_theta: float = 10000.0, add_bos: bool = False, arch: str = "llama",
    raw_types: dict[str, str] | None = None, chat_template: str | None = CHATML_TEMPLATE,
    extra_metadata: dict[str, float] | None = None,
) -> TinyGGUF:
    """Write a Llama-family GGUF as llama.cpp's converter would; 2-D tensors take ``quant_types``
    round-robin. q/k rows are permuted for ``arch="llama"`` (LlamaModel), not for ``"qwen2"`` (Qwen2Model).

    A quantized type whose block does not divide the row length falls back to F16 (if listed) or F32;
    norms stay F32. ``raw_types`` writes the named GGUF tensors as random bytes of another GGML type
    (to test unsupported types); ``extra_metadata`` adds float keys (to test refused ones).
    """
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(tie=tie, n_layers=n_layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                      intermediate=intermediate, vocab=vocab, rope_theta=rope_theta)
    hf = random_llama_weights(cfg, seed)
    raw_types = dict(raw_types or {})

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test-llama")
    _add_tiny_tokenizer(w, vocab, add_bos, chat_template)
    w.add_block_count(n_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(intermediate)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(vocab)
    for key, value in (extra_metadata or {}).items():
        w.add_float32(key, value)

    expected: dict[str, np.ndarray] = {}
    stored_types: dict[str, str] = {}
    matrices = sorted(n for n in hf if hf[n].ndim == 2)
    for name in sorted(hf, key=hf_to_gguf_name):
        gname, x = hf_to_gguf_name(name), hf[name]
        if gname in raw_types:
            qt = gguf.GGMLQuantizationType[raw_types[gname]]
            block, type_size = gguf.GGML_QUANT_SIZES[qt]
            nbytes = x.shape[0] * (x.shape[-1] // block) * type_size
            junk = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8)
            w.add_tensor(gname, junk.reshape(x.shape[0], -1), raw_dtype=qt)
            stored_types[gname] = raw_types[gname]
            continue
        if x.ndim == 1:
            tname = "F32"
        else:
            tname = quant_types[matrices.index(name) % len(quant_types)]
            if tname not in ("F32", "F16") and x.shape[1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[tname]][0]:
                tname = "F16" if "F16" in quant_types else "F32"
        permute_heads = None  # LlamaModel's converter permutes q/k rows; Qwen2Model's does not
        if arch in ("llama", "mistral"):
            permute_heads = {"attn_q.weight": heads, "attn_k.weight": kv_heads}.get(gname.split(".", 2)[-1])
        expected[name] = _add_gguf_tensor(w, gname, x, tname, permute_heads=permute_heads, seed=len(expected))
        stored_types[gname] = tname
    _finish(w)
    return TinyGGUF(path, expected, cfg, stored_types)


def _add_tiny_tokenizer(w, vocab: int, add_bos: bool, chat_template: str | None) -> None:
    tokens, merges, types = gguf_vocab(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(0)
    w.add_add_bos_token(add_bos)
    if chat_template is not None:
        w.add_chat_template(chat_template)


def _add_gguf_tensor(w, gname: str, x: np.ndarray, tname: str, permute_heads: int | None = None,
                     seed: int = 0) -> np.ndarray:
    """Write HF tensor ``x`` as GGML type ``tname`` (rows permuted for ``permute_heads`` as
    llama.cpp's LlamaModel does); return the float32 rows the loader must give back: ``x`` as the
    type stores it, unpermuted (blocks run along rows, so quantization commutes with the row
    permutation). K-quants, which gguf cannot quantize, are random valid blocks."""
    import gguf
    from gguf.quants import dequantize, quantize

    def permute(a: np.ndarray) -> np.ndarray:
        return llama_cpp_permute(a, permute_heads) if permute_heads else a

    if tname == "F32":
        w.add_tensor(gname, np.ascontiguousarray(permute(x), np.float32))
        return np.array(x, np.float32)
    if tname == "F16":
        w.add_tensor(gname, np.ascontiguousarray(permute(x), np.float16))
        return x.astype(np.float16).astype(np.float32)
    qt = gguf.GGMLQuantizationType[tname]
    if tname not in QUANTIZABLE_TYPES:
        blocks = random_k_blocks(x, tname, seed=seed)
        w.add_tensor(gname, permute(blocks), raw_dtype=qt)
        return np.asarray(dequantize(blocks, qt), np.float32).reshape(x.shape)
    w.add_tensor(gname, quantize(permute(x), qt), raw_dtype=qt)
    return np.asarray(dequantize(quantize(x, qt), qt), np.float32).reshape(x.shape)


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---------------------------------------------------------------------- Qwen3 and Gemma 3


def tiny_qwen3_config(*, vocab: int = DEFAULT_VOCAB) -> Qwen3Config:
    """head_dim 32 with hidden 64 and 4 heads: not hidden / heads, so it must come from the config."""
    return Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                       rope_theta=1_000_000.0, tie_word_embeddings=True, max_position_embeddings=256)


TINY_GEMMA3_WINDOW = 24  # shorter than the tests' sequences, not a multiple of the 16-token KV page


def tiny_gemma3_config(*, vocab: int = DEFAULT_VOCAB, final_logit_softcapping: float | None = 30.0) -> Gemma3Config:
    """Six layers so that the sixth is global as in llama.cpp's fixed pattern (GGUF has no layer list);
    query_pre_attn_scalar = head_dim because a GGUF file cannot say otherwise below 62 layers; a soft
    cap that bends the tiny model's logits (up to ~25) without flattening them."""
    n_layers = 6
    return Gemma3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=n_layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        layer_types=tuple(GLOBAL if (i + 1) % 6 == 0 else SLIDING for i in range(n_layers)),
        sliding_window=TINY_GEMMA3_WINDOW, query_pre_attn_scalar=32, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0, final_logit_softcapping=final_logit_softcapping, tie_word_embeddings=True,
        max_position_embeddings=256,
    )


def _hf_config_json(cfg) -> dict:
    """config.json as transformers writes it for ``cfg``'s architecture."""
    common = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
        "torch_dtype": "float32", "attention_bias": False,
    }
    if cfg.model_type == "qwen3":
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **common,
                "use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.num_hidden_layers}
    return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **common,
            "layer_types": list(cfg.layer_types), "sliding_window": cfg.sliding_window,
            "query_pre_attn_scalar": cfg.query_pre_attn_scalar, "rope_local_base_freq": cfg.rope_local_base_freq,
            "final_logit_softcapping": cfg.final_logit_softcapping, "attn_logit_softcapping": None,
            "hidden_activation": "gelu_pytorch_tanh", "rope_scaling": None}


def expected_checkpoint_weights(cfg, hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a Checkpoint holds for HF weights ``hf``: the same, except Gemma 3's norms, held as the
    multiplier ``1 + w`` (computed in float32, as transformers and llama.cpp's converter do)."""
    if cfg.model_type != "gemma3":
        return {k: np.array(v, np.float32) for k, v in hf.items()}
    return {k: (v + np.float32(1.0)) if k.endswith("norm.weight") else np.array(v, np.float32) for k, v in hf.items()}


def make_tiny_arch_hf_checkpoint(folder: str | Path, cfg, *, seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """A float32 HF folder of ``cfg`` (Qwen3 or Gemma 3) with the tiny tokenizer; returns the folder and
    the weights ``load_checkpoint`` must give back."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(_hf_config_json(cfg), indent=2))
    hf = random_llama_weights(cfg, seed)
    write_safetensors(folder / "model.safetensors", hf)
    (folder / "tokenizer.json").write_text(tiny_tokenizer_json(cfg.vocab_size))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": SPECIAL_TOKENS[BOS_ID], "eos_token": SPECIAL_TOKENS[EOS_ID], "unk_token": SPECIAL_TOKENS[0],
         "pad_token": SPECIAL_TOKENS[0], "chat_template": CHATML_TEMPLATE}))
    return folder, expected_checkpoint_weights(cfg, hf)


def make_tiny_arch_gguf(path: str | Path, cfg, *, quant_types: Sequence[str] = ("F32",), seed: int = 0) -> TinyGGUF:
    """``cfg`` (Qwen3 or Gemma 3) as llama.cpp's converter writes it: ``gguf``'s name map, rows as HF
    has them, Gemma 3's norms stored as ``w + 1``; 2-D tensors take ``quant_types`` round-robin."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arch = {"qwen3": gguf.MODEL_ARCH.QWEN3, "gemma3": gguf.MODEL_ARCH.GEMMA3}[cfg.model_type]
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    hf = random_llama_weights(cfg, seed)
    w = gguf.GGUFWriter(str(path), cfg.model_type)
    w.add_name(f"tiny-test-{cfg.model_type}")
    _add_tiny_tokenizer(w, cfg.vocab_size, add_bos=False, chat_template=CHATML_TEMPLATE)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.model_type == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
        if cfg.final_logit_softcapping is not None:
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    else:
        w.add_rope_dimension_count(cfg.head_dim)
    expected: dict[str, np.ndarray] = {}
    stored_types: dict[str, str] = {}
    matrices = sorted(n for n in hf if hf[n].ndim == 2)
    for name in sorted(hf):
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        x = hf[name]
        if cfg.model_type == "gemma3" and name.endswith("norm.weight"):
            x = x + np.float32(1.0)  # Gemma3Model.norm_shift
        tname = "F32" if x.ndim == 1 else quant_types[matrices.index(name) % len(quant_types)]
        expected[name] = _add_gguf_tensor(w, gname, x, tname, seed=len(expected))
        stored_types[gname] = tname
    _finish(w)
    return TinyGGUF(path, expected, cfg, stored_types)


__all__ = [
    "BOS_ID", "CHATML_TEMPLATE", "DEFAULT_VOCAB", "EOS_ID", "SPECIAL_TOKENS", "TINY_GEMMA3_WINDOW", "TinyGGUF",
    "SHARED_DIRS", "expected_checkpoint_weights", "gguf_vocab", "hf_to_gguf_name", "home_sharing", "llama_cpp_permute", "make_tiny_arch_gguf",
    "make_tiny_arch_hf_checkpoint", "make_tiny_gguf", "make_tiny_hf_checkpoint", "random_k_blocks",
    "random_llama_weights", "round_to_dtype", "tiny_config", "tiny_gemma3_config", "tiny_hf_expected_weights",
    "tiny_qwen3_config", "tiny_tokenizer_json", "write_safetensors",
]

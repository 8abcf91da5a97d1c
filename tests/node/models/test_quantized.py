"""Quantized weights served natively: the kernels dequantize exactly as the ``gguf`` package
does, a natively served model gives the fp32 path's logits, and answers made on one path pass
the verifier running on the other (both are honest backends of one ``model_id``)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import tvm
from tvm import te

from node.api.service import answer_file
from node.compiler.build import compile_model
from node.runtime.loading import load_checkpoint_cached, load_model, model_parameters
from node.models.quant.blocks import FORMATS, QuantizedTensor, planes_dequantize
from node.models.quant.kernels import fused_max_tokens, quant_matmul_cpu, quant_take_te, token_tile_for
from node.runtime.model_runtime import CacheLimits
from node.compiler.targets import cuda_target_for_arch
from node.hardware import vector_registers
from tvm.target import Target
from tests.node.runtime.engine_helpers import generate
from tests.models_fixtures import make_tiny_gguf
from verify.evidence import AnswerFile
from verify.identity import NodeKey
from verify.verifier import verify_answer

LIMITS = CacheLimits(max_batch_size=4, max_total_tokens=1024, prefill_chunk=64)
KEY = NodeKey.generate()


def random_blocks(ggml_type: str, rows: int, cols: int, seed: int) -> QuantizedTensor:
    """Random bytes for every quant and packed sub-block scale (any bytes are a valid block), random
    finite f16 scales and mins of mixed sign and size; 16-bit floats: random finite values."""
    rng = np.random.default_rng(seed)
    fmt = FORMATS[ggml_type]
    if fmt.kind == "float":
        values = (rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-3, 3, (rows, cols))).astype(np.float32)
        bits = values.astype(np.float16).view(np.uint16) if ggml_type == "F16" else (values.view(np.uint32) >> 16).astype(np.uint16)
        return QuantizedTensor(ggml_type, (rows, cols), bits.view(np.uint8).reshape(rows, -1))
    n = cols // fmt.block_values
    blocks = rng.integers(0, 256, (rows, n, fmt.block_bytes), dtype=np.uint8)
    for at in fmt.f16_fields:
        scales = rng.standard_normal((rows, n)) * 10.0 ** rng.integers(-4, 1, (rows, n))
        blocks[:, :, at:at + 2] = scales.astype(np.float16).view(np.uint8).reshape(rows, n, 2)
    return QuantizedTensor(ggml_type, (rows, cols), blocks.reshape(rows, -1))


_KERNELS: dict = {}


def compiled_kernel(qt: QuantizedTensor, token_tile: int = 1):
    """The CPU kernel for ``qt``'s type and shape (compiled once per module), as a function of
    x (n, cols) -> (n, rows)."""
    rows, cols = qt.shape
    key = (qt.ggml_type, rows, cols, token_tile)
    if key not in _KERNELS:
        kernel = quant_matmul_cpu(qt.ggml_type, rows, cols, token_tile).with_attr("global_symbol", "kernel")
        _KERNELS[key] = tvm.compile(tvm.IRModule({"kernel": kernel}), target=tvm.target.Target.from_device(tvm.cpu()))
    lib, dev = _KERNELS[key], tvm.cpu()
    parts = [tvm.runtime.tensor(qt.split()[s], dev) for s in qt.format.param_suffixes()]

    def run(x: np.ndarray) -> np.ndarray:  # (n, cols) as (1, n, cols)
        out = tvm.runtime.tensor(np.zeros((1, x.shape[0], rows), np.float32), dev)
        lib["kernel"](tvm.runtime.tensor(x[None], dev), *parts, out)
        return out.numpy()[0]

    return run


def _cols(ggml_type: str) -> int:
    return 512 if FORMATS[ggml_type].block_values == 256 else 96


# One type per loop nest and unpacking: legacy 4 and 8 bits, planes with 4 low bits (one scale
# per 32 weights, and per 16), with 2 low bits, and a 16-bit float.
NEST_TYPES = ("Q4_1", "Q8_0", "Q5_K", "Q6_K", "Q3_K", "BF16")


@pytest.mark.parametrize("ggml_type", sorted(FORMATS))
def test_kernels_dequantize_as_gguf_does(ggml_type):
    """x = identity rows pick each weight out: both loop nests (decode's, one row at a time, and
    the tiled one, all rows at once) must equal gguf's dequantize, which is independent of us,
    within one unit in the last place (16-bit floats: exactly the float32 widening at load gives)."""
    qt = random_blocks(ggml_type, rows=16, cols=_cols(ggml_type), seed=len(ggml_type) + ord(ggml_type[1]))
    expected = qt.dequantize()  # (rows, cols)
    eye = np.eye(qt.shape[1], dtype=np.float32)
    run = compiled_kernel(qt)
    tiled = run(eye).T  # n = cols > fused_max_tokens: the tiled nest
    fused = np.concatenate([run(eye[i:i + 1]) for i in range(qt.shape[1])]).T
    assert qt.shape[1] > fused_max_tokens(qt.format)
    if qt.format.kind == "float":
        np.testing.assert_array_equal(tiled, expected)
        np.testing.assert_array_equal(fused, expected)
    else:
        np.testing.assert_array_max_ulp(tiled, expected, maxulp=1)
        np.testing.assert_array_max_ulp(fused, expected, maxulp=1)
    if qt.format.kind == "planes":  # the formula the kernels compute, on the decoded planes
        np.testing.assert_array_max_ulp(planes_dequantize(ggml_type, qt.blocks.reshape(-1, qt.format.block_bytes)).reshape(qt.shape),
                                        expected, maxulp=1)


@pytest.mark.parametrize("ggml_type", sorted(FORMATS))
def test_embedding_rows_are_gguf_dequantize(ggml_type):
    """The TE definition (the embedding lookup, and every GPU matmul) evaluates the same per-format
    dequantization as the CPU kernel's tiled nest: a row taken must be gguf's row, bit for bit."""
    qt = random_blocks(ggml_type, rows=16, cols=_cols(ggml_type), seed=7)
    split, names = qt.split(), qt.format.param_suffixes()
    ids = te.placeholder((5,), "int32", "ids")
    params = [te.placeholder(split[n].shape, str(split[n].dtype), n) for n in names]
    lib = tvm.compile(te.create_prim_func([ids, *params, quant_take_te(ids, ggml_type, *params)]), target="llvm")
    dev, rows = tvm.cpu(), np.array([0, 3, 7, 8, 15], np.int32)
    out = tvm.runtime.tensor(np.zeros((5, qt.shape[1]), np.float32), dev)
    lib(tvm.runtime.tensor(rows, dev), *[tvm.runtime.tensor(split[n], dev) for n in names], out)
    np.testing.assert_array_equal(out.numpy(), qt.dequantize()[rows])


@pytest.mark.parametrize("ggml_type", NEST_TYPES)
def test_a_token_rows_output_never_depends_on_the_register_tile_or_its_batch(ggml_type):
    """The tiled nest takes token rows ``token_tile`` at a time (the target's register file picks
    it) and the rest one by one: every row must come out bit for bit the same whichever way it
    went, so a batched answer is the answer the same row gets alone (batch >= 3: the tiled nest)."""
    qt = random_blocks(ggml_type, rows=64, cols=_cols(ggml_type), seed=5)
    x = np.random.default_rng(6).standard_normal((17, qt.shape[1])).astype(np.float32)
    single = compiled_kernel(qt, 1)(x)
    for tile in (2, 3, token_tile_for(vector_registers(Target.from_device(tvm.cpu())))):
        run = compiled_kernel(qt, tile)
        np.testing.assert_array_equal(run(x), single)
        np.testing.assert_array_equal(run(x[4:9]), single[4:9])  # whole tiles and a remainder, other offsets


@pytest.mark.parametrize("ggml_type", sorted(FORMATS))
def test_kernels_multiply_like_float64(ggml_type):
    qt = random_blocks(ggml_type, rows=16, cols=_cols(ggml_type), seed=len(ggml_type) + ord(ggml_type[1]))
    w = qt.dequantize().astype(np.float64)
    run = compiled_kernel(qt)
    for n in (1, 2, 3, 17):
        x = np.random.default_rng(n).standard_normal((n, qt.shape[1])).astype(np.float32)
        ref = x.astype(np.float64) @ w.T
        np.testing.assert_allclose(run(x), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_split_arrays_are_the_blocks_bytes():
    qt = random_blocks("Q4_1", rows=16, cols=64, seed=1)
    parts = qt.split()
    assert parts["qweight"].shape == (2, 2, 8, 16) and parts["scales"].shape == (2, 2, 8)
    assert parts["qweight"].nbytes + parts["scales"].nbytes + parts["mins"].nbytes == qt.nbytes
    block = qt.blocks[11, 20:40]  # row 11 (tile 1, row 3 in it), second block
    assert block[0:2].view(np.float16)[0] == parts["scales"][1, 1, 3] and block[2:4].view(np.float16)[0] == parts["mins"][1, 1, 3]
    assert bytes(block[4:]) == bytes(parts["qweight"][1, 1, 3])


@pytest.mark.parametrize("ggml_type", sorted(t for t in FORMATS if FORMATS[t].kind != "legacy"))
def test_split_keeps_the_stored_size(ggml_type):
    """The native form is the stored information regrouped, not widened: within 4 % of the file's
    bytes (Q2_K: its 4-bit scales and mins take a byte each, 19 %)."""
    qt = random_blocks(ggml_type, rows=16, cols=512, seed=2)
    ratio = sum(a.nbytes for a in qt.split().values()) / qt.nbytes
    assert 1.0 <= ratio <= (1.2 if ggml_type == "Q2_K" else 1.04)


def test_non_finite_scales_are_counted():
    qt = random_blocks("Q4_K", rows=8, cols=512, seed=3)
    assert qt.non_finite() == 0
    qt.blocks[2, 144 + 2:144 + 4] = np.array([np.inf], np.float16).view(np.uint8)  # row 2, block 1's dmin
    assert qt.non_finite() == 1


# One type everywhere (untied: a quantized lm_head), the legacy types mixed, a mix like llama.cpp's
# Q4_K_M (K-quants need rows of 256), and 16-bit floats.
@pytest.fixture(scope="module", params=[("Q4_1",), ("Q4_0", "Q4_1", "Q8_0"), ("Q4_K", "Q6_K", "Q5_0", "Q8_0"), ("F16",)], ids="+".join)
def both_paths(request, tmp_path_factory, store):
    tie = request.param != ("Q4_1",)
    size = {"hidden": 256, "intermediate": 512} if "Q4_K" in request.param else {}
    gguf = make_tiny_gguf(tmp_path_factory.mktemp("q") / "tiny.gguf", quant_types=request.param, tie=tie, **size)
    native = load_model(str(gguf.path), device="cpu", limits=LIMITS, root=store, weights="native")
    fp32 = load_model(str(gguf.path), device="cpu", limits=LIMITS, root=store, weights="fp32")
    return request.param, native, fp32


def test_native_logits_equal_fp32_path(both_paths):
    types, native, fp32 = both_paths
    assert native.model_id == fp32.model_id and native.backend.endswith("/native") and not fp32.weight_layout
    assert {part for kinds in native.weight_layout.values() for part in kinds.split("+")} == set(types)
    if len(types) > 1:  # q, k and v of different types: one projection of parted matmuls, none widened
        assert any("+" in kinds for kinds in native.weight_layout.values())
    if len(types) == 1:  # one type everywhere: q/k/v and gate/up fuse as blocks too, and the embedding
        assert {"model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.gate_up_proj", "model.embed_tokens"} <= set(native.weight_layout)
    ids = list(range(3, 70))
    a, b = native.score(ids), fp32.score(ids)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
    for n in range(1, 5):  # decode at several batch sizes takes the fused loop nest
        rt_a, rt_b = native.runtime, fp32.runtime
        seqs = list(range(100, 100 + n))
        for s in seqs:
            rt_a.add_sequence(s)
            rt_b.add_sequence(s)
            rt_a.prefill(s, ids[: 5 + s % 7])
            rt_b.prefill(s, ids[: 5 + s % 7])
        step = [ids[s % 11] for s in seqs]
        da, db = rt_a.decode(seqs, step), rt_b.decode(seqs, step)
        np.testing.assert_allclose(da, db, rtol=0, atol=1e-4 * np.abs(db).max())
        for s in seqs:
            rt_a.remove_sequence(s)
            rt_b.remove_sequence(s)


def test_answers_cross_verify_between_paths(both_paths):
    _, native, fp32 = both_paths
    for maker, checker in ((native, fp32), (fp32, native)):
        for temperature in (0.0, 0.9):
            result = generate(maker, "Tell me a story", temperature=temperature, max_tokens=24, seed=11)
            answer = answer_file(result, KEY, model_id=maker.model_id, backend=maker.backend)
            verdict = verify_answer(AnswerFile.model_validate_json(answer.model_dump_json()), checker)
            assert verdict.verdict == "pass", verdict


def test_native_model_keeps_no_float32_copy(both_paths, store):
    """Every quantized matrix is uploaded as its blocks: the parameters hold the file's bytes."""
    types, native, _ = both_paths
    params, layout = model_parameters(load_checkpoint_cached(native.path, store, keep_quantized=True))
    quantized_bytes = sum(a.nbytes for a in params.values() if a.dtype != np.float32)
    float_bytes = sum(a.nbytes for a in params.values() if a.dtype == np.float32)
    assert layout == native.weight_layout and quantized_bytes > 0
    assert float_bytes < 0.05 * quantized_bytes  # only the norms stay float32


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="TVM needs nvcc to build CUDA kernels")
def test_quantized_cuda_library_compiles_without_a_gpu(tmp_path, both_paths):
    types, native, _ = both_paths
    if len(types) > 1:
        pytest.skip("one mixed layout is enough on the CPU; CUDA builds take a while")
    lib = compile_model(native.config, cuda_target_for_arch("sm_90"), tmp_path, layout=native.weight_layout)
    assert lib.path.exists() and any(d != "float32" for d in lib.param_dtypes)


def test_compile_quantize_makes_a_new_native_model(tmp_path, store):
    """``proofmesh compile FOLDER --quantize q8_0``: a new folder of blocks, its own model_id, served
    natively, within quantization error of the float original and equal to its own fp32 path."""
    import subprocess
    import sys

    from tests.models_fixtures import home_sharing, make_tiny_hf_checkpoint

    source = make_tiny_hf_checkpoint(tmp_path / "tiny_hf", tie=False)
    home = home_sharing(tmp_path / "home", store)  # the native library built here is the one loaded below
    done = subprocess.run([sys.executable, "-m", "node.cli", "compile", str(source), "--quantize", "q8_0", "--device", "cpu"],
                          capture_output=True, text=True, env={**os.environ, "PROOFMESH_HOME": str(home)}, timeout=600)
    assert done.returncode == 0, done.stderr
    folder = home / "models" / "tiny_hf-q8_0"
    assert str(folder) in done.stdout and (folder / "model.safetensors").exists() and (folder / "config.json").exists()

    original = load_model(str(source), device="cpu", limits=LIMITS, root=store)
    native = load_model(str(folder), device="cpu", limits=LIMITS, root=store, weights="native")
    fp32 = load_model(str(folder), device="cpu", limits=LIMITS, root=store, weights="fp32")
    assert native.model_id == fp32.model_id != original.model_id
    assert native.manifest.weight_dtype == "safetensors:f32+q8_0"
    assert {"lm_head", "model.embed_tokens", "model.layers.0.self_attn.qkv_proj"} <= set(native.weight_layout)
    ids = list(range(3, 40))
    a, b, c = native.score(ids), fp32.score(ids), original.score(ids)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
    assert 0 < np.abs(a - c).max() < 0.05 * np.abs(c).max()  # 8-bit blocks: close, not equal

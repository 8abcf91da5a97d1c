"""Matmul and embedding kernels that read llama.cpp's quantized blocks directly.

    out[i, j] = sum_k x[i, k] * w[j, k]     w = the dequantized weight (node.models.quantization)

Decode at batch 1 reads every weight once per token and is memory-bound, so the weights stay
in their 4/8-bit blocks in memory and are dequantized in registers. The arithmetic is fp32
throughout (what makes this an honest backend of the model's ``model_id``): per block of 32
weights and row ``j``

    sum_e x[e] * (q[e] * d + m)  =  d * sum_e x[e] * q[e]  +  m * sum_e x[e]

(Q4_0 is ``m = -8 d``, Q8_0 has no ``m``). That reassociation changes only rounding, inside
the verifier's calibrated tolerance, and halves the work in the loop.

Two loop nests in one CPU kernel, chosen by the number of token rows ``n`` at run time:

- ``n <= FUSED_MAX_TOKENS[bits]`` (decode): a tile of ``ROWS`` output rows per task, both cores on
  separate tiles; per block, 8 bytes of nibbles are widened once to int32 lanes and give two
  8-lane vectors (low and high nibble) for the FMAs. Nothing is written but the output.
- otherwise (prefill, batched decode): each task dequantizes its ``ROWS x K`` tile into fp32
  once (L1/L2 resident) and then runs the token rows against it ``token_tile`` at a time with a
  ``token_tile x ROWS`` register tile of 8-lane accumulators, so dequantization is paid once per
  tile and each weight vector loaded from L1 feeds ``token_tile`` FMAs (one alone left the loop
  bound by loads, not FMAs). ``token_tile`` follows the target's register file
  (``token_tile_for``): 2 with AVX-512's 32 registers, 1 with AVX2's 16. A row's arithmetic is
  the same whatever the tile (its own accumulators, the same order), so the output of a token
  row never depends on the batch it came in.

GPU targets get the plain definition (``quant_matmul_generic``) and dlight's GPU rules
schedule it, as they do MLC-LLM's dequantize-matmul fusions.
"""

from __future__ import annotations

import functools

from tvm import te, tirx
from tvm.script import tirx as T

from node.hardware import LANES
from node.models.quant.blocks import BLOCK, FORMATS, TILE_ROWS, BlockFormat

ROWS = TILE_ROWS  # output rows per tile: 8 accumulators stay in registers with the block's 4 x vectors
# Token rows up to which the fused nest runs, by bits per weight (measured on cold weights, one
# thread: the tiled nest wins from 3 rows for 4-bit blocks, and ties at 8 for 8-bit ones, whose
# fp32 tile costs more to fill)
FUSED_MAX_TOKENS = {4: 2, 8: 4}
TASKS = 64  # parallel tasks per matmul: many more than cores (balance), few enough to set up cheaply
CACHE_LINE = 64  # bytes
PREFETCH_TILES = 4  # decode prefetches the tile this many ahead (measured: 2.6x on a cold Q4_1 GEMV; 2-16 alike)


def fused_max_tokens(fmt: BlockFormat) -> int:
    """Token rows up to which a format's kernel runs the fused nest: the planes formats unpack
    at least as much per weight as 4-bit blocks, the 16-bit floats fill their tile as cheaply as
    8-bit ones."""
    return FUSED_MAX_TOKENS[8 if fmt.kind == "float" or fmt.bits == 8 else 4]


def token_tile_for(vector_registers: int) -> int:
    """Token rows per register tile of the tiled nest: ``t`` rows keep ``t x ROWS`` accumulators,
    the tile's ``ROWS`` weight vectors and ``t`` x vectors live, all in registers. With 32 (AVX-512)
    that is 2 (measured on znver4, 1536 -> 576 Q4_1 at 16 and 128 rows: 1.7x one row at a time;
    3 spilled and ran slower than 1); with 16 (AVX2), 1."""
    return max(1, (vector_registers - ROWS) // (ROWS + 1))


def _lo(v):
    return T.Cast("float32", T.bitwise_and(T.Cast("int32", v), 15))


def _hi(v):
    return T.Cast("float32", T.shift_right(T.Cast("int32", v), 4))


def _prefetch(address):
    """Ask for the cache line at ``address`` ahead of use (read, keep in all levels)."""
    return T.call_llvm_intrin("void", "llvm.prefetch.p0", address, 0, 3, 1)


@T.macro(hygienic=False)
def _prefetch_block(jo, kb, qs, q_line_rows, d, m):
    """Prefetch block ``kb`` of row tile ``jo``: its quants and up to two per-block arrays
    ``d``, ``m`` (3-D, indexed ``[tile, block, ...]``; None: none)."""
    for line in T.unroll(ROWS // q_line_rows):
        T.evaluate(_prefetch(T.address_of(qs[jo, kb, line * q_line_rows, 0])))
    if d is not None:
        T.evaluate(_prefetch(T.address_of(d[jo, kb, 0])))
    if m is not None:
        T.evaluate(_prefetch(T.address_of(m[jo, kb, 0])))


@T.macro(hygienic=False)
def _matmul_cpu(x, out, n, n_out, k_in, fused_max, token_tile, block_dot, block_scale, block_offset, tile_value, streams, halves):
    """The two loop nests of the module docstring, over row tiles ``jo`` of ``ROWS`` rows ``r``.
    ``block_dot(i, jo, r, kb, l)``: lane ``l`` of sum x*q over block ``kb``; ``block_scale`` /
    ``block_offset(jo, r, kb)``: d and m (None: no m); ``tile_value(jo, r, kb, h, l)``: weight
    ``h * 16 + l`` of block ``kb``, dequantized; ``streams``: the arrays ``_prefetch_block`` reads
    ahead (without it a decode GEMV waited on memory: 2.6 GB/s against numpy's 13); ``halves = 2``:
    a scale and an offset per 16 weights, so ``block_dot``, ``block_scale`` and ``block_offset``
    take the half ``h`` after ``kb`` (K-quants with 16-weight sub-blocks).
    Each parallel task takes ``per_task`` consecutive tiles, so its scratch buffers are set up
    once per task rather than once per tile (a per-tile workspace cost as much as the tile)."""
    n_tiles = n_out // ROWS
    per_task = (n_tiles + TASKS - 1) // TASKS
    if n <= fused_max:
        for task in T.parallel((n_tiles + per_task - 1) // per_task):
            with T.sblock("fused"):
                acc = T.sblock_alloc_buffer([ROWS, LANES], "float32")
                xs = T.sblock_alloc_buffer([halves, LANES], "float32")
                for jo in T.serial(task * per_task, T.min(task * per_task + per_task, n_tiles)):
                    for i in T.serial(n):
                        for r in T.unroll(ROWS):
                            for l in T.vectorized(LANES):
                                acc[r, l] = T.float32(0)
                        for kb in T.serial(k_in // BLOCK):
                            _prefetch_block(T.min(jo + PREFETCH_TILES, n_tiles - 1), kb, *streams)
                            if block_scale is None:  # 16-bit floats: no scale
                                for r in T.unroll(ROWS):
                                    for l in T.vectorized(LANES):
                                        acc[r, l] = acc[r, l] + block_dot(i, jo, r, kb, l)
                            elif block_offset is None:
                                for r in T.unroll(ROWS):
                                    for l in T.vectorized(LANES):
                                        acc[r, l] = acc[r, l] + block_dot(i, jo, r, kb, l) * block_scale(jo, r, kb)
                            elif halves == 1:
                                for l in T.vectorized(LANES):
                                    xs[0, l] = (x[i, kb * 32 + l] + x[i, kb * 32 + 8 + l]) + (x[i, kb * 32 + 16 + l] + x[i, kb * 32 + 24 + l])
                                for r in T.unroll(ROWS):
                                    for l in T.vectorized(LANES):
                                        acc[r, l] = acc[r, l] + block_dot(i, jo, r, kb, l) * block_scale(jo, r, kb) + xs[0, l] * block_offset(jo, r, kb)
                            else:  # a scale and an offset per 16 weights: block_dot/scale/offset take the half h
                                for h in T.unroll(2):
                                    for l in T.vectorized(LANES):
                                        xs[h, l] = x[i, kb * 32 + h * 16 + l] + x[i, kb * 32 + h * 16 + 8 + l]
                                for r in T.unroll(ROWS):
                                    for l in T.vectorized(LANES):
                                        acc[r, l] = acc[r, l] + (block_dot(i, jo, r, kb, 0, l) * block_scale(jo, r, kb, 0) + xs[0, l] * block_offset(jo, r, kb, 0)) + (
                                            block_dot(i, jo, r, kb, 1, l) * block_scale(jo, r, kb, 1) + xs[1, l] * block_offset(jo, r, kb, 1))
                        for r in T.serial(ROWS):
                            out[i, jo * ROWS + r] = (acc[r, 0] + acc[r, 1] + acc[r, 2] + acc[r, 3]) + (acc[r, 4] + acc[r, 5] + acc[r, 6] + acc[r, 7])
    else:
        for task in T.parallel((n_tiles + per_task - 1) // per_task):
            with T.sblock("tiled"):
                acc = T.sblock_alloc_buffer([token_tile, ROWS, LANES], "float32")
                w = T.sblock_alloc_buffer([ROWS, k_in], "float32")
                for jo in T.serial(task * per_task, T.min(task * per_task + per_task, n_tiles)):
                    for kb in T.serial(k_in // BLOCK):  # (prefetching here measured no gain: compute-bound)
                        for r in T.serial(ROWS):
                            for h in T.unroll(2):
                                for l in T.vectorized(16):
                                    w[r, kb * 32 + h * 16 + l] = tile_value(jo, r, kb, h, l)
                    # whole tiles of token rows, then the rest one row at a time: no predicate in the hot loop
                    for ib in T.serial(n // token_tile):
                        _token_rows(x, out, acc, w, jo, ib * token_tile, token_tile, k_in)
                    if token_tile > 1:
                        for i in T.serial(n // token_tile * token_tile, n):
                            _token_rows(x, out, acc, w, jo, i, 1, k_in)


@T.macro(hygienic=False)
def _token_rows(x, out, acc, w, jo, first, rows, k_in):
    """Token rows ``first .. first + rows`` against the dequantized tile ``w``, accumulators in registers."""
    for t in T.unroll(rows):
        for r in T.unroll(ROWS):
            for l in T.vectorized(LANES):
                acc[t, r, l] = T.float32(0)
    for ko in T.serial(k_in // LANES):
        for t in T.unroll(rows):
            for r in T.unroll(ROWS):
                for l in T.vectorized(LANES):
                    acc[t, r, l] = acc[t, r, l] + x[first + t, ko * LANES + l] * w[r, ko * LANES + l]
    for t in T.serial(rows):
        for r in T.serial(ROWS):
            out[first + t, jo * ROWS + r] = (acc[t, r, 0] + acc[t, r, 1] + acc[t, r, 2] + acc[t, r, 3]) + (acc[t, r, 4] + acc[t, r, 5] + acc[t, r, 6] + acc[t, r, 7])


def _dot_q4(x, qs):
    """Lane l of a 4-bit block's sum x*q: bytes l and 8+l carry weights l, 8+l (low) and 16+l, 24+l (high)."""
    return lambda i, jo, r, kb, l: (
        (x[i, kb * 32 + l] * _lo(qs[jo, kb, r, l]) + x[i, kb * 32 + 16 + l] * _hi(qs[jo, kb, r, l]))
        + (x[i, kb * 32 + 8 + l] * _lo(qs[jo, kb, r, 8 + l]) + x[i, kb * 32 + 24 + l] * _hi(qs[jo, kb, r, 8 + l]))
    )


def _dot_q8(x, qs):
    return lambda i, jo, r, kb, l: (
        (x[i, kb * 32 + l] * T.Cast("float32", qs[jo, kb, r, l]) + x[i, kb * 32 + 8 + l] * T.Cast("float32", qs[jo, kb, r, 8 + l]))
        + (x[i, kb * 32 + 16 + l] * T.Cast("float32", qs[jo, kb, r, 16 + l]) + x[i, kb * 32 + 24 + l] * T.Cast("float32", qs[jo, kb, r, 24 + l]))
    )


def _f32(per_block):
    """A block's f16 scale or min, read as fp32 (exact)."""
    return lambda jo, r, kb: T.Cast("float32", per_block[jo, kb, r])


def _minus_8(d):
    return lambda jo, r, kb: T.float32(-8) * T.Cast("float32", d[jo, kb, r])


def _tile_q4(qs, scale, offset):
    """Weight ``h * 16 + l`` of block ``kb``: the low (h = 0) or high (h = 1) nibble of byte l."""
    return lambda jo, r, kb, h, l: T.Cast(
        "float32", T.bitwise_and(T.shift_right(T.Cast("int32", qs[jo, kb, r, l]), 4 * h), 15)
    ) * scale(jo, r, kb) + offset(jo, r, kb)


def _tile_q8(qs, scale):
    return lambda jo, r, kb, h, l: T.Cast("float32", qs[jo, kb, r, h * 16 + l]) * scale(jo, r, kb)


@T.macro(hygienic=False)
def _matmul_cpu_3d(var_x, var_out, n_out, k_in, fused_max, token_tile, dot, qs, block_scale, block_offset, tile_value, streams, halves=1):
    """``_matmul_cpu`` on the model's 3-D activations ``(b, s, k)``, aliased flat: the same memory,
    rows flattened, so no reshape runs around each call (each costs VM time in decode)."""
    b, s = T.int64(), T.int64()
    x3 = T.match_buffer(var_x, (b, s, k_in), "float32")
    out3 = T.match_buffer(var_out, (b, s, n_out), "float32")
    x = T.decl_buffer((b * s, k_in), "float32", data=x3.data)
    out = T.decl_buffer((b * s, n_out), "float32", data=out3.data)
    _matmul_cpu(x, out, b * s, n_out, k_in, fused_max, token_tile, dot(x, qs), block_scale, block_offset, tile_value, streams, halves)


# ---------------------------------------------------------------------- planes (Q5_x, K-quants)


class _Planes:
    """The callbacks of ``_matmul_cpu`` over a planes format's split arrays (``blocks``'s docstring):
    ``q = low bits | high planes``, ``w = scale[h] * q + offset[h]``, everything read in registers."""

    def __init__(self, fmt: BlockFormat, qlow, qhigh, d, sc, dmin, mn, m):
        self.fmt, self.qlow, self.qhigh, self.d, self.sc, self.dmin, self.mn, self.m = fmt, qlow, qhigh, d, sc, dmin, mn, m
        self.per_super = fmt.blocks_per_super

    def _q(self, jo, r, kb, byte, shift, e):
        """Weight ``e`` of block ``kb`` as float32: its low bits (byte ``byte`` of qlow shifted by
        ``shift``) with the high planes' bits ``e`` above them."""
        fmt = self.fmt
        v = T.bitwise_and(T.shift_right(T.Cast("int32", self.qlow[jo, kb, r, byte]), shift), (1 << fmt.low_bits) - 1)
        for p in range(fmt.high_planes):
            bit = T.bitwise_and(T.shift_right(self.qhigh[jo, kb, r * fmt.high_planes + p], T.Cast("uint32", e)), T.uint32(1))
            v = T.bitwise_or(v, T.shift_left(T.Cast("int32", bit), fmt.low_bits + p))
        return T.Cast("float32", v)

    def _lane_q(self, jo, r, kb, j, l):
        """Weight ``8 j + l`` (j a constant 0..3, l the vector lane)."""
        if self.fmt.low_bits == 4:  # byte e % 16, nibble e // 16
            return self._q(jo, r, kb, (j % 2) * 8 + l, 4 * (j // 2), j * 8 + l)
        return self._q(jo, r, kb, l, 2 * j, j * 8 + l)  # byte e % 8, crumb e // 8

    def dot(self, x, _qs=None):
        """``block_dot``: lane l of sum x*q over a block (halves = 1) or over half h (halves = 2)."""
        if self.fmt.halves == 1:
            return lambda i, jo, r, kb, l: (
                (x[i, kb * 32 + l] * self._lane_q(jo, r, kb, 0, l) + x[i, kb * 32 + 16 + l] * self._lane_q(jo, r, kb, 2, l))
                + (x[i, kb * 32 + 8 + l] * self._lane_q(jo, r, kb, 1, l) + x[i, kb * 32 + 24 + l] * self._lane_q(jo, r, kb, 3, l))
            )
        return lambda i, jo, r, kb, h, l: (
            x[i, kb * 32 + h * 16 + l] * self._lane_q(jo, r, kb, 2 * h, l)
            + x[i, kb * 32 + h * 16 + 8 + l] * self._lane_q(jo, r, kb, 2 * h + 1, l)
        )

    def _scale(self, jo, r, kb, h):
        d = T.Cast("float32", self.d[jo, kb // self.per_super, r])
        return d * T.Cast("float32", self.sc[jo, kb, r * self.fmt.halves + h]) if self.fmt.has_sc else d

    def _offset(self, jo, r, kb, h):
        fmt = self.fmt
        if fmt.offset == "m":
            return T.Cast("float32", self.m[jo, kb, r])
        offset = T.float32(-fmt.zero) * self._scale(jo, r, kb, h) if fmt.zero else T.float32(0)
        if fmt.offset == "dmin":
            offset = offset - T.Cast("float32", self.dmin[jo, kb // self.per_super, r]) * T.Cast("float32", self.mn[jo, kb, r * fmt.halves + h])
        return offset

    def scale(self):
        if self.fmt.halves == 1:
            return lambda jo, r, kb: self._scale(jo, r, kb, 0)
        return self._scale

    def offset(self):
        if self.fmt.halves == 1:
            return lambda jo, r, kb: self._offset(jo, r, kb, 0)
        return self._offset

    def tile(self):
        """``tile_value``: weight ``16 h + l`` (l < 16) of block ``kb``, dequantized."""
        two = self.fmt.halves == 2

        def value(jo, r, kb, h, l):
            if self.fmt.low_bits == 4:
                q = self._q(jo, r, kb, l, 4 * h, h * 16 + l)
            else:
                q = self._q(jo, r, kb, l % 8, 2 * (2 * h + l // 8), h * 16 + l)
            half = h if two else 0
            return q * self._scale(jo, r, kb, half) + self._offset(jo, r, kb, half)

        return value

    def streams(self):
        """What ``_prefetch_block`` reads ahead: the low bits and two per-block arrays."""
        line_rows = CACHE_LINE // (BLOCK * self.fmt.low_bits // 8)
        per_block = [a for a in (self.qhigh, self.sc, self.mn, self.d) if a is not None][:2]
        if self.per_super != 1 and self.d in per_block:
            per_block.remove(self.d)
        return (self.qlow, line_rows, *(per_block + [None, None])[:2])


@T.macro(hygienic=False)
def _planes_3d(var_x, var_out, n_out, k_in, fused_max, token_tile, planes):
    _matmul_cpu_3d(var_x, var_out, n_out, k_in, fused_max, token_tile, planes.dot, None, planes.scale(), planes.offset(),
                   planes.tile(), planes.streams(), planes.fmt.halves)


def _planes_matmul_cpu(fmt: BlockFormat, n_out: int, k_in: int, token_tile: int) -> tirx.PrimFunc:
    """The planes kernel: one signature per set of split arrays (``param_suffixes``)."""
    shapes = fmt.param_shapes(n_out, k_in)
    fused_max = fused_max_tokens(fmt)
    ql_shape, _ = shapes["qlow"]
    d_shape, _ = shapes["d"]
    qh_shape = shapes["qhigh"][0] if "qhigh" in shapes else None
    sc_shape = shapes["sc"][0] if "sc" in shapes else None
    names = tuple(shapes)

    if names == ("qlow", "qhigh", "d"):  # Q5_0

        @T.prim_func(s_tir=True)
        def kernel(var_x: T.handle, qlow: T.Buffer(ql_shape, "uint8"), qhigh: T.Buffer(qh_shape, "uint32"),
                   d: T.Buffer(d_shape, "float16"), var_out: T.handle):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
            _planes_3d(var_x, var_out, n_out, k_in, fused_max, token_tile, _Planes(fmt, qlow, qhigh, d, None, None, None, None))

    elif names == ("qlow", "qhigh", "d", "m"):  # Q5_1

        @T.prim_func(s_tir=True)
        def kernel(var_x: T.handle, qlow: T.Buffer(ql_shape, "uint8"), qhigh: T.Buffer(qh_shape, "uint32"),
                   d: T.Buffer(d_shape, "float16"), m: T.Buffer(d_shape, "float16"), var_out: T.handle):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
            _planes_3d(var_x, var_out, n_out, k_in, fused_max, token_tile, _Planes(fmt, qlow, qhigh, d, None, None, None, m))

    elif names == ("qlow", "qhigh", "d", "sc"):  # Q3_K, Q6_K

        @T.prim_func(s_tir=True)
        def kernel(var_x: T.handle, qlow: T.Buffer(ql_shape, "uint8"), qhigh: T.Buffer(qh_shape, "uint32"),
                   d: T.Buffer(d_shape, "float16"), sc: T.Buffer(sc_shape, "int8"), var_out: T.handle):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
            _planes_3d(var_x, var_out, n_out, k_in, fused_max, token_tile, _Planes(fmt, qlow, qhigh, d, sc, None, None, None))

    elif names == ("qlow", "d", "sc", "dmin", "mn"):  # Q2_K, Q4_K

        @T.prim_func(s_tir=True)
        def kernel(var_x: T.handle, qlow: T.Buffer(ql_shape, "uint8"), d: T.Buffer(d_shape, "float16"),
                   sc: T.Buffer(sc_shape, "int8"), dmin: T.Buffer(d_shape, "float16"), mn: T.Buffer(sc_shape, "int8"),
                   var_out: T.handle):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
            _planes_3d(var_x, var_out, n_out, k_in, fused_max, token_tile, _Planes(fmt, qlow, None, d, sc, dmin, mn, None))

    elif names == ("qlow", "qhigh", "d", "sc", "dmin", "mn"):  # Q5_K

        @T.prim_func(s_tir=True)
        def kernel(var_x: T.handle, qlow: T.Buffer(ql_shape, "uint8"), qhigh: T.Buffer(qh_shape, "uint32"),
                   d: T.Buffer(d_shape, "float16"), sc: T.Buffer(sc_shape, "int8"), dmin: T.Buffer(d_shape, "float16"),
                   mn: T.Buffer(sc_shape, "int8"), var_out: T.handle):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
            _planes_3d(var_x, var_out, n_out, k_in, fused_max, token_tile, _Planes(fmt, qlow, qhigh, d, sc, dmin, mn, None))

    else:
        raise ValueError(f"no kernel for {fmt.name}'s arrays {names}")
    return kernel.without_attr("global_symbol")  # named by the caller, one per shape


# ---------------------------------------------------------------------- 16-bit floats


def _widen(fmt: BlockFormat, v):
    """An F16 value, or a BF16 bit pattern, as the float32 it is exactly."""
    if fmt.name == "F16":
        return T.Cast("float32", v)
    return T.reinterpret("float32", T.shift_left(T.Cast("uint32", v), T.uint32(16)))


def _tile_float(fmt: BlockFormat, w):
    """``tile_value`` of a 16-bit matrix: weight ``16 h + l`` of block ``kb``, widened."""
    return lambda jo, r, kb, h, l: _widen(fmt, w[jo, kb, r, h * 16 + l])


def _float_matmul_cpu(fmt: BlockFormat, n_out: int, k_in: int, token_tile: int) -> tirx.PrimFunc:
    (w_shape, w_dtype), = fmt.param_shapes(n_out, k_in).values()
    fused_max = fused_max_tokens(fmt)

    def dot(x, w):
        return lambda i, jo, r, kb, l: (
            (x[i, kb * 32 + l] * _widen(fmt, w[jo, kb, r, l]) + x[i, kb * 32 + 8 + l] * _widen(fmt, w[jo, kb, r, 8 + l]))
            + (x[i, kb * 32 + 16 + l] * _widen(fmt, w[jo, kb, r, 16 + l]) + x[i, kb * 32 + 24 + l] * _widen(fmt, w[jo, kb, r, 24 + l]))
        )

    @T.prim_func(s_tir=True)
    def kernel(var_x: T.handle, w: T.Buffer(w_shape, w_dtype), var_out: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        _matmul_cpu_3d(var_x, var_out, n_out, k_in, fused_max, token_tile, dot, w, None, None, _tile_float(fmt, w), (w, 1, None, None))

    return kernel.without_attr("global_symbol")  # named by the caller, one per shape


@functools.lru_cache(maxsize=None)
def quant_matmul_cpu(ggml_type: str, n_out: int, k_in: int, token_tile: int = 1) -> tirx.PrimFunc:
    """The scheduled CPU kernel ``(x (b, s, k_in) f32, *split arrays, out (b, s, n_out) f32)``;
    ``token_tile``: token rows per register tile of the tiled nest (``token_tile_for``).

    Cached: every exported function of a model (prefill, decode, scoring) asks again for the same
    (type, shape) kernel, and parsing its TVMScript took most of a quantized model's compile time
    (8.6 of 14.3 s on a tiny model); a PrimFunc is an immutable IR value, safe to share."""
    fmt = FORMATS[ggml_type]
    assert n_out % ROWS == 0 and k_in % fmt.block_values == 0, f"{n_out}x{k_in} does not tile into {ROWS} rows and {fmt.block_values}-blocks"
    if fmt.kind == "planes":
        return _planes_matmul_cpu(fmt, n_out, k_in, token_tile)
    if fmt.kind == "float":
        return _float_matmul_cpu(fmt, n_out, k_in, token_tile)
    shapes = fmt.param_shapes(n_out, k_in)
    (q_shape, q_dtype), (s_shape, s_dtype) = shapes["qweight"], shapes["scales"]
    q_line_rows = CACHE_LINE // q_shape[-1]  # rows of a block's quants in one cache line
    fused_max = fused_max_tokens(fmt)

    if ggml_type == "Q4_1":

        @T.prim_func(s_tir=True)
        def kernel(var_x: T.handle, qs: T.Buffer(q_shape, q_dtype), d: T.Buffer(s_shape, s_dtype),
                   m: T.Buffer(s_shape, s_dtype), var_out: T.handle):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
            _matmul_cpu_3d(var_x, var_out, n_out, k_in, fused_max, token_tile, _dot_q4, qs, _f32(d), _f32(m), _tile_q4(qs, _f32(d), _f32(m)), (qs, q_line_rows, d, m))

        return kernel.without_attr("global_symbol")  # named by the caller, one per shape

    @T.prim_func(s_tir=True)
    def kernel(var_x: T.handle, qs: T.Buffer(q_shape, q_dtype), d: T.Buffer(s_shape, s_dtype), var_out: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        if fmt.bits == 4:  # Q4_0: q - 8, i.e. m = -8 d
            _matmul_cpu_3d(var_x, var_out, n_out, k_in, fused_max, token_tile, _dot_q4, qs, _f32(d), _minus_8(d), _tile_q4(qs, _f32(d), _minus_8(d)), (qs, q_line_rows, d, None))
        else:
            _matmul_cpu_3d(var_x, var_out, n_out, k_in, fused_max, token_tile, _dot_q8, qs, _f32(d), None, _tile_q8(qs, _f32(d)), (qs, q_line_rows, d, None))

    return kernel.without_attr("global_symbol")  # named by the caller, one per shape


def _tile_value(fmt: BlockFormat, arrays: dict):
    """The ``tile_value(jo, r, kb, h, l)`` of ``fmt`` over its split arrays (TIR buffers or TE
    tensors): the one definition of each format's dequantized weight, which the CPU kernel's tiled
    nest and the TE definition below both evaluate."""
    if fmt.kind == "float":
        return _tile_float(fmt, arrays["qweight"])
    if fmt.kind == "planes":
        return _Planes(fmt, arrays["qlow"], arrays.get("qhigh"), arrays["d"], arrays.get("sc"), arrays.get("dmin"),
                       arrays.get("mn"), arrays.get("m")).tile()
    qs, d = arrays["qweight"], arrays["scales"]
    if fmt.bits == 8:
        return _tile_q8(qs, _f32(d))
    return _tile_q4(qs, _f32(d), _f32(arrays["mins"]) if fmt.has_mins else _minus_8(d))


def _weight_expr(ggml_type: str, params: list[te.Tensor]):
    """w[row, k] as a TE expression over the split arrays (the definition the CPU kernel optimizes):
    weight ``k % 32`` of block ``k // 32``, the tiled nest's ``tile_value`` at ``h, l = divmod(k % 32, 16)``."""
    fmt = FORMATS[ggml_type]
    tile_value = _tile_value(fmt, dict(zip(fmt.param_suffixes(), params)))

    def weight(row, k):
        e = k % BLOCK
        return tile_value(row // ROWS, row % ROWS, k // BLOCK, e // 16, e % 16)

    return weight


def quant_matmul_te(x: te.Tensor, ggml_type: str, *params: te.Tensor) -> te.Tensor:
    """Unscheduled definition for GPU targets: out = x @ dequantize(params).T (dlight schedules it)."""
    n_out = params[0].shape[0] * ROWS  # every format's first array is (tiles, blocks, rows in tile, ...)
    k_in = x.shape[1]
    weight = _weight_expr(ggml_type, list(params))
    k = te.reduce_axis((0, k_in), name="k")
    return te.compute((x.shape[0], n_out), lambda i, j: te.sum(x[i, k] * weight(j, k), axis=k), name="quant_matmul")


def quant_take_te(ids: te.Tensor, ggml_type: str, *params: te.Tensor) -> te.Tensor:
    """Embedding lookup from quantized rows: out[i, :] = dequantize(params)[ids[i], :]."""
    weight = _weight_expr(ggml_type, list(params))
    hidden = params[0].shape[1] * BLOCK
    return te.compute((ids.shape[0], hidden), lambda i, k: weight(ids[i], k), name="quant_take")


__all__ = ["FUSED_MAX_TOKENS", "fused_max_tokens", "quant_matmul_cpu", "token_tile_for", "quant_matmul_te", "quant_take_te"]

"""The CPU schedule rules: the elementwise rule (``ElementwiseCPU``) runs an activation in
parallel and gives the serial loop's results bit for bit, at sizes that do not divide into its
tasks, and leaves functions with a reduction to other rules; the matmul rule (``NTMatmulCPU``)
schedules ``x @ w.T`` in parallel and computes it."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te, tirx

from node.compiler.cpu_schedule import ElementwiseCPU, NTMatmulCPU


def silu_multiply(n: int, width: int) -> tirx.PrimFunc:
    x = te.placeholder((n, 2 * width), "float32", name="x")
    out = te.compute((n, width), lambda i, j: x[i, j] * tirx.sigmoid(x[i, j]) * x[i, width + j], name="silu_multiply")
    return te.create_prim_func([x, out])


def row_sum(n: int) -> tirx.PrimFunc:
    x = te.placeholder((n, 64), "float32", name="x")
    k = te.reduce_axis((0, 64))
    return te.create_prim_func([x, te.compute((n,), lambda i: te.sum(x[i, k], axis=k))])


def test_elementwise_rule_parallelises_without_changing_a_bit(cpu):
    rule = ElementwiseCPU()
    for n in (1, 3, 17):
        func = silu_multiply(n, 1536)
        scheduled = rule.apply(func, cpu.target, False)
        assert scheduled is not None
        assert "T.parallel" in scheduled.mod.script()
        serial = tvm.compile(func.with_attr("global_symbol", "main"), target=cpu.target)
        parallel = tvm.compile(scheduled.mod["main"].with_attr("global_symbol", "main"), target=cpu.target)
        x = np.random.default_rng(n).standard_normal((n, 3072)).astype(np.float32) * 6
        outs = []
        for f in (serial, parallel):
            out = tvm.runtime.tensor(np.zeros((n, 1536), np.float32), tvm.cpu())
            f(tvm.runtime.tensor(x, tvm.cpu()), out)
            outs.append(out.numpy().view(np.uint32))
        np.testing.assert_array_equal(outs[0], outs[1])
    assert rule.apply(row_sum(8), cpu.target, False) is None


def test_matmul_rule_schedules_and_computes_x_times_w_transposed(cpu):
    x = te.placeholder((5, 64), "float32", name="x")
    w = te.placeholder((24, 64), "float32", name="w")
    k = te.reduce_axis((0, 64))
    func = te.create_prim_func([x, w, te.compute((5, 24), lambda i, j: te.sum(x[i, k] * w[j, k], axis=k))])
    scheduled = NTMatmulCPU().apply(func, cpu.target, False)
    assert scheduled is not None and "T.parallel" in scheduled.mod.script()
    assert NTMatmulCPU().apply(silu_multiply(2, 8), cpu.target, False) is None
    kernel = tvm.compile(scheduled.mod["main"].with_attr("global_symbol", "main"), target=cpu.target)
    rng = np.random.default_rng(3)
    xs, ws = rng.standard_normal((5, 64)).astype(np.float32), rng.standard_normal((24, 64)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((5, 24), np.float32), tvm.cpu())
    kernel(tvm.runtime.tensor(xs, tvm.cpu()), tvm.runtime.tensor(ws, tvm.cpu()), out)
    np.testing.assert_allclose(out.numpy(), xs @ ws.T, rtol=1e-5, atol=1e-5)

"""The CPU elementwise rule (``node.compiler.cpu_schedule.ElementwiseCPU``) runs an activation
in parallel and gives the serial loop's results bit for bit, at sizes that do not divide into
its tasks; functions with a reduction are left to other rules."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te, tirx

from node.compiler.cpu_schedule import ElementwiseCPU


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

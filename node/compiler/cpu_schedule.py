"""CPU schedule for the matmuls of a Llama-family model.

Why hand-written: ``tvm.compile`` leaves naive single-threaded loops and dlight's CPU rules
only cover GEMV/reductions (DESIGN.md measured 823 and 149 ms/token on a 100M-parameter
model). Decode at batch 1 is memory-bound, so the goal is to stream every weight row once,
with vector FMAs and both cores busy:

    C[i, j] = sum_k A[i, k] * W[j, k]        (i = tokens, j = output rows, k = reduction)

- split the reduction ``k`` into ``(ko, ki = LANES)`` and ``rfactor`` over ``ki`` so each lane
  accumulates its own partial sum, vectorized along contiguous ``k`` in both A and W;
- take ``ROWS`` output rows at a time (``ji``) inside ``ko`` so one pass of A's lanes feeds
  ROWS independent accumulators (instruction-level parallelism, A stays in registers);
- parallelise the outer output-row loop ``jo`` (one weight slice per core, no false sharing);
- fold the lanes in a second, tiny block under the same loops.
The rule matches any PrimFunc whose single reduction block is such a multiply-accumulate with
both operands contiguous in ``k`` (``NT_matmul``); anything else falls through to dlight.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline_contiguous_spatial
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from node.hardware import LANES

ROWS = 8  # output rows per tile: 8 vector accumulators; 4 and 16 measured slower on znver3
# Tokens per tile. A 4x4 (tokens x rows) register tile measured ~25 % slower at batch 16 on
# znver3 (the symbolic batch split adds a predicate to the hot loop), so it stays 1 for now.
TOKENS = 1


def _int_extent(expr) -> int | None:
    if isinstance(expr, int):
        return expr
    return int(expr) if isinstance(expr, tirx.IntImm) else None


def _blocks_after_inlining(func: tirx.PrimFunc) -> tuple[s_tir.Schedule, list | None]:
    """A schedule of ``func`` and its blocks once the contiguous spatial ones are inlined (None
    when the function does not normalise): what each rule below starts from."""
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    return sch, None if infos is None else try_inline_contiguous_spatial(sch, infos)


class NTMatmulCPU(CPUScheduleRule):
    """Schedule ``C[.., j] += A[.., k] * W[j, k]`` (with optional injective epilogue)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):  # noqa: D102
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch, infos = _blocks_after_inlining(func)
        if infos is None or not 1 <= len(infos) <= 2:
            return None
        main = infos[0]
        if main.dom_kind()[-1:] != "R" or main.dom_kind().count("R") != 1:
            return None
        if len(infos) == 2 and not infos[1].is_injective():
            return None
        block = main.block_rv
        stmt = sch.get(block)
        if len(stmt.reads) != 2 or len(stmt.iter_vars) < 2:
            return None
        k_var = stmt.iter_vars[-1].var
        for region in stmt.reads:  # both operands must be contiguous along k
            if not region.region[-1].min.same_as(k_var):
                return None
        k_extent = _int_extent(main.iters[-1].dom)
        j_extent = _int_extent(main.iters[-2].dom)
        if k_extent is None or j_extent is None or k_extent % LANES or j_extent % ROWS:
            return None

        loops = sch.get_loops(block)
        spatial, k = loops[:-1], loops[-1]
        i = sch.fuse(*spatial[:-1]) if len(spatial) > 1 else sch.add_unit_loop(block)
        io, ii = sch.split(i, [None, TOKENS])
        jo, ji = sch.split(spatial[-1], [None, ROWS])
        ko, ki = sch.split(k, [None, LANES])
        sch.reorder(jo, io, ko, ii, ji, ki)
        out_ndim = len(stmt.writes[0].region)
        # partial[..., j, ki]: lanes innermost, so each lane vector is contiguous in memory.
        partial = sch.rfactor(ki, factor_axis=out_ndim)
        jo, io, ko, ii, ji, ki = sch.get_loops(partial)
        sch.vectorize(ki)
        sch.unroll(ji)  # unrolled tiles let LLVM keep the accumulators in registers
        sch.unroll(ii)
        # Fold the lanes (and run the epilogue) under the same (rows, tokens) tile.
        sch.reverse_compute_at(block, io)
        # "global", not "local": TVM lowers a "local" buffer inside a parallel loop to a workspace
        # call whose pointer LLVM cannot prove distinct from the inputs, so every FMA stored its
        # accumulator and reloaded A (measured 25 GFLOP/s at batch 16); as "global" the compacted
        # 8x8 tile stays in registers (135 GFLOP/s). Each iteration still gets its own tile.
        sch.set_scope(partial, 0, "global")
        if len(infos) == 2:
            sch.reverse_compute_at(infos[1].block_rv, io)
        sch.parallel(jo)
        init = sch.decompose_reduction(partial, ko)
        sch.vectorize(sch.get_loops(init)[-1])
        return sch


ELEMENTS_PER_TASK = 2048  # elementwise work per parallel task: enough to outweigh a task's start


class ElementwiseCPU(CPUScheduleRule):
    """Spread an elementwise function (the activation, the residual adds) over the cores.

    Why: TVM leaves such functions as one serial loop, and dlight has no CPU rule for them; at
    batch 16 the SwiGLU activation alone (16 x 1536 sigmoids a layer) was ~6 % of a decode step,
    and more of a long prefill. The loops are fused and cut into tasks of
    ``ELEMENTS_PER_TASK``; each element is computed by the same expression as before (nothing
    is vectorized or reassociated), so results do not change by a bit."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):  # noqa: D102
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch, infos = _blocks_after_inlining(func)
        if infos is None or len(infos) != 1 or infos[0].dom_kind().strip("S"):
            return None
        loops = sch.get_loops(infos[0].block_rv)
        if not loops:
            return None
        outer, _ = sch.split(sch.fuse(*loops), [None, ELEMENTS_PER_TASK])
        sch.parallel(outer)
        return sch

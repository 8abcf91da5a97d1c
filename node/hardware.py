"""Facts about the CPU's vector unit that every hand-written kernel sizes itself from.

Why a module of its own: the quantized kernels (``node.models.quant``) and the compiler's
schedules (``node.compiler``) both read these, and the compiler imports the models it compiles.
Kept in either package, the other one would import it back and the two would form a circle
(``tests/test_layers.py`` walks the packages for one). Here both read down to one neutral room.
"""

from __future__ import annotations

import tvm
from tvm.target import Target

LANES = 8  # fp32 lanes per 256-bit vector: avx2 and avx512 machines both vectorize this cleanly (the one
# place this width is set: the matmul schedule, the attention and the quantized kernels take it from here)


def vector_registers(target: Target) -> int:
    """Vector registers the target's code may use: 32 with AVX-512 (its VL extension gives 256-bit
    code the upper 16 too), 16 on AVX2-only x86 and elsewhere. Kernels size their register tiles
    from this, never from the machine they were tuned on."""
    if target.kind.name != "llvm":
        return 16
    features = tvm.get_global_func("target.llvm_get_cpu_features")(target)
    return 32 if "avx512f" in features and "avx512vl" in features else 16

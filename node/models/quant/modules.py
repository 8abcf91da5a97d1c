"""``nn`` modules whose weights stay in llama.cpp blocks: a linear layer and an embedding.

Each declares the split arrays of ``node.models.quant.blocks`` as its parameters, so a
compiled library takes the file's bytes as they are. On the CPU the matmul is our scheduled
kernel; on GPUs the plain definition, which dlight's GPU rules schedule.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.target import Target

from node.hardware import vector_registers

from .blocks import FORMATS, TILE_ROWS
from .kernels import quant_matmul_cpu, quant_matmul_te, quant_take_te, token_tile_for


def quant_matmul(x: Tensor, ggml_type: str, params: list[Tensor], target: Target) -> Tensor:
    """``x (b, s, k) @ dequantize(params).T`` -> ``(b, s, n_out)`` in fp32."""
    batch, seq, k_in = x.shape
    n_out = params[0].shape[0] * TILE_ROWS  # every format's first array: (tiles, blocks, rows in tile, ...)
    name = f"{ggml_type.lower()}_matmul"
    if target.kind.name == "llvm":
        kernel = quant_matmul_cpu(ggml_type, int(n_out), int(k_in), token_tile_for(vector_registers(target)))
        return op.tensor_ir_op(kernel, name, args=[x, *params], out=Tensor.placeholder((batch, seq, n_out), "float32"))
    flat = op.reshape(x, (batch * seq, k_in))
    out = op.tensor_expr_op(lambda a, *p: quant_matmul_te(a, ggml_type, *p), name, args=[flat, *params])
    return op.reshape(out, (batch, seq, n_out))


class _QuantParams(nn.Module):
    """The split arrays of a ``rows x cols`` matrix as parameters named ``qweight``, ``scales``, ``mins``."""

    def __init__(self, rows: int, cols: int, ggml_type: str):
        self.ggml_type = ggml_type
        for name, (shape, dtype) in FORMATS[ggml_type].param_shapes(rows, cols).items():
            setattr(self, name, nn.Parameter(shape, dtype))

    def block_params(self) -> list[Tensor]:
        return [getattr(self, name) for name in FORMATS[self.ggml_type].param_suffixes()]


class QuantLinear(_QuantParams):
    """``nn.Linear`` (no bias unless asked) over a quantized weight ``[out_features, in_features]``."""

    def __init__(self, in_features: int, out_features: int, ggml_type: str, target: Target, bias: bool = False):
        super().__init__(out_features, in_features, ggml_type)
        self.target = target
        self.bias = nn.Parameter((out_features,), "float32") if bias else None

    def forward(self, x: Tensor) -> Tensor:
        out = quant_matmul(x, self.ggml_type, self.block_params(), self.target)
        return out + self.bias if self.bias is not None else out


class QuantEmbedding(_QuantParams):
    """``nn.Embedding`` over quantized rows; ``lm_head`` reuses it when the head is tied."""

    def __init__(self, num: int, dim: int, ggml_type: str, target: Target):
        super().__init__(num, dim, ggml_type)
        self.target = target

    def forward(self, ids: Tensor) -> Tensor:
        *lead, = ids.shape
        count = 1
        for dim in lead:
            count = count * dim
        flat = op.reshape(ids, (count,))
        rows = op.tensor_expr_op(lambda i, *p: quant_take_te(i, self.ggml_type, *p), "quant_take", args=[flat, *self.block_params()])
        return op.reshape(rows, (*lead, rows.shape[-1]))

    def lm_head(self, hidden: Tensor) -> Tensor:
        return quant_matmul(hidden, self.ggml_type, self.block_params(), self.target)

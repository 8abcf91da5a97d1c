"""From a model architecture to a library for one target: the compile pipeline and its cache
(``build``), the targets this machine offers (``targets``; the device names alone, without TVM,
in ``devices``), the CPU matmul and elementwise schedules (``cpu_schedule``), the CPU attention
kernels (``cpu_attention``) and the CPU RoPE kernel the KV cache calls (``cpu_rope``). The vector
width and register count these kernels size themselves from live in ``node.hardware``, which the
quantized kernels of ``node.models`` read too (the compiler imports the models, never the reverse)."""

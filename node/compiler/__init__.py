"""From a model architecture to a library for one target: the compile pipeline and its cache
(``build``), the targets this machine offers (``targets``; the device names alone, without TVM,
in ``devices``), the CPU matmul schedule (``cpu_schedule``) and CPU attention kernels
(``cpu_attention``)."""

"""The device kinds a node may run on, named without loading TVM (the CLI's choices, ``--help``)."""

GPU_KINDS = ("cuda", "rocm", "metal", "vulkan", "opencl")
DEVICE_CHOICES = ("auto", "cpu", *GPU_KINDS)

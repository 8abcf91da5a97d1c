"""The runtime's choices and defaults, named without loading TVM, so the CLI's ``--help`` states
them from here (as ``node.compiler.devices`` names the device kinds)."""

WEIGHT_MODES = ("native", "fp32")  # how a checkpoint's weights are held in memory (``loading.load_model``)
DEFAULT_MAX_QUEUE = 64  # requests that may wait for a batch slot before new ones are refused (``engine.Engine``)

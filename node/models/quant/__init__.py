"""Quantized weights served natively: llama.cpp's block formats (``blocks``), the kernels that
read them (``kernels``) and the ``nn`` modules a model declares them with (``modules``)."""

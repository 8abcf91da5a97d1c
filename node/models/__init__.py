"""The models a node serves: one folder per architecture (``llama``, ``qwen3``, ``gemma3``), the
registry that names them (``architectures``), checkpoints, GGUF files, tokenizers, quantized weights."""

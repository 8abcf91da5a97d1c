"""Qwen3 (dense): the Llama family with a norm over each head's q and k."""

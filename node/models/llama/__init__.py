"""The Llama family (Llama 2/3, Qwen2, Mistral, SmolLM): config, checkpoint loaders, the ``nn`` model
and its numpy reference."""

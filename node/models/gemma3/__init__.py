"""Gemma 3 (text): config, loader, the ``nn`` model with sliding-window layers, its numpy reference."""

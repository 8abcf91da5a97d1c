"""Compile a model architecture for a target and cache the library (see ``build``)."""

from node.compiler.build import CompiledLibrary, compile_model, library_cache_key

__all__ = ["CompiledLibrary", "compile_model", "library_cache_key"]

"""Shared fixtures: a model store in a temporary folder and tiny compiled models.

Tiny models are compiled once per session per shape (a couple of seconds each on 2 cores), and the
real default model is loaded once per session for every slow test that serves or checks it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from compiled_models.registry import DEFAULT_MODEL
from node.compiler.build import compile_model
from node.models.llama.checkpoint import Checkpoint
from node.models.llama.load import load_checkpoint
from node.models.llama.model import fuse_hf_weights
from node.runtime.loading import LoadedModel, load_model
from node.runtime.model_runtime import CacheLimits, ModelRuntime
from node.compiler.targets import detect
from tests.models_fixtures import make_tiny_hf_checkpoint


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    """A private model store (compiled libraries of tiny models land here)."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="session")
def cpu():
    return detect("cpu")


def make_runtime(ckpt: Checkpoint, store: Path, cpu, limits: CacheLimits = CacheLimits(max_batch_size=8, max_total_tokens=2048, prefill_chunk=64)) -> ModelRuntime:
    library = compile_model(ckpt.config, cpu.target, store)
    return ModelRuntime(ckpt.config, library, fuse_hf_weights(ckpt.config, ckpt.weights), cpu, limits)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Checkpoint:
    """A tiny untied Llama in fp32 (HF folder)."""
    return load_checkpoint(make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_hf")))


@pytest.fixture(scope="session")
def tiny_runtime(tiny_ckpt, store, cpu) -> ModelRuntime:
    return make_runtime(tiny_ckpt, store, cpu)


@pytest.fixture(scope="session")
def default_model() -> LoadedModel:
    """The real default model, natively quantized on this CPU (pulled and compiled on first use):
    one load shared by the slow tests, which only read it (their engines end their sequences)."""
    return load_model(DEFAULT_MODEL, device="cpu")

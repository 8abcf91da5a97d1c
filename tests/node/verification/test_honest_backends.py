"""Zero false fraud verdicts: honest answers generated on one backend pass when re-checked on
another (host-tuned vs generic x86-64 TVM, decode vs prefill kernels, batch 8 vs batch 1, the
float64 numpy reference) with the calibrated tolerances. Hundreds of answers on tiny models and
a dozen on the default model; ``python -m bench.calibrate`` runs the >= 10,000 version."""

from __future__ import annotations

import pytest

from tests.node.verification.harness import Generator, NumpyBackend, request_mix
from compiled_models.registry import DEFAULT_MODEL
from node.runtime.loading import load_checkpoint_cached, load_model
from node.models.llama.reference import NumpyLlama
from node.runtime.model_runtime import CacheLimits
from node.compiler.targets import GENERIC_X86_CPU, DeviceTarget, cpu_target
from tests.models_fixtures import make_tiny_gguf, make_tiny_hf_checkpoint
from verify.identity import NodeKey
from verify.verifier import verify_answer

LIMITS = CacheLimits(max_batch_size=8, max_total_tokens=4096, prefill_chunk=128)
KEY = NodeKey.generate()
GENERIC = DeviceTarget("cpu", cpu_target(GENERIC_X86_CPU))


def assert_all_pass(answers, verifier) -> None:
    verdicts = [verify_answer(a, verifier) for a in answers]
    false_fraud = [v for v in verdicts if v.verdict != "pass"]
    assert not false_fraud, false_fraud[:3]


@pytest.mark.parametrize("weights", ["fp32", "q8_0"])
def test_tiny_models_across_backends(tmp_path, store, weights):
    path = (make_tiny_hf_checkpoint(tmp_path / "m", seed=3) if weights == "fp32"
            else make_tiny_gguf(tmp_path / "m.gguf", quant_types=("Q8_0",), seed=4).path)
    host = load_model(str(path), device="cpu", limits=LIMITS, root=store)
    generic = load_model(str(path), device=GENERIC, limits=LIMITS, root=store)
    reference = NumpyBackend(host, NumpyLlama.from_checkpoint(load_checkpoint_cached(host.path, store)))

    from_host = Generator.of(host).answers(request_mix(host.tokenizer, 160, seed=11, lengths=(16, 64)), KEY, concurrency=8)
    assert_all_pass(from_host, generic)
    assert_all_pass(from_host, reference)
    from_generic = Generator.of(generic).answers(request_mix(host.tokenizer, 40, seed=12, lengths=(16, 64)), KEY, concurrency=1)
    assert_all_pass(from_generic, host)


@pytest.mark.slow
def test_default_model_host_batch_against_generic_prefill(default_model):
    host = default_model
    generic = load_model(DEFAULT_MODEL, device=GENERIC)
    answers = Generator.of(host).answers(request_mix(host.tokenizer, 12, seed=5, lengths=(64,)), KEY, concurrency=8)
    assert_all_pass(answers, generic)
    assert_all_pass(answers, host)  # decode kernels vs the same machine's prefill

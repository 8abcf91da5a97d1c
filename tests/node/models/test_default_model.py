"""The real default model, SmolLM2-135M-Instruct: pulled (pinned, sha256-checked), compiled
for this machine, answering as transformers' own GGUF loader does, and agreeing with the
independent numpy reference token for token.

Marked slow (a ~93 MB download on first use, ~15 s compile, ~1 min of numpy reference) but
part of the default suite: it is the end-to-end check of the product.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from compiled_models.registry import DEFAULT_MODEL
from node.api.service import answer_file
from node.runtime.engine import Engine, GenerationRequest
from node.runtime.loading import load_model
from node.models.llama.load import load_checkpoint
from node.models.llama.reference import NumpyLlama
from tests.node.runtime.engine_helpers import generate
from verify.evidence import AnswerFile
from verify.identity import NodeKey
from verify.sampling import SamplingParams
from verify.verifier import verify_answer

pytestmark = pytest.mark.slow

FRANCE = "What is the capital of France?"
PROMPTS = [FRANCE, "Write a haiku about rain.", "List three prime numbers.", "Why is the sea salty?"]


@pytest.fixture(scope="module")
def default_model_fp32():
    return load_model(DEFAULT_MODEL, device="cpu", weights="fp32")


@pytest.fixture(scope="module")
def reference(default_model) -> NumpyLlama:
    """The independent numpy model of the default checkpoint (built once: it dequantizes 135M weights)."""
    return NumpyLlama.from_checkpoint(load_checkpoint(default_model.path), dtype=np.float32)


def greedy(model, prompt_ids, max_tokens):
    async def go():
        async with Engine(model.runtime, model.tokenizer, model.model_id, max_context=model.max_context) as engine:
            return await engine.complete(GenerationRequest(tuple(prompt_ids), SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=0)))

    return asyncio.run(go())


def test_identity_and_shape(default_model):
    cfg = default_model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert len(default_model.model_id) == 64
    assert default_model.manifest.weight_dtype == "gguf:F32+Q4_1+Q8_0"


def test_france_answer(default_model):
    ids = default_model.tokenizer.encode_chat([{"role": "user", "content": FRANCE}])
    result = greedy(default_model, ids, 32)
    assert result.text == "The capital of France is Paris."
    assert result.finish_reason == "stop"


@pytest.mark.parametrize(
    "chat,text",
    [(True, "Name a color of the sky."), (False, "Once upon a time, there was a")],
)
def test_greedy_tokens_match_numpy_reference(default_model, reference, chat, text):
    tok = default_model.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": text}]) if chat else tok.encode_prompt(text)
    n_new = 6
    ours = greedy(default_model, ids, n_new).output_ids
    ref = reference.greedy(ids, n_new, eos_ids=tok.eos_token_ids)
    assert ours == ref


def test_native_and_fp32_paths_answer_alike_and_check_each_other(default_model, default_model_fp32):
    """One model_id, two honest backends: the same greedy answers, and each one's answers pass
    the verifier running on the other."""
    native, fp32 = default_model, default_model_fp32
    assert native.model_id == fp32.model_id and native.backend.endswith("/native") and native.backend != fp32.backend
    assert native.runtime.weight_bytes < fp32.runtime.weight_bytes / 4
    for prompt in PROMPTS:
        a = generate(native, prompt, temperature=0.0, max_tokens=24)
        b = generate(fp32, prompt, temperature=0.0, max_tokens=24)
        assert a.output_ids == b.output_ids, prompt
    key = NodeKey.generate()
    for maker, checker in ((native, fp32), (fp32, native)):
        for prompt, temperature in zip(PROMPTS, (0.0, 0.8, 1.0, 0.0)):
            result = generate(maker, prompt, temperature=temperature, max_tokens=32, seed=7)
            answer = answer_file(result, key, model_id=maker.model_id, backend=maker.backend)
            verdict = verify_answer(AnswerFile.model_validate_json(answer.model_dump_json()), checker)
            assert verdict.verdict == "pass", (maker.backend, prompt, verdict)

"""The batching engine on a tiny compiled model: concurrency, determinism, limits, cancellation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from node.runtime.engine import Engine, GenerationRequest
from node.errors import ContextLengthError, EngineBusyError
from node.models.llama.reference import NumpyLlama
from verify.sampling import SamplingParams

MODEL_ID = "0" * 64


def engine_for(runtime, ckpt, **kw) -> Engine:
    return Engine(runtime, ckpt.tokenizer, MODEL_ID, max_context=512, **kw)


def request(prompt_ids, *, max_tokens=12, temperature=0.0, seed=0, **kw) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, **kw)
    return GenerationRequest(tuple(prompt_ids), params)


def prompt(ckpt, text: str) -> list[int]:
    return ckpt.tokenizer.encode_prompt(text)


def run(coro):
    return asyncio.run(coro)


def test_greedy_equals_numpy_reference(tiny_ckpt, tiny_runtime):
    ids = prompt(tiny_ckpt, "The capital of France is")

    async def go():
        async with engine_for(tiny_runtime, tiny_ckpt) as engine:
            return await engine.complete(request(ids, max_tokens=10, stop_token_ids=()))

    result = run(go())
    ref = NumpyLlama.from_checkpoint(tiny_ckpt).greedy(ids, 10, eos_ids=tiny_ckpt.tokenizer.eos_token_ids)
    assert result.output_ids == ref
    assert len(result.fingerprints) == len(result.output_ids)
    assert all(len(f.ids) == 8 for f in result.fingerprints)


def test_concurrent_requests_match_solo_runs(tiny_ckpt, tiny_runtime):
    """Sequences of different lengths joining and leaving the batch get exactly their solo tokens."""
    texts = ["Hello", "The quick brown fox jumps over the lazy dog and", "1234567890 numbers", "Paris is"]
    reqs = [request(prompt(tiny_ckpt, t), max_tokens=6 + 3 * i, temperature=0.8, seed=100 + i) for i, t in enumerate(texts)]

    async def go():
        async with engine_for(tiny_runtime, tiny_ckpt) as engine:
            solo = [await engine.complete(r) for r in reqs]
            together = await asyncio.gather(*(engine.complete(r) for r in reqs))
            return solo, together

    solo, together = run(go())
    for a, b in zip(solo, together):
        assert a.output_ids == b.output_ids
        assert a.request_hash == b.request_hash
        np.testing.assert_array_equal(np.array(a.fingerprints[0].logits), np.array(b.fingerprints[0].logits))


def test_seed_makes_sampling_reproducible(tiny_ckpt, tiny_runtime):
    ids = prompt(tiny_ckpt, "Hello, world!")

    async def go():
        async with engine_for(tiny_runtime, tiny_ckpt) as engine:
            a = await engine.complete(request(ids, temperature=1.0, seed=7, max_tokens=16))
            b = await engine.complete(request(ids, temperature=1.0, seed=7, max_tokens=16))
            c = await engine.complete(request(ids, temperature=1.0, seed=8, max_tokens=16))
            return a, b, c

    a, b, c = run(go())
    assert a.output_ids == b.output_ids
    assert a.output_ids != c.output_ids
    assert a.request_hash != c.request_hash


def test_max_tokens_gives_length_and_stream_text_adds_up(tiny_ckpt, tiny_runtime):
    ids = prompt(tiny_ckpt, "Café, naïve")

    async def go():
        async with engine_for(tiny_runtime, tiny_ckpt) as engine:
            events = [e async for e in engine.generate(request(ids, max_tokens=9, temperature=1.0, seed=3))]
            return events

    events = run(go())
    final = events[-1].result
    assert final is not None
    eos = set(tiny_ckpt.tokenizer.eos_token_ids)
    ended_on_eos = final.output_ids[-1] in eos and not eos & set(final.output_ids[:-1])
    assert (final.finish_reason, len(final.output_ids) == 9 or ended_on_eos) in (("length", True), ("stop", True))
    assert (final.finish_reason == "length") == (len(final.output_ids) == 9 and not ended_on_eos)
    assert "".join(e.text for e in events) == final.text
    assert "\ufffd" not in final.text or "\ufffd" in tiny_ckpt.tokenizer.decode(final.output_ids)


def test_stop_string_cuts_the_answer(tiny_ckpt, tiny_runtime):
    ids = prompt(tiny_ckpt, "The quick brown")

    async def go(stop):
        async with engine_for(tiny_runtime, tiny_ckpt) as engine:
            # Greedy: the stop strings are hashed into the request, which keys the sampling noise.
            return await engine.complete(request(ids, max_tokens=24, temperature=0.0, stop=stop))

    free = run(go(()))
    text = free.text  # the tiny model's weights are seeded: this answer is the same on every run
    assert len(text) >= 4, f"no text to pick a stop string from: {free.finish_reason} after {text!r}"
    stop = text[2:4]
    cut = run(go((stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]


def test_context_and_queue_limits(tiny_ckpt, tiny_runtime):
    async def go():
        async with Engine(tiny_runtime, tiny_ckpt.tokenizer, MODEL_ID, max_context=64, max_queue=8) as engine:
            with pytest.raises(ContextLengthError):
                await engine.complete(request([5] * 60, max_tokens=10))
            # Seventeen submissions in one tick of the loop: the engine thread admits at most a
            # full batch (8) meanwhile, so the seventeenth finds the queue (8) full.
            tasks = [asyncio.ensure_future(engine.complete(request([5, 6, 7], max_tokens=60, temperature=1.0, seed=i)))
                     for i in range(17)]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            assert isinstance(tasks[16].exception(), EngineBusyError)
            # Callers going away (cancelled tasks) free their batch slots and KV pages.
            for t in tasks[:16]:
                t.cancel()
            await asyncio.gather(*tasks[:16], return_exceptions=True)
            for _ in range(100):
                if engine.running == 0 and tiny_runtime.live_sequences == 0:
                    break
                await asyncio.sleep(0.02)
            assert engine.running == 0 and engine.queue_depth == 0
            assert tiny_runtime.live_sequences == 0
            # and the engine still serves afterwards
            result = await engine.complete(request([5, 6], max_tokens=3))
            assert len(result.output_ids) >= 1

    run(go())


def test_caller_going_away_frees_its_slot_at_once(tiny_ckpt, tiny_runtime):
    async def go():
        async with engine_for(tiny_runtime, tiny_ckpt) as engine:
            stream = engine.generate(request([5, 6, 7], max_tokens=400, temperature=1.0, seed=1))
            await stream.__anext__()
            await stream.aclose()
            steps_at_close = engine.steps_run
            deadline = asyncio.get_running_loop().time() + 30
            while engine.running or tiny_runtime.live_sequences:
                assert asyncio.get_running_loop().time() < deadline, "the slot was never freed"
                await asyncio.sleep(0.001)
            return engine.steps_run - steps_at_close

    steps_after_close = run(go())
    assert steps_after_close <= 2  # not the ~400 steps the answer would have taken


def test_admission_reserves_whole_kv_pages(tiny_ckpt, store, cpu):
    """Three answers of 21 tokens need 3 x 2 pages of 16: the 64-slot cache holds two at a time.
    Counting tokens (63 <= 64) instead of pages would admit all three and fill the cache mid-answer."""
    from node.runtime.model_runtime import CacheLimits
    from tests.conftest import make_runtime

    runtime = make_runtime(tiny_ckpt, store, cpu, CacheLimits(max_batch_size=4, max_total_tokens=64, prefill_chunk=64))
    reqs = [request([5], max_tokens=20, temperature=1.0, seed=i, stop_token_ids=()) for i in range(3)]

    async def go():
        async with Engine(runtime, tiny_ckpt.tokenizer, MODEL_ID, max_context=64) as engine:
            return await asyncio.gather(*(engine.complete(r) for r in reqs))

    results = run(go())
    eos = set(tiny_ckpt.tokenizer.eos_token_ids)
    for r in results:  # every answer ran to its end: its whole budget, or an end-of-sequence token
        assert (r.finish_reason == "length" and len(r.output_ids) == 20) or (r.finish_reason == "stop" and r.output_ids[-1] in eos)
    assert runtime.live_sequences == 0


def test_tokens_are_handed_over_in_bursts_but_first_and_last_at_once(tiny_ckpt, tiny_runtime):
    """With a long delivery interval, a stream's first event comes as soon as its token is
    sampled and the rest together with the last: every token, in order, none held back at the end."""
    ids = prompt(tiny_ckpt, "Hello there")

    async def go(interval):
        async with engine_for(tiny_runtime, tiny_ckpt) as engine:
            engine.delivery_interval = interval
            arrivals, events = [], []
            loop = asyncio.get_running_loop()
            async for event in engine.generate(request(ids, max_tokens=12, stop_token_ids=())):
                arrivals.append(loop.time())
                events.append(event)
            return arrivals, events

    arrivals, events = run(go(60.0))
    assert [e.token_id for e in events] == events[-1].result.output_ids and len(events) == 12
    assert events[-1].finish_reason == "length"
    burst = arrivals[1:]  # 11 tokens handed over in one go, after the 11 steps that made them
    assert max(burst) - min(burst) < (arrivals[1] - arrivals[0]) / 4
    _, every = run(go(0.0))
    assert [e.token_id for e in every] == [e.token_id for e in events]


def test_long_prompts_join_in_bounded_chunks_and_a_decoding_answer_keeps_its_pace(tiny_ckpt, tiny_runtime):
    """Issue 21, attack 10 in the engine: while one client's seven long prompts are prefilled,
    another client's answer already decoding gets a token every step (each step prefills at most
    one 64-token chunk). (Before: all
    seven prefills ran back to back in one step, and the victim got one token meanwhile.)"""
    victim = GenerationRequest(tuple(prompt(tiny_ckpt, "Hello")), SamplingParams(max_tokens=200, temperature=0.0, seed=0,
                                                                                 stop_token_ids=()), client="victim")
    flood = [GenerationRequest(tuple([5 + i] * 240), SamplingParams(max_tokens=1, seed=i), client="attacker") for i in range(7)]

    async def go():
        async with engine_for(tiny_runtime, tiny_ckpt) as engine:
            tokens = 0
            stream = engine.generate(victim)
            await anext(stream)
            attacks = [asyncio.ensure_future(engine.complete(r)) for r in flood]
            await asyncio.sleep(0)  # the attack is submitted
            at_start = tokens
            async for _ in stream:
                tokens += 1
                if all(a.done() for a in attacks):
                    break
            await stream.aclose()
            results = await asyncio.gather(*attacks)
            return tokens - at_start, results

    during, results = run(go())
    assert all(len(r.output_ids) == 1 for r in results)
    assert during >= 7 * 240 // 64  # one token a step at least while the 7 x 4 chunks went in


def test_one_client_leaves_a_quarter_of_the_batch_to_whoever_comes_next(tiny_ckpt, tiny_runtime):
    """Issue 21, attack 10: one client's long answers fill at most three quarters of the batch
    slots (no preemption: a newcomer starts only where a slot is free), so another client's first
    token comes while all of them still run. (Before: the first client held all 8 slots, and the
    newcomer waited for one of its answers to end.)"""
    slots = tiny_runtime.limits.max_batch_size
    long_answers = [GenerationRequest(tuple(prompt(tiny_ckpt, f"Story {i}")), SamplingParams(max_tokens=120, seed=i,
                                      stop_token_ids=()), client="first") for i in range(slots)]
    newcomer = GenerationRequest(tuple(prompt(tiny_ckpt, "Hello")), SamplingParams(max_tokens=2, seed=0), client="next")

    async def go():
        async with engine_for(tiny_runtime, tiny_ckpt) as engine:
            streams = [engine.generate(r) for r in long_answers]
            for s in streams:  # every one of them started
                await anext(s)
            running_first = engine.running
            result = await engine.complete(newcomer)
            unfinished = engine.running
            for s in streams:
                await s.aclose()
            return running_first, result, unfinished

    running_first, result, unfinished = run(go())
    assert running_first <= int(slots * 0.75) < slots
    assert len(result.output_ids) == 2 and unfinished > 0  # served while long ones still ran

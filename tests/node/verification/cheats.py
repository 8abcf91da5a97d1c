"""Dishonest nodes: every cheat the verifier must flag (DESIGN.md, Verification; issue 3 item 6).

Each cheat answers real requests and signs its answers with a valid node key, so every
commitment (request_hash, output_hash, fingerprint_root, signature) holds together: only the
model work can give it away. Used by the tests (every cheat flagged) and by
``bench/bench_cheats.py`` (detection rate against answer length), which imports it from here:
attack simulations are no part of the product, and the tests never import bench/.

Cheats, by what they save or fake:
- cheaper weights under the real model_id: fp16- or int8-rounded, requantized to Q4_0, one
  layer skipped, or a cheaper model altogether (fingerprints copied from it);
- a cheaper model decodes, then one prefill of the real model supplies the fingerprints (what
  fingerprint-only schemes such as TOPLOC cannot catch; the seeded sampling check does);
- a truncated prompt; fabricated tokens; one edited token in a long answer (fingerprints
  recomputed by a real prefill so they match);
- tokens drawn with another seed, or by plain multinomial sampling that ignores the seed;
- a token outside the grammar: an honest structured answer (JSON mode, a schema, a forced
  tool call) with one token swapped for the best-scoring one its grammar forbids there;
- a short answer re-signed as complete (asked for 2 tokens, claimed under the client's
  max_tokens with finish "stop"): the finish rules catch it without model work;
- receipts forged with another key, or replayed over another request's evidence: not the
  node's answer at all, so ``unattributable`` (never evidence against it);
- fingerprints emptied and re-signed: ``malformed`` before any model work.

``EXPECTED`` says which verdict each cheat must get (``fraud`` unless named there).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import gguf
import numpy as np
from gguf import quants

from tests.node.verification.harness import Generator, with_structure
from node.compiler.build import compile_model
from node.runtime.engine import GenerationRequest
from node.runtime.loading import LoadedModel, load_checkpoint_cached
from node.models.llama.model import fuse_hf_weights
from node.runtime.model_runtime import ModelRuntime
from verify.evidence import AnswerFile, Fingerprint, position_fingerprint, sign_answer
from verify.identity import NodeKey
from verify.sampling import SamplingParams, process_logits

Weights = dict[str, np.ndarray]
FingerprintRows = list[Fingerprint]


# -- cheaper weights -------------------------------------------------------------------------
def _is_matrix(name: str, w: np.ndarray) -> bool:
    return w.ndim == 2 and not name.endswith("norm.weight")


def round_fp16(weights: Weights) -> Weights:
    return {k: v.astype(np.float16).astype(np.float32) for k, v in weights.items()}


def round_int8(weights: Weights) -> Weights:
    """Symmetric int8 per output row (the usual weight-only int8), back to float32."""
    out = {}
    for k, v in weights.items():
        if _is_matrix(k, v):
            scale = np.maximum(np.abs(v).max(axis=1, keepdims=True), 1e-12) / 127.0
            v = (np.clip(np.round(v / scale), -127, 127) * scale).astype(np.float32)
        out[k] = v
    return out


def requantize_q4_0(weights: Weights) -> Weights:
    """Every matrix whose rows split into 32-wide blocks, through GGML's Q4_0 and back."""
    q4_0 = gguf.GGMLQuantizationType.Q4_0
    out = {}
    for k, v in weights.items():
        if _is_matrix(k, v) and v.shape[1] % 32 == 0:
            v = quants.dequantize(quants.quantize(v, q4_0), q4_0).astype(np.float32).reshape(v.shape)
        out[k] = v
    return out


def skip_layers(*layers: int) -> Callable[[Weights], Weights]:
    """Zero a layer's attention and MLP output projections: its residual stream passes through
    unchanged, exactly as if the layer were not run."""

    def transform(weights: Weights) -> Weights:
        out = dict(weights)
        for i in layers:
            for part in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
                name = f"model.layers.{i}.{part}"
                out[name] = np.zeros_like(weights[name])
        return out

    return transform


def cheap_generator(model: LoadedModel, transform: Callable[[Weights], Weights], root: Path) -> Generator:
    """A runtime with transformed weights that claims ``model``'s model_id and backend."""
    ckpt = load_checkpoint_cached(model.path, root, progress=lambda m: None)
    library = compile_model(ckpt.config, model.device.target, root)
    runtime = ModelRuntime(ckpt.config, library, fuse_hf_weights(ckpt.config, transform(ckpt.weights)), model.device,
                           model.runtime.limits)
    return Generator(runtime, model.tokenizer, model.model_id, model.backend, model.max_context)


# -- signing whatever a cheat produced --------------------------------------------------------
def claim(key: NodeKey, model: LoadedModel, prompt_ids: Sequence[int], output_ids: Sequence[int], params: SamplingParams,
          fingerprints: FingerprintRows, finish_reason: str | None = None) -> AnswerFile:
    """A validly signed, internally consistent answer file for any claimed tokens (finish: what
    an honest node would say for these tokens, unless given)."""
    if finish_reason is None:
        finish_reason = "stop" if output_ids[-1] in model.eos_token_ids else "length"
    return sign_answer(key, model_id=model.model_id, backend=model.backend, prompt_ids=prompt_ids, output_ids=output_ids,
                       params=params, fingerprints=fingerprints, finish_reason=finish_reason)


def real_fingerprints(model: LoadedModel, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> FingerprintRows:
    """What one honest prefill of the real model commits for these tokens."""
    rows = model.score(list(prompt_ids) + list(output_ids)[:-1], len(prompt_ids) - 1)
    return [position_fingerprint(row, token) for row, token in zip(rows, output_ids)]


# -- the cheats ---------------------------------------------------------------------------------
@dataclass
class CheatContext:
    """The real model (what answers claim), the node's key, and a cheaper model to lean on."""

    model: LoadedModel
    key: NodeKey
    root: Path
    cheap: Generator  # a cheaper model under the real model_id
    rng: random.Random
    other: LoadedModel | None = None  # another model whose text is claimed under this one's id


Cheat = Callable[[CheatContext, Sequence[GenerationRequest]], list[AnswerFile]]


def _refingerprinted(ctx: CheatContext, prompt_ids: Sequence[int], output_ids: Sequence[int], params: SamplingParams) -> AnswerFile:
    """Claim these tokens with the fingerprints a real prefill gives them (so that check passes)."""
    return claim(ctx.key, ctx.model, prompt_ids, output_ids, params, real_fingerprints(ctx.model, prompt_ids, output_ids))


def _fingerprints_of(answer: AnswerFile) -> FingerprintRows:
    return list(answer.evidence.fingerprints)


def _weights_cheat(transform: Callable[[Weights], Weights]) -> Cheat:
    def run(ctx: CheatContext, requests: Sequence[GenerationRequest]) -> list[AnswerFile]:
        return cheap_generator(ctx.model, transform, ctx.root).answers(requests, ctx.key, concurrency=8)

    return run


def _skip_middle_layer(ctx: CheatContext, requests: Sequence[GenerationRequest]) -> list[AnswerFile]:
    middle = ctx.model.config.num_hidden_layers // 2
    return _weights_cheat(skip_layers(middle))(ctx, requests)


def _cheap_model(ctx: CheatContext, requests: Sequence[GenerationRequest]) -> list[AnswerFile]:
    return ctx.cheap.answers(requests, ctx.key, concurrency=8)


def _cheap_decode_real_fingerprints(ctx: CheatContext, requests: Sequence[GenerationRequest]) -> list[AnswerFile]:
    return [_refingerprinted(ctx, a.evidence.prompt_ids, a.evidence.output_ids, a.evidence.sampling) for a in _cheap_model(ctx, requests)]


def _other_model_text(ctx: CheatContext, requests: Sequence[GenerationRequest]) -> list[AnswerFile]:
    """Another (smaller) model writes the answer to the same prompt text; its text, tokenized as
    the claimed model tokenizes it, is claimed with the fingerprints a real prefill gives it."""
    if ctx.other is None:
        return []
    own, other = ctx.model.tokenizer, ctx.other.tokenizer
    asked = [GenerationRequest(tuple(other.encode_prompt(own.decode(r.prompt_ids))), r.params) for r in requests]
    out = []
    for r, a in zip(requests, Generator.of(ctx.other).answers(asked, ctx.key, concurrency=8)):
        ids = own.encode_prompt(other.decode(a.evidence.output_ids))
        ids = [i for i in ids if i != own.bos_token_id][: r.params.max_tokens] or [own.eos_token_ids[0]]
        out.append(_refingerprinted(ctx, r.prompt_ids, ids, r.params))
    return out


def honest_answers(ctx: CheatContext, requests: Sequence[GenerationRequest]) -> list[AnswerFile]:
    """The control: the real model answering honestly (what several cheats start from)."""
    return Generator.of(ctx.model).answers(requests, ctx.key, concurrency=8)


def honest_constrained_answers(ctx: CheatContext, requests: Sequence[GenerationRequest]) -> list[AnswerFile]:
    """The control for grammar cheats: the same sampling parameters asked as structured output
    (``tests.node.verification.harness.with_structure``), answered honestly under the grammar's mask."""
    return honest_answers(ctx, with_structure(ctx.model.tokenizer, requests, ctx.model.max_context))


def _token_outside_grammar(ctx: CheatContext, requests: Sequence[GenerationRequest]) -> list[AnswerFile]:
    """An honest structured answer with the token in its middle swapped for the one the grammar
    forbids there that the model scores best (what an unconstrained draw would most likely have
    written), fingerprints recomputed by a real prefill and re-signed: only the mask can tell."""
    out = []
    for answer in honest_constrained_answers(ctx, requests):
        ev = answer.evidence
        t = (len(ev.output_ids) - 1) // 2
        state = ctx.model.grammar_vocabulary().state(ev.sampling.grammar)
        for token in ev.output_ids[:t]:
            state.advance(token)
        row = ctx.model.score(list(ev.prompt_ids) + list(ev.output_ids[:t]), len(ev.prompt_ids) + t - 1)[0]
        allowed = state.allowed()
        if allowed.all():
            raise RuntimeError(f"the grammar forbids nothing at position {t}: no token to swap in")
        edited = list(ev.output_ids)
        edited[t] = int(np.argmax(np.where(allowed, -np.inf, row)))
        out.append(_refingerprinted(ctx, ev.prompt_ids, edited, ev.sampling))
    return out


def _truncated_prompt(ctx: CheatContext, requests: Sequence[GenerationRequest]) -> list[AnswerFile]:
    """Answer only the second half of each prompt (a dropped system message, a cut context)."""
    shortened = [GenerationRequest(r.prompt_ids[len(r.prompt_ids) // 2 :], r.params) for r in requests]
    answers = honest_answers(ctx, shortened)
    return [claim(ctx.key, ctx.model, r.prompt_ids, a.evidence.output_ids, r.params, _fingerprints_of(a)) for r, a in zip(requests, answers)]


def _fabricated_tokens(ctx: CheatContext, requests: Sequence[GenerationRequest]) -> list[AnswerFile]:
    vocab = ctx.model.vocab_size
    return [_refingerprinted(ctx, r.prompt_ids, [ctx.rng.randrange(vocab) for _ in range(r.params.max_tokens)], r.params) for r in requests]


def _edited_token(ctx: CheatContext, requests: Sequence[GenerationRequest]) -> list[AnswerFile]:
    """One token in the middle of an honest answer swapped for the runner-up of its position."""
    out = []
    for answer in honest_answers(ctx, requests):
        ev = answer.evidence
        t = len(ev.output_ids) // 2
        alternatives = [i for i in ev.fingerprints[t].ids if i != ev.output_ids[t]]
        edited = list(ev.output_ids)
        edited[t] = alternatives[0] if alternatives else (edited[t] + 1) % ctx.model.vocab_size
        out.append(_refingerprinted(ctx, ev.prompt_ids, edited, ev.sampling))
    return out


def _wrong_seed(ctx: CheatContext, requests: Sequence[GenerationRequest]) -> list[AnswerFile]:
    """Drawn with another seed, claimed under the request's seed."""
    drawn = honest_answers(ctx, [GenerationRequest(r.prompt_ids, r.params.model_copy(update={"seed": r.params.seed ^ 1})) for r in requests])
    return [claim(ctx.key, ctx.model, r.prompt_ids, a.evidence.output_ids, r.params, _fingerprints_of(a)) for r, a in zip(requests, drawn)]


def _seed_ignored(ctx: CheatContext, requests: Sequence[GenerationRequest]) -> list[AnswerFile]:
    """Plain multinomial sampling from the right distribution, ignoring the committed seed."""
    rt, eos = ctx.model.runtime, set(ctx.model.tokenizer.eos_token_ids)
    np_rng = np.random.default_rng(ctx.rng.getrandbits(32))
    out = []
    for request in requests:
        params, seq = request.params, -(10**6)  # a sequence id nobody else uses
        rt.add_sequence(seq)
        try:
            logits, tokens, fingerprints = rt.prefill(seq, list(request.prompt_ids))[-1], [], []
            for _ in range(params.max_tokens):
                scores = process_logits(logits, params, tokens)
                probs = np.exp(scores - scores.max())
                token = int(np_rng.choice(probs.size, p=probs / probs.sum()))
                tokens.append(token)
                fingerprints.append(position_fingerprint(logits, token))
                if token in eos:
                    break
                logits = rt.decode([seq], [token])[0]
        finally:
            rt.remove_sequence(seq)
        out.append(claim(ctx.key, ctx.model, request.prompt_ids, tokens, params, fingerprints))
    return out


def _forged_receipt(ctx: CheatContext, requests: Sequence[GenerationRequest]) -> list[AnswerFile]:
    """Honest work, but the receipt is re-signed by another key while naming the same node."""
    forger = NodeKey.generate()
    out = []
    for answer in honest_answers(ctx, requests):
        ev = answer.evidence
        forged = claim(forger, ctx.model, ev.prompt_ids, ev.output_ids, ev.sampling, _fingerprints_of(answer))
        out.append(forged.model_copy(update={"public_key": answer.public_key}))
    return out


def _replayed_receipt(ctx: CheatContext, requests: Sequence[GenerationRequest]) -> list[AnswerFile]:
    """Each receipt presented with the evidence of the next request's answer."""
    answers = honest_answers(ctx, requests)
    return [a.model_copy(update={"evidence": answers[(i + 1) % len(answers)].evidence}) for i, a in enumerate(answers)]


def _truncated_resigned(ctx: CheatContext, requests: Sequence[GenerationRequest]) -> list[AnswerFile]:
    """Two greedy tokens asked of the honest node, re-signed under the client's parameters as a
    complete answer (finish "stop"): a truncation that every model check passes."""
    short = honest_answers(ctx, [GenerationRequest(r.prompt_ids, r.params.model_copy(update={"temperature": 0.0, "max_tokens": 2}))
                                 for r in requests])
    return [claim(ctx.key, ctx.model, r.prompt_ids, a.evidence.output_ids, r.params.model_copy(update={"temperature": 0.0}),
                  _fingerprints_of(a), finish_reason="stop") for r, a in zip(requests, short)]


def _emptied_fingerprints(ctx: CheatContext, requests: Sequence[GenerationRequest]) -> list[AnswerFile]:
    """An answer re-signed with every fingerprint emptied (the fingerprint check has nothing to compare)."""
    return [claim(ctx.key, ctx.model, a.evidence.prompt_ids, a.evidence.output_ids, a.evidence.sampling,
                  [Fingerprint(ids=[], logits=[], token_logit=0.0, log_normalizer=0.0)] * len(a.evidence.output_ids)) for a in _cheap_model(ctx, requests)]


CHEATS: dict[str, Cheat] = {
    "fp16-weights": _weights_cheat(round_fp16),
    "int8-weights": _weights_cheat(round_int8),
    "q4_0-weights": _weights_cheat(requantize_q4_0),
    "skipped-layer": _skip_middle_layer,
    "cheaper-model": _cheap_model,
    "cheap-decode-real-fingerprints": _cheap_decode_real_fingerprints,
    "other-model-text": _other_model_text,
    "truncated-prompt": _truncated_prompt,
    "fabricated-tokens": _fabricated_tokens,
    "edited-token": _edited_token,
    "wrong-seed": _wrong_seed,
    "seed-ignored": _seed_ignored,
    "token-outside-grammar": _token_outside_grammar,
    "truncated-resigned": _truncated_resigned,
    "emptied-fingerprints": _emptied_fingerprints,
    "forged-receipt": _forged_receipt,
    "replayed-receipt": _replayed_receipt,
}
# The verdict each cheat must get when it is not "fraud": answers that are not the node's own
# prove nothing against it; malformed evidence is refused before any model work.
EXPECTED = {"forged-receipt": "unattributable", "replayed-receipt": "unattributable", "emptied-fingerprints": "malformed"}
# Cheats that only differ from honest work where the model is unsure (need T > 0 to mean anything).
SAMPLING_CHEATS = {"wrong-seed", "seed-ignored"}

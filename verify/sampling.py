"""Sampling that anyone can re-check from the same logits (DESIGN.md, "Sampling that can be re-checked").

Why: a node's answer must be checkable. A verifier that re-runs the model (teacher-forced
prefill) gets the logits of every position; from them, the committed seed and the request hash
it must be able to recompute which token the node had to pick. So sampling is Gumbel-max with
counter-based noise (no hidden RNG state), and everything before the noise is a deterministic
function of the logits and of the tokens generated so far. ``decision_scores`` exposes the exact
array whose argmax is the token, and ``token_margin`` how clearly the claimed token won it, so the
verifier can tolerate near-ties that honest hardware resolves differently.

Order of operations at step ``t`` (``t`` = number of tokens generated before this one), all in
float64, ``V`` = vocabulary size:

0. grammar (when the parameters carry one): tokens outside the grammar's mask at this step
   (``verify.grammar``: a function of the grammar and the tokens generated so far) get ``-inf``;
1. penalties (OpenAI): ``score[j] = logit[j] - count[j] * frequency_penalty - (count[j] > 0) * presence_penalty``
   (evaluated left to right), ``count[j]`` = occurrences of token j among the tokens generated so
   far (not the prompt);
2. temperature: ``score[j] = score[j] / T``; skipped when ``T == 0`` (greedy);
3. top-k (``k > 0``): keep the k tokens ranked best, set the others to ``-inf``;
4. top-p (``p < 1``): over the tokens still kept, ranked best first, with weights
   ``w = exp(score - best)`` and running sums ``c[n] = w[0] + ... + w[n]`` (summed left to right),
   keep the smallest prefix whose sum reaches ``p * c[last]`` (at least one token); the rest ``-inf``;
5. ``T == 0``: the token is ``argmax(score)``; ``T > 0``: ``argmax(score + g)`` where ``g`` is the
   Gumbel noise of step t (``-inf + g`` stays ``-inf``).

Ranking ("best") is by descending score, ties to the lower token id; ``argmax`` also returns the
lowest id among equal maxima. NaN or ``+inf`` logits are rejected (``-inf`` is allowed: a
masked token).

The noise for step t, exactly (so that an implementation in another language reproduces it):

* ``digest = sha256(b"proofmesh/gumbel/v1" || seed as 8 bytes big-endian || request_hash)``;
* ``key = (k0, k1)``: ``digest[0:8]`` and ``digest[8:16]``, each read as a little-endian uint64;
* Philox-4x64-10 (Random123: multipliers ``0xD2E7470EE14C6C93``, ``0xCA5A826395121157``; key
  increments ``0x9E3779B97F4A7C15``, ``0xBB67AE8584CAA73B``), as numpy's ``Philox(key=[k0, k1],
  counter=[0, 0, 0, t])`` runs it: block ``n = 1, 2, 3, ...`` is the 4 output words of
  ``Philox(counter=(n, 0, 0, t), key)`` (numpy increments the counter before the first block, so
  the block with counter word 0 = 0 is never used); concatenating the blocks gives
  ``x[0], x[1], ...`` and the first ``V`` words are used (the rest of the last block is dropped);
* ``u[i] = (2 * (x[i] >> 12) + 1) / 2**53`` — the top 52 bits, centred in their cell: every step is
  exact in float64 and ``2**-53 <= u <= 1 - 2**-53``, strictly inside (0, 1);
* ``g[i] = -log(-log(u[i]))``.

The uniforms are bit-exact everywhere; ``log`` may differ by an ulp between math libraries,
which the verifier's margin absorbs. Steps use disjoint counter ranges (word 3 = t) for any
``V < 2**66``, and the noise never touches numpy's global random state.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

NOISE_DOMAIN = b"proofmesh/gumbel/v1"
MAX_GRAMMAR_BYTES = 64 * 1024  # a grammar costs every verifier its compile: bounded like any input
MAX_STOP_STRINGS = 4  # as OpenAI allows
# Characters per stop string. OpenAI documents no bound; one is needed: every choice's stop
# checker holds back and scans up to this much text at every token, and every verifier re-reads
# the strings. 256 covers any delimiter, tag or sentence an honest client stops at (attack 7 of
# issue 21 sent four of 249 KB).
MAX_STOP_CHARS = 256
U64 = 2**64  # seeds and steps are unsigned 64-bit


class SamplingParams(BaseModel):
    """Every parameter that decides which tokens are produced (all hashed into request_hash)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)  # 0 = greedy argmax
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)  # 0 disables
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    max_tokens: int = Field(256, ge=1)
    seed: int = Field(..., ge=0, lt=U64)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[Annotated[int, Field(ge=0)], ...] = ()
    # Canonical grammar text (``verify.grammar``) the answer must follow; None: unconstrained.
    grammar: str | None = Field(None, max_length=MAX_GRAMMAR_BYTES)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in value):
            raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters each")
        return value

    def to_canonical_dict(self) -> dict[str, Any]:
        """All fields as plain JSON types (floats as float, tuples as lists), for request_hash."""
        return {
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "top_k": int(self.top_k),
            "presence_penalty": float(self.presence_penalty),
            "frequency_penalty": float(self.frequency_penalty),
            "max_tokens": int(self.max_tokens),
            "seed": int(self.seed),
            "stop": list(self.stop),
            "stop_token_ids": [int(i) for i in self.stop_token_ids],
            # Present only when set, so that an unconstrained request hashes as it always did.
            **({"grammar": self.grammar} if self.grammar is not None else {}),
        }


def _uniforms(raw: np.ndarray) -> np.ndarray:
    """uint64 words -> float64 in (0, 1): ``(2 * (x >> 12) + 1) / 2**53``, exact."""
    top52 = (np.asarray(raw, dtype=np.uint64) >> np.uint64(12)).astype(np.float64)
    return (2.0 * top52 + 1.0) * (2.0**-53)


def _philox_words(seed: int, request_hash: bytes, step: int, vocab_size: int) -> np.ndarray:
    """The step's ``vocab_size`` raw uint64 words (see ``gumbel_noise``)."""
    if not 0 <= int(seed) < U64:
        raise ValueError("seed must be in [0, 2**64)")
    if not 0 <= int(step) < U64:
        raise ValueError("step must be in [0, 2**64)")
    if int(vocab_size) < 0:
        raise ValueError("vocab_size must be >= 0")
    digest = hashlib.sha256(NOISE_DOMAIN + int(seed).to_bytes(8, "big") + bytes(request_hash)).digest()
    key = np.frombuffer(digest[:16], dtype="<u8").astype(np.uint64)
    bitgen = np.random.Philox(key=key, counter=np.array([0, 0, 0, int(step)], dtype=np.uint64))
    return bitgen.random_raw(int(vocab_size))


def _gumbel(raw: np.ndarray) -> np.ndarray:
    return -np.log(-np.log(_uniforms(raw)))


def gumbel_noise(seed: int, request_hash: bytes, step: int, vocab_size: int) -> np.ndarray:
    """Gumbel(0, 1) noise for one step (float64, length ``vocab_size``).

    Construction (see the module docstring for the full statement): key = first 16 bytes of
    ``sha256(b"proofmesh/gumbel/v1" || seed.to_bytes(8, "big") || request_hash)`` as two
    little-endian uint64 words; ``numpy.random.Philox(key=key, counter=[0, 0, 0, step])``;
    ``x = random_raw(vocab_size)``; ``u = (2 * (x >> 12) + 1) / 2**53``; ``g = -log(-log(u))``.
    """
    return _gumbel(_philox_words(seed, request_hash, step, vocab_size))


# u lies in [2**-53, 1 - 2**-53], so every noise value lies in [_G_LOW, _G_HIGH] (~[-3.6, 36.7]).
_G_LOW, _G_HIGH = (float(g) for g in _gumbel(np.array([0, U64 - 1], dtype=np.uint64)))
_CONTENDER_WINDOW = _G_HIGH - _G_LOW + 1e-9


def _contender_noise(scores: np.ndarray, seed: int, request_hash: bytes, step: int, exact_ids: Sequence[int]) -> np.ndarray:
    """``gumbel_noise`` where it can matter, ``_G_HIGH`` elsewhere.

    A token scoring more than the noise's whole range below the best cannot win the draw even
    with the largest noise, so its two logarithms are skipped and it gets that largest noise:
    the argmax is exactly that of the full noise, at about a third of the cost (the logarithms
    dominate). ``exact_ids`` (a verifier's claimed token) always get their true noise.
    """
    raw = _philox_words(seed, request_hash, step, scores.size)
    contenders = scores >= np.max(scores) - _CONTENDER_WINDOW
    contenders[np.asarray(exact_ids, dtype=np.int64)] = True
    if np.count_nonzero(contenders) * 2 > scores.size:  # most tokens may win: plain full noise
        return _gumbel(raw)
    noise = np.full(scores.size, _G_HIGH)
    noise[contenders] = _gumbel(raw[contenders])
    return noise


# A weight below 2**-53 cannot change a running sum that is already >= 1 (it is less than half
# an ulp): tokens scoring more than -ln(2**-53) ~ 36.74 below the best add exactly nothing to the
# top-p sums. A slightly wider window keeps a last-ulp error of exp from mattering.
_TOP_P_WINDOW = 37.5


def _keep_best(scores: np.ndarray, k: int, threshold: float | None = None) -> None:
    """Set every score but the k best (by (-score, id): ties to the lower id) to ``-inf``, in
    place; O(V) via the k-th largest value (``threshold``, when the caller knows it), never a
    full sort."""
    vocab = scores.size
    if not 0 < k < vocab:
        return
    if threshold is None:
        threshold = np.partition(scores, vocab - k)[vocab - k]
    keep = scores > threshold
    ties = np.flatnonzero(scores == threshold)[: k - int(keep.sum())]
    keep[ties] = True
    scores[~keep] = -np.inf


def _nucleus(scores: np.ndarray, top_p: float) -> tuple[int, float]:
    """How many of the best tokens top-p keeps (step 4 of the module docstring), exactly, and
    the score of the last one kept.

    The running sums need the weights in ranked order, but only their values: equal scores have
    equal weights, so the order among ties never changes a sum, and a sorted copy of the values
    gives the same floats as ranking the ids. Tokens outside ``_TOP_P_WINDOW`` add exactly 0
    to a sum that starts at 1 (the best token's weight) and are never in the nucleus, so only
    the few near the top are sorted (a full stable argsort of 49k scores cost ~5 ms a token).
    """
    best = float(np.max(scores))
    ranked = -np.sort(-scores[scores >= best - _TOP_P_WINDOW])
    cumulative = np.cumsum(np.exp(ranked - best))  # sequential, left to right
    kept = min(int(np.searchsorted(cumulative, top_p * cumulative[-1], side="left")) + 1, ranked.size)
    return kept, float(ranked[kept - 1])


def _check_logits(row: np.ndarray) -> None:
    """Refuse NaN or ``+inf`` logits, or a row with no finite logit: one pass, via the maximum
    (NaN anywhere makes it NaN)."""
    best = row.max()
    if np.isnan(best) or best == np.inf:
        raise ValueError("logits must not contain NaN or +inf")
    if best == -np.inf:
        raise ValueError("at least one logit must be finite")


def process_logits(logits: np.ndarray, params: SamplingParams, previous_output_ids: Sequence[int],
                   allowed: np.ndarray | None = None) -> np.ndarray:
    """Steps 0-4 of the module docstring: masked, penalised, tempered, truncated scores.

    ``allowed``: the grammar's boolean mask for this step (None: no grammar). Returns a new
    float64 vector (``-inf`` for tokens masked or dropped by top-k / top-p); ``logits`` is not
    modified. Raises ``ValueError`` for NaN or ``+inf`` logits, or when no logit is finite.
    """
    scores = _scores_before_top_p(logits, params, previous_output_ids, allowed)
    # 4. top-p over the tokens still kept: the nucleus is the best n of them, chosen as top-k is
    if params.top_p < 1.0:
        _keep_best(scores, *_nucleus(scores, params.top_p))
    return scores


def _scores_before_top_p(logits: np.ndarray, params: SamplingParams, previous_output_ids: Sequence[int],
                         allowed: np.ndarray | None) -> np.ndarray:
    """Steps 0-3 of the module docstring (``process_logits`` without top-p)."""
    scores = np.array(logits, dtype=np.float64).reshape(-1)
    _check_logits(scores)
    vocab = scores.size

    # 0. the grammar's mask
    if allowed is not None:
        if allowed.shape != (vocab,):
            raise ValueError(f"grammar mask of shape {allowed.shape} for {vocab} logits")
        scores[~allowed] = -np.inf
        if not np.isfinite(scores).any():
            raise ValueError("no token the grammar allows has a finite logit")

    # 1. penalties over the tokens generated so far
    if len(previous_output_ids) and (params.frequency_penalty != 0.0 or params.presence_penalty != 0.0):
        ids = np.asarray(previous_output_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError("previous output ids must be in [0, vocab_size)")
        counts = np.bincount(ids, minlength=vocab).astype(np.float64)
        scores = scores - counts * params.frequency_penalty - (counts > 0) * params.presence_penalty

    # 2. temperature
    if params.temperature > 0:
        scores = scores / params.temperature
        if np.isposinf(scores).any():
            raise ValueError("temperature too small: the scaled scores overflow")

    # 3. top-k: the k best by (-score, id)
    _keep_best(scores, params.top_k)
    return scores


def decision_scores(
    logits: np.ndarray,
    params: SamplingParams,
    request_hash: bytes,
    step: int,
    previous_output_ids: Sequence[int],
    exact_ids: Sequence[int] = (),
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """The array whose argmax is the sampled token: processed scores, plus this step's Gumbel
    noise when T > 0 (``-inf`` for masked tokens). Tokens that cannot win carry an upper bound
    of their noise (see ``_contender_noise``); those in ``exact_ids`` always their true value.
    ``allowed``: the grammar's mask for this step (``process_logits``)."""
    scores = process_logits(logits, params, previous_output_ids, allowed)
    if params.temperature > 0:
        scores = scores + _contender_noise(scores, params.seed, request_hash, step, exact_ids)
    return scores


def sample_token(
    logits: np.ndarray, params: SamplingParams, request_hash: bytes, step: int, previous_output_ids: Sequence[int],
    allowed: np.ndarray | None = None,
) -> int:
    """The token for this step: ``argmax(decision_scores(...))``, lowest id on exact ties."""
    penalised = len(previous_output_ids) and (params.frequency_penalty != 0.0 or params.presence_penalty != 0.0)
    if params.temperature == 0 and allowed is None and not penalised:
        # Plain greedy: top-k / top-p always keep the best token, and the float64 copy has the
        # same order as the float32 logits, so the argmax is taken in place (one pass fewer
        # over the vocabulary for every greedy token); the checks are process_logits's.
        row = np.asarray(logits).reshape(-1)
        _check_logits(row)
        return int(np.argmax(row))
    if params.temperature > 0 and params.top_p < 1.0:
        scores = _scores_before_top_p(logits, params, previous_output_ids, allowed)
        token = _draw_within_nucleus(scores, params, request_hash, step)
        if token is not None:
            return token
    return int(np.argmax(decision_scores(logits, params, request_hash, step, previous_output_ids, (), allowed)))


# Relative difference allowed between two computations of the same top-p sums (sums of at most V
# positive weights in different orders differ by less than V * 2**-53 relatively, about 5e-12 at
# V = 49k; exp may differ by an ulp): a decision this close to the line goes to the reference.
_NUCLEUS_SLACK = 1e-9
_NUCLEUS_CANDIDATES = 8  # draws outside the nucleus tried before handing over to the reference


def _draw_within_nucleus(scores: np.ndarray, params: SamplingParams, request_hash: bytes, step: int) -> int | None:
    """The token ``argmax(decision_scores(...))`` picks under top-p, without ranking the vocabulary,
    or None when the reference must decide. ``scores``: steps 0-3 (``_scores_before_top_p``).

    Why it is the same token: the answer is the best noisy score among the nucleus, so take the
    best noisy score among all tokens (noise drawn as ``_contender_noise`` draws it: the same value
    for every token that can win) and ask whether it is in the nucleus; if not, the next best, and
    so on. A token of rank ``r`` is in it exactly when the sum of the ``r`` larger weights is below
    ``p`` times the sum of all weights (step 4's prefix rule), and both sums can be taken in any
    order: they differ from the docstring's left-to-right sums by far less than ``_NUCLEUS_SLACK``,
    and a comparison closer than that goes to the reference. The best token is always in the
    nucleus and beats every token that cannot win, so the chain ends there at the latest.
    This saves the ~2-3 ms a token of sorting the vocabulary (top-p's running sums need ranks)."""
    best = float(np.max(scores))
    weights = np.exp(scores - best)  # -inf (masked, dropped by top-k) -> 0
    line = params.top_p * float(np.sum(weights))
    noisy = scores + _contender_noise(scores, params.seed, request_hash, step, ())
    for _ in range(_NUCLEUS_CANDIDATES):
        token = int(np.argmax(noisy))
        score = scores[token]
        ranked_before = float(np.sum(weights, where=scores > score))
        ranked_before += float(np.sum(weights[:token], where=scores[:token] == score))  # ties: lower ids first
        if ranked_before < line * (1 - _NUCLEUS_SLACK):
            return token
        if ranked_before <= line * (1 + _NUCLEUS_SLACK):
            return None  # too close to call with sums in another order
        noisy[token] = -np.inf  # outside the nucleus
    return None


def token_margin(scores: np.ndarray, token_id: int) -> float:
    """``scores[token_id] - max(scores of every other token)``: > 0 when ``token_id`` wins the
    argmax outright, < 0 when it loses (``-inf`` when it was masked), ``+inf`` for a 1-token vocab.
    An exact tie gives 0 (argmax then picks the lower id)."""
    row = np.asarray(scores, dtype=np.float64).reshape(-1)
    token_id = int(token_id)
    if not 0 <= token_id < row.size:
        raise ValueError(f"token id {token_id} outside [0, {row.size})")
    if row.size == 1:
        return float("inf")
    best_other = max(
        float(row[:token_id].max()) if token_id > 0 else -np.inf,
        float(row[token_id + 1 :].max()) if token_id + 1 < row.size else -np.inf,
    )
    return float(row[token_id] - best_other)


def log_normalizer(logits: np.ndarray) -> float:
    """logsumexp of a row of raw logits: float32 exponentials (4x cheaper than float64 over the
    whole vocabulary) summed in float64, about the float32 maximum. A logprob is a logit minus
    this; node and verifier compute it alike, and honest backends differ in it as in the logits."""
    row = np.asarray(logits, dtype=np.float32).reshape(-1)
    peak = row.max()
    return float(peak) + float(np.log(np.sum(np.exp(row - peak), dtype=np.float64)))


__all__ = [
    "NOISE_DOMAIN",
    "SamplingParams",
    "decision_scores",
    "gumbel_noise",
    "log_normalizer",
    "process_logits",
    "sample_token",
    "token_margin",
]

"""The finish rules: when an answer may end, and what text it shows (DESIGN.md, "Verification").

A node stops at the first stop it meets, and only there:

- ``stop``: the last output token is a stop token (the model's end-of-sequence ids, which the
  tokenizer fingerprint puts under ``model_id``, or a requested ``stop_token_ids`` entry), or the
  decoded output ends where a requested stop string completes;
- ``length``: exactly ``max_tokens`` output tokens, with no stop token or stop string in them;
- in every case no stop token sits before the last position and no stop string completes
  before the last token (the node must have stopped there).

A truncated answer re-signed as complete, or an answer cut short by a node that wanted to spend
less, fails these rules from the signed evidence alone: no model work, only the tokenizer.

The text a client sees follows from the same rules (``visible_text``): the output decoded
without its final stop token, cut before the first stop string. ``StopChecker`` applies them to
text as it streams, so a node stops (and shows) exactly where the rules say it must.
"""

from __future__ import annotations

from typing import Callable, Sequence

from verify.sampling import SamplingParams

Decode = Callable[[Sequence[int]], str]  # token ids -> text, special tokens skipped


def stop_ids(params: SamplingParams, eos_token_ids: Sequence[int]) -> frozenset[int]:
    return frozenset(int(i) for i in (*eos_token_ids, *params.stop_token_ids))


def _first_stop_string(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def finish_failures(output_ids: Sequence[int], params: SamplingParams, finish_reason: str,
                    eos_token_ids: Sequence[int], decode: Decode) -> list[tuple[int, str]]:
    """``(position, why)`` for every broken finish rule; empty when the finish is honest."""
    ids = list(output_ids)
    n, last = len(ids), len(ids) - 1
    stops = stop_ids(params, eos_token_ids)
    failures: list[tuple[int, str]] = []
    if n > params.max_tokens:
        failures.append((params.max_tokens, f"{n} output tokens for max_tokens {params.max_tokens}"))
    early = next((t for t in range(last) if ids[t] in stops), None)
    if early is not None:
        failures.append((early, "a stop token before the last position: generation had to end there"))
    if params.stop and _first_stop_string(decode(ids[:last]), params.stop) is not None:
        failures.append((last, "a stop string completes before the last token: generation had to end there"))
    ends_on_string = bool(params.stop) and _first_stop_string(decode(ids), params.stop) is not None
    if finish_reason == "stop":
        if ids[last] not in stops and not ends_on_string:
            failures.append((last, "finish 'stop' without a stop token or a stop string at the end"))
    elif finish_reason == "length":
        if n != params.max_tokens:
            failures.append((last, f"finish 'length' after {n} tokens, max_tokens is {params.max_tokens}"))
        if ids[last] in stops or ends_on_string:
            failures.append((last, "finish 'length' where a stop ends the answer"))
    else:
        failures.append((last, f"unknown finish reason {finish_reason!r}"))
    return failures


def visible_text(output_ids: Sequence[int], params: SamplingParams, eos_token_ids: Sequence[int], decode: Decode) -> str:
    """The text a client receives for these output ids: the final stop token is not shown and
    nothing from the first stop string on is returned (OpenAI's semantics)."""
    ids = list(output_ids)
    if ids and ids[-1] in stop_ids(params, eos_token_ids):
        ids = ids[:-1]
    text = decode(ids)
    cut = _first_stop_string(text, params.stop) if params.stop else None
    return text if cut is None else text[:cut]


class StopChecker:
    """Stop strings and stop token ids, applied to text as it streams (OpenAI semantics: the stop
    string and anything after it are not returned)."""

    def __init__(self, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = ()):
        self.stop: tuple[str, ...] = tuple(s for s in stop if s)
        self.stop_token_ids: frozenset[int] = frozenset(int(i) for i in stop_token_ids)
        self._held = ""
        self.stopped = False

    def check_token(self, token_id: int) -> bool:
        """Whether ``token_id`` is a stop token (the caller ends generation and shows no text for it)."""
        return int(token_id) in self.stop_token_ids

    def feed_text(self, new_text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string completed.

        The longest suffix that is a proper prefix of some stop string is held back until later
        text decides it. When a stop string completes, the text before its earliest occurrence is
        returned and everything from there on is dropped; later calls return ``("", True)``.
        """
        if self.stopped:
            return "", True
        text = self._held + new_text
        if not self.stop:
            self._held = ""
            return text, False
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return text[: min(hits)], True
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """The held-back text, at the end of generation (empty after a stop string)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


__all__ = ["Decode", "StopChecker", "finish_failures", "stop_ids", "visible_text"]

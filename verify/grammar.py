"""Grammars inside the verified draw: JSON mode, JSON schemas, tool calls and Lark grammars.

Why here: a constrained answer can be re-checked only if the verifier rebuilds, at every output
position, the exact set of tokens the grammar allowed. That set is a deterministic function of
the grammar, the vocabulary and the tokens generated so far, so it joins the seeded draw
(``verify.sampling``, step 0: forbidden tokens get ``-inf``). The grammar's canonical text is a
sampling parameter, so it is hashed into ``request_hash`` and committed by the receipt; a token
outside the mask can then never win the draw, and claiming one is fraud.

Token masks come from llguidance (Microsoft's Rust grammar engine: JSON schema, Lark and regex
to token masks in tens of microseconds, no torch). It is pinned to one version: a verifier must
compute the same masks as the node, and the engine's name and version are part of every
canonical grammar, so an answer made under another version names it instead of failing as
fraud.

Canonical grammar text: ``{"engine": ENGINE, "grammar": G}`` as compact JSON (keys in the
request's order, which is the order a schema's properties are generated in), where ``G`` is the
llguidance top-level grammar: ``{"grammars": [{"json_schema": S}]}`` with ``S`` the client's
schema plus ``"x-guidance": {"whitespace_flexible": false}`` (compact JSON: a small model cannot
loop on whitespace), or ``{"grammars": [{"lark_grammar": L}]}``.

Mask rule (both sides): the tokens llguidance allows in the current state; when it allows none,
or the matcher broke, only the end-of-sequence tokens. The end-of-sequence tokens are allowed
exactly where the grammar accepts.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Mapping, Sequence

import llguidance
import numpy as np

from verify.errors import VerifyError
from verify.sampling import MAX_GRAMMAR_BYTES

ENGINE = f"llguidance/{llguidance.__version__}"
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(VerifyError, ValueError):
    """A grammar or schema this engine cannot compile (the message says which feature)."""


def _canonical(grammar: Mapping[str, Any]) -> str:
    # Keys keep the request's order (JSON schema property order is the order fields are
    # generated in); node and verifier both parse the same request body, so they agree.
    return _compiled(json.dumps({"engine": ENGINE, "grammar": grammar}, separators=(",", ":"), ensure_ascii=False,
                                allow_nan=False))


@lru_cache(maxsize=64)
def _compiled(text: str) -> str:
    """``text`` once the engine has compiled it (raises ``GrammarError`` with what it could not
    do). Remembered: every choice of a request, and the binding check of each, asks again."""
    if len(text.encode("utf-8")) > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the grammar is larger than {MAX_GRAMMAR_BYTES} bytes")
    problems = _compile_problems(text)
    if problems:
        raise GrammarError(problems)
    return text


def json_schema_grammar(schema: Mapping[str, Any]) -> str:
    """Canonical grammar text for JSON documents valid against ``schema`` (``{"type": "object"}``
    is JSON mode). Raises ``GrammarError`` for a schema feature the engine does not implement."""
    if not isinstance(schema, Mapping):
        raise GrammarError("a JSON schema must be an object")
    return _canonical({"grammars": [{"json_schema": {**schema, "x-guidance": _JSON_OPTIONS}}]})


def lark_grammar(lark: str) -> str:
    """Canonical grammar text for a Lark grammar (llguidance's dialect: ``start`` rule, regex
    terminals, ``%json {schema}`` for an embedded JSON schema)."""
    if not isinstance(lark, str) or not lark.strip():
        raise GrammarError("a grammar must be non-empty Lark text")
    return _canonical({"grammars": [{"lark_grammar": lark}]})


def _document(text: str) -> dict[str, Any]:
    """Canonical grammar text parsed: ``{"engine": ..., "grammar": ...}`` (else ``GrammarError``)."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise GrammarError(f"grammar text is not JSON: {exc}") from None
    if not isinstance(doc, dict) or set(doc) != {"engine", "grammar"}:
        raise GrammarError("grammar text must be an object with exactly 'engine' and 'grammar'")
    return doc


def _engine_grammar(text: str) -> str:
    """The llguidance grammar inside canonical grammar text (raises ``GrammarError`` if the
    text names another engine or is not canonical grammar text at all)."""
    doc = _document(text)
    if doc["engine"] != ENGINE:
        raise GrammarError(f"the grammar was made for {doc['engine']!r}; this verifier runs {ENGINE!r}")
    return json.dumps(doc["grammar"])


def foreign_engine(text: str) -> str | None:
    """The engine named by grammar text when it is not this one (None: ours, or not grammar
    text at all, which ``grammar_problems`` reports). An answer under a foreign engine cannot be
    judged here, which is not the node's fault."""
    try:
        engine = _document(text)["engine"]
    except GrammarError:
        return None
    return None if engine == ENGINE else str(engine)


def _compile_problems(text: str) -> str:
    """Empty when the engine compiles ``text``; else what it could not do."""
    # Warnings count too: they name features the engine would otherwise ignore (an unknown
    # "format", an unimplemented keyword), and the answer could then break the client's schema.
    _, messages = llguidance.LLMatcher.validate_grammar_with_warnings(_engine_grammar(text))
    return "; ".join(messages)


def grammar_problems(text: str) -> list[str]:
    """Why signed grammar text cannot be used (empty: it compiles here)."""
    try:
        _compiled(text)
    except GrammarError as exc:
        return [str(exc)]
    return []


class GrammarVocabulary:
    """A model's vocabulary as the grammar engine sees it (token byte strings, EOS ids), built
    once per tokenizer: about 0.2 s for a 49k vocabulary."""

    def __init__(self, tokenizer_json: str, eos_token_ids: Sequence[int], vocab_size: int) -> None:
        if not eos_token_ids:
            raise GrammarError("the model defines no end-of-sequence token: a grammar could never finish")
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=self.vocab_size, eos_token=list(self.eos_token_ids))
        self._eos_only = np.zeros(self.vocab_size, dtype=bool)
        self._eos_only[list(self.eos_token_ids)] = True

    def state(self, grammar_text: str) -> "GrammarState":
        return GrammarState(grammar_text, self)


class GrammarState:
    """Where one answer stands in its grammar: the mask of the next token, then ``advance``."""

    def __init__(self, grammar_text: str, vocabulary: GrammarVocabulary) -> None:
        self.vocabulary = vocabulary
        self._matcher = llguidance.LLMatcher(vocabulary.tokenizer, _engine_grammar(grammar_text), log_level=0)
        if self._matcher.is_error():
            raise GrammarError(self._matcher.get_error())

    def allowed(self) -> np.ndarray:
        """Boolean mask over the vocabulary: the tokens that keep the output in the grammar (see
        the module docstring for the rule when there are none)."""
        size = self.vocabulary.vocab_size
        if self._matcher.is_error():
            return self.vocabulary._eos_only.copy()
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little", count=size).astype(bool)
        return mask if mask.any() else self.vocabulary._eos_only.copy()

    def advance(self, token_id: int) -> bool:
        """Consume the drawn token; False when the grammar did not allow it (the state is then
        broken and only end-of-sequence is allowed from here)."""
        if int(token_id) in self.vocabulary.eos_token_ids:
            return True  # the answer ends here; EOS was in the mask only where the grammar accepts
        return bool(self._matcher.consume_token(int(token_id)))


__all__ = ["ENGINE", "MAX_GRAMMAR_BYTES", "GrammarError", "GrammarState", "GrammarVocabulary", "foreign_engine",
           "grammar_problems", "json_schema_grammar", "lark_grammar"]

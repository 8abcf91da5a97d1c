"""Grammars in the seeded draw (verify/grammar.py, verify/structured.py, the mask step of
verify/sampling.py), without a model: random logits stand in for one, so any token the grammar
allows can come up, and the property must hold for every draw."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from tests.models_fixtures import DEFAULT_VOCAB, tiny_tokenizer_json
from verify.grammar import ENGINE, GrammarError, GrammarVocabulary, foreign_engine, grammar_problems, json_schema_grammar, lark_grammar
from verify.sampling import SamplingParams, decision_scores, sample_token
from verify.structured import read_tool_calls, request_grammar

EOS = 0  # tiny_tokenizer_json's <|endoftext|>
MAX_STEPS = 400


@pytest.fixture(scope="module")
def vocab() -> GrammarVocabulary:
    return GrammarVocabulary(tiny_tokenizer_json(), [EOS], DEFAULT_VOCAB)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_str(tiny_tokenizer_json())


def draw(vocab: GrammarVocabulary, tokenizer: Tokenizer, grammar: str, seed: int, temperature: float = 1.0) -> tuple[str, bool]:
    """Sample from random logits under ``grammar`` until EOS: the text, and whether EOS came."""
    rng = np.random.default_rng(seed)
    params = SamplingParams(seed=seed, temperature=temperature, grammar=grammar)
    state, out = vocab.state(grammar), []
    for step in range(MAX_STEPS):
        logits = rng.normal(0, 3, DEFAULT_VOCAB).astype(np.float32)
        allowed = state.allowed()
        token = sample_token(logits, params, b"\x01" * 32, step, out, allowed)
        assert allowed[token], "the draw picked a token outside the mask"
        assert state.advance(token)
        if token == EOS:
            return tokenizer.decode(out), True
        out.append(token)
    return tokenizer.decode(out), False


# Schemas whose every instance is short (bounded strings, ranges, enums, arrays), so that any
# draw ends well within MAX_STEPS: the supported subset that a property test can cover.
leaf = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span}, st.integers(-50, 50), st.integers(0, 500)),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.builds(lambda p: {"type": "string", "pattern": p}, st.sampled_from(["^[a-z]{1,4}$", "^[0-9]{2}-[A-Z]$", "^(yes|no)$"])),
    st.builds(lambda xs: {"enum": xs}, st.lists(st.one_of(st.integers(-9, 9), st.sampled_from(["a", "bc", "Paris"]), st.booleans()),
                                                min_size=1, max_size=4, unique=True)),
    st.builds(lambda c: {"const": c}, st.sampled_from(["x", 3, True])),
)
names = st.text(alphabet="abcdefgh_", min_size=1, max_size=6)


def objects(children):
    return st.builds(
        lambda props, required_flags: {  # closed: open objects take keys of any length
            "type": "object",
            "properties": props,
            "required": [k for k, r in zip(props, required_flags) if r],
            "additionalProperties": False,
        },
        st.dictionaries(names, children, min_size=1, max_size=3),
        st.lists(st.booleans(), min_size=3, max_size=3),
    )


schemas = st.recursive(
    leaf,
    lambda children: st.one_of(
        objects(children),
        st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, children, st.integers(0, 3)),
        st.builds(lambda a, b: {"anyOf": [a, b]}, children, children),
    ),
    max_leaves=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=schemas, seed=st.integers(0, 2**32))
def test_every_draw_under_a_schema_parses_and_validates(vocab, tokenizer, schema, seed):
    text, ended = draw(vocab, tokenizer, json_schema_grammar(schema), seed)
    assert ended, f"no end of sequence after {MAX_STEPS} tokens: {text[:80]!r}"
    jsonschema.validate(json.loads(text), schema)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_json_mode_and_a_lark_grammar_hold_for_every_draw(vocab, tokenizer, seed):
    text, ended = draw(vocab, tokenizer, lark_grammar("start: /[a-c]{2,5}/ \"!\""), seed, temperature=1.5)
    assert ended and 3 <= len(text) <= 6 and set(text[:-1]) <= set("abc") and text.endswith("!")
    text, ended = draw(vocab, tokenizer, request_grammar({"response_format": {"type": "json_object"}}), seed)
    assert not ended or isinstance(json.loads(text), dict)  # JSON mode has no length bound: it may run on


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_a_forced_tool_call_reads_back_as_a_call_with_valid_arguments(vocab, tokenizer, seed):
    functions = [{"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}},
        {"name": "noop", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}]
    body = {"tools": [{"type": "function", "function": f} for f in functions], "tool_choice": "required"}
    text, ended = draw(vocab, tokenizer, request_grammar(body), seed)
    calls = read_tool_calls(text, functions)
    assert ended and calls is not None and len(calls) == 1, text
    if calls[0].name == "get_weather":
        jsonschema.validate(calls[0].arguments, functions[0]["parameters"])
    named = {**body, "tool_choice": {"type": "function", "function": {"name": "noop"}}}
    text, ended = draw(vocab, tokenizer, request_grammar(named), seed)
    assert [c.name for c in read_tool_calls(text, functions) or []] == ["noop"] or not ended


@pytest.mark.parametrize("schema, feature", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "object", "if": {}, "then": {}}, "if"),
    ({"type": "string", "format": "made-up"}, "made-up"),
    ({"$ref": "https://example.org/schema.json"}, "example.org"),
    ({"type": "quaternion"}, "quaternion"),
])
def test_an_unsupported_schema_feature_is_refused_by_name(schema, feature):
    with pytest.raises(GrammarError, match=feature):
        json_schema_grammar(schema)


def test_tool_choice_must_name_a_listed_tool():
    body = {"tools": [{"type": "function", "function": {"name": "a"}}], "tool_choice": {"type": "function", "function": {"name": "b"}}}
    with pytest.raises(GrammarError, match="'b'"):
        request_grammar(body)
    assert request_grammar({**body, "tool_choice": "auto"}) is None  # the model decides: no grammar
    assert request_grammar({**body, "tool_choice": "none"}) is None


def test_the_grammar_is_hashed_and_names_its_engine():
    g = json_schema_grammar({"type": "object"})
    assert json.loads(g)["engine"] == ENGINE and foreign_engine(g) is None and grammar_problems(g) == []
    with_grammar = SamplingParams(seed=1, grammar=g).to_canonical_dict()
    assert with_grammar["grammar"] == g and "grammar" not in SamplingParams(seed=1).to_canonical_dict()
    other = json.dumps({"engine": "llguidance/0.0.1", "grammar": json.loads(g)["grammar"]})
    assert foreign_engine(other) == "llguidance/0.0.1" and grammar_problems(other)
    assert grammar_problems("not json") and grammar_problems('{"engine": "%s", "grammar": {"grammars": 5}}' % ENGINE)


def test_the_mask_makes_forbidden_tokens_unwinnable_and_an_empty_mask_allows_only_eos(vocab):
    g = lark_grammar('start: "ab"')
    state = vocab.state(g)
    allowed = state.allowed()
    logits = np.zeros(DEFAULT_VOCAB, dtype=np.float32)
    forbidden = int(np.flatnonzero(~allowed)[1])  # [0] is EOS: "ab" is not yet complete
    logits[forbidden] = 1e6  # the model's overwhelming favourite is outside the grammar
    params = SamplingParams(seed=3, temperature=1.0, grammar=g)
    scores = decision_scores(logits, params, b"\x00" * 32, 0, [], (forbidden,), allowed)
    assert scores[forbidden] == -np.inf and allowed[int(np.argmax(scores))]
    assert not state.advance(forbidden)  # a broken state: from here on only end of sequence
    assert np.flatnonzero(state.allowed()).tolist() == [EOS]

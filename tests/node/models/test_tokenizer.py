"""``node.models.tokenizer`` on the tiny byte-level BPE of ``tests/models_fixtures.py``: the rules
that decide which ids a prompt becomes (they are hashed into ``model_id``), chat rendering with
and without a template that knows tools, streaming decode of characters split over tokens, the
sources a tokenizer is read from and every input it refuses.

Expected texts and ids are written out here or follow from the rule under test (BOS first, one
id per special token, whole characters only); none is copied from a run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from node.errors import ConfigError, ModelLoadError, NoChatTemplateError, RequestError
from node.models.tokenizer import REPLACEMENT_CHAR, TextTokenizer, build_byte_level_bpe
from tests.models_fixtures import BOS_ID, CHATML_TEMPLATE, EOS_ID, SPECIAL_TOKENS, gguf_vocab, tiny_tokenizer_json
from verify.structured import tool_prompt

CHAT = [{"role": "user", "content": "Hi"}]
WEATHER = {"name": "get_weather", "description": "Météo", "parameters": {"type": "object"}, "strict": None}


def tiny(*, add_bos: bool = False, template: str | None = CHATML_TEMPLATE, eos: tuple[int, ...] = (EOS_ID,)) -> TextTokenizer:
    return TextTokenizer(Tokenizer.from_str(tiny_tokenizer_json()), bos_token_id=BOS_ID, eos_token_ids=eos, add_bos=add_bos,
                         chat_template=template)


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return tiny()


# ---------------------------------------------------------------------- encoding and decoding


def test_every_text_round_trips(tok):
    """Byte-level BPE: any text, whatever its script, encodes and decodes back to itself."""
    rng = random.Random(7)
    pool = "abc XYZ\n\t0123456789éüñ日本語😀€\u2581,.!?"
    texts = ["", " ", "Hello, world!", "The capital of France is Paris.", "  two  spaces  ", "tab\tand\nnewline",
             "Café naïve 日本語 😀 €100"] + ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(200)]
    for text in texts:
        assert tok.decode(tok.encode_prompt(text)) == text, text


def test_bos_is_added_to_raw_prompts_only_when_the_model_says_so():
    with_bos, without = tiny(add_bos=True), tiny()
    assert with_bos.encode_prompt("Hi") == [BOS_ID, *without.encode_prompt("Hi")]
    assert with_bos.encode_prompt("") == [BOS_ID]
    # A chat is never given a BOS of the encoder's: the template writes every special token.
    assert with_bos.encode_chat(CHAT) == without.encode_chat(CHAT)
    assert with_bos.encode_chat(CHAT)[0] == SPECIAL_TOKENS.index("<|im_start|>")


def test_special_tokens_written_as_text_are_their_one_id(tok):
    ids = tok.encode_prompt("a<|im_start|>b<|im_end|>")
    assert ids == [*tok.encode_prompt("a"), BOS_ID, *tok.encode_prompt("b"), EOS_ID]
    assert tok.decode(ids) == "ab"  # skipped by default
    assert tok.decode(ids, skip_special_tokens=False) == "a<|im_start|>b<|im_end|>"
    assert tok.token_text(EOS_ID) == "<|im_end|>" and tok.token_text(None) == ""


def test_eos_ids_are_ordered_and_deduplicated():
    assert tiny(eos=(EOS_ID, 0, EOS_ID)).eos_token_ids == (EOS_ID, 0)


def test_a_character_split_over_tokens_is_streamed_whole(tok):
    ids = tok.encode_prompt("a€b")
    euro = tok.encode_prompt("€")
    assert len(euro) > 1, "the test needs a character the tiny vocabulary spells in several tokens"
    assert REPLACEMENT_CHAR in tok.decode(euro[:1])  # one token of it is no character
    decoder = tok.incremental_decoder()
    pieces = [decoder.push(i) for i in ids]
    assert pieces == ["a", *[""] * (len(euro) - 1), "€", "b"] and decoder.flush() == ""
    cut = tok.incremental_decoder()
    assert "".join(cut.push(i) for i in tok.encode_prompt("a€")[:-1]) == "a"
    assert REPLACEMENT_CHAR in cut.flush()  # the end of an answer: what is held back comes out as it decodes


def test_streamed_text_joins_to_the_whole_decode(tok):
    rng = random.Random(3)
    for _ in range(50):
        text = "".join(rng.choice("ab €😀日\n") for _ in range(rng.randint(1, 20)))
        decoder = tok.incremental_decoder()
        assert "".join(decoder.push(i) for i in tok.encode_prompt(text)) + decoder.flush() == text


# ---------------------------------------------------------------------- chat templates


def test_the_chat_template_renders_as_transformers_does(tok):
    assert tok.render_chat(CHAT) == ("<|im_start|>system\nYou are a tiny test model.<|im_end|>\n"
                                     "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.render_chat(CHAT, add_generation_prompt=False).endswith("Hi<|im_end|>\n")
    assert tok.encode_chat(CHAT) == tok.tokenizer.encode(tok.render_chat(CHAT), add_special_tokens=False).ids


def test_tools_for_a_template_that_does_not_know_them_are_a_system_message(tok):
    assert not tok.template_knows_tools
    rendered = tok.render_chat(CHAT, [WEATHER])
    assert rendered.startswith(f"<|im_start|>system\n{tool_prompt([WEATHER])}<|im_end|>\n<|im_start|>user\nHi")
    assert '"description": "Météo"' in rendered and "strict" not in rendered  # described: nulls left out, text kept
    system = [{"role": "system", "content": "Be brief."}, *CHAT]
    assert tok.render_chat(system, [WEATHER]).startswith(f"<|im_start|>system\nBe brief.\n\n{tool_prompt([WEATHER])}<|im_end|>")


def test_a_template_that_knows_tools_gets_them_as_tools():
    knows = tiny(template="{% for t in tools %}{{ t.type }}:{{ t.function | tojson }};{% endfor %}"
                          "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert knows.template_knows_tools
    assert knows.render_chat(CHAT, [WEATHER]) == ('function:{"name": "get_weather", "description": "Météo", '
                                                  '"parameters": {"type": "object"}};Hi')
    assert knows.render_chat(CHAT) == "Hi"  # no tools: the variable is not set at all


def test_template_helpers_and_whitespace_control():
    helpers = tiny(template="{% for m in messages %}\n  {% if loop.index > 1 %}{% break %}{% endif %}\n{{ m.content }}"
                            "{% endfor %}|{{ strftime_now('%Y') | length }}|{{ bos_token }}")
    assert helpers.render_chat([*CHAT, {"role": "user", "content": "never"}]) == "Hi|4|<|im_start|>"


# ---------------------------------------------------------------------- refused inputs


def test_a_model_without_a_chat_template_refuses_chats():
    with pytest.raises(NoChatTemplateError, match="no chat template"):
        tiny(template=None).encode_chat(CHAT)


def test_a_template_that_rejects_the_messages_is_a_request_error():
    strict = tiny(template="{% if messages[0].role != 'system' %}{{ raise_exception('system first') }}{% endif %}")
    with pytest.raises(RequestError, match="system first"):
        strict.render_chat(CHAT)


def test_a_template_that_does_not_parse_is_a_config_error():
    with pytest.raises(ConfigError, match="does not parse"):
        tiny(template="{% for m in messages %}").render_chat(CHAT)


@pytest.mark.parametrize("kwargs, match", [
    ({"bos_token_id": None, "add_bos": True}, "defines no BOS"),
    ({"bos_token_id": 10_000}, "outside the vocabulary"),
    ({"eos_token_ids": [320]}, "outside the vocabulary"),
])
def test_special_ids_must_exist(kwargs, match):
    args = {"bos_token_id": BOS_ID, "eos_token_ids": [EOS_ID], "add_bos": False, "chat_template": None, **kwargs}
    with pytest.raises(ConfigError, match=match):
        TextTokenizer(Tokenizer.from_str(tiny_tokenizer_json()), **args)


# ---------------------------------------------------------------------- sources


def _folder(tmp_path: Path, tok_cfg: dict | None = None, **files: str) -> Path:
    (tmp_path / "tokenizer.json").write_text(tiny_tokenizer_json())
    if tok_cfg is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_a_hugging_face_folder_s_rules(tmp_path):
    folder = _folder(tmp_path, {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>", "add_bos_token": True,
                                "chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "d"}]},
                     **{"generation_config.json": json.dumps({"eos_token_id": [EOS_ID, 0]})})
    tok = TextTokenizer.from_hf_folder(folder, {"eos_token_id": 0})
    assert (tok.bos_token_id, tok.eos_token_ids, tok.add_bos, tok.chat_template) == (BOS_ID, (EOS_ID, 0), True, "d")
    assert tok.encode_prompt("a")[0] == BOS_ID


def test_without_add_bos_token_the_post_processor_decides(tmp_path):
    """The tiny tokenizer.json has no post-processor: it adds nothing, so neither does the node."""
    tok = TextTokenizer.from_hf_folder(_folder(tmp_path, {"bos_token": "<|im_start|>"}))
    assert not tok.add_bos and tok.chat_template is None
    assert TextTokenizer.from_hf_folder(tmp_path, {"bos_token_id": BOS_ID}).bos_token_id == BOS_ID


def test_folders_that_cannot_be_read_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="missing tokenizer"):
        TextTokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot parse"):
        TextTokenizer.from_hf_folder(tmp_path)
    _folder(tmp_path, {"bos_token": "<|nowhere|>"})
    with pytest.raises(ConfigError, match="not in the vocabulary"):
        TextTokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="cannot read"):
        TextTokenizer.from_hf_folder(tmp_path)


def _gguf_meta(**changes) -> dict:
    tokens, merges, types = gguf_vocab()
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": BOS_ID, "tokenizer.ggml.eos_token_id": EOS_ID}
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


def test_a_gguf_vocabulary_encodes_as_its_tokenizer_json(tok):
    """llama.cpp's default for a vocabulary without the key is to add BOS."""
    gguf = TextTokenizer.from_gguf_metadata(_gguf_meta())
    assert gguf.add_bos and gguf.encode_prompt("Café <|im_end|>") == [BOS_ID, *tok.encode_prompt("Café <|im_end|>")]
    assert not TextTokenizer.from_gguf_metadata(_gguf_meta(**{"tokenizer.ggml.add_bos_token": False})).add_bos


@pytest.mark.parametrize("changes, match", [
    ({"tokenizer.ggml.model": None}, "no tokenizer.ggml.model"),
    ({"tokenizer.ggml.model": "bert"}, "is not supported"),
    ({"tokenizer.ggml.tokens": []}, "lacks tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.token_type": [1]}, "differ in length"),
    ({"tokenizer.ggml.merges": None}, "lacks tokenizer.ggml.merges"),
    ({"tokenizer.ggml.model": "llama"}, "lacks tokenizer.ggml.scores"),
])
def test_gguf_metadata_that_cannot_make_a_tokenizer_is_refused(changes, match):
    with pytest.raises(ModelLoadError, match=match):
        TextTokenizer.from_gguf_metadata(_gguf_meta(**changes))


def test_a_byte_level_vocabulary_must_be_well_formed():
    tokens, merges, types = gguf_vocab()
    with pytest.raises(ModelLoadError, match="malformed GGUF merge"):
        build_byte_level_bpe(tokens, ["nospace", *merges], types)
    with pytest.raises(ModelLoadError, match="duplicate tokens"):
        build_byte_level_bpe([*tokens[:-1], tokens[0]], merges, types)


def test_the_fingerprint_covers_every_rule_that_makes_ids():
    base = tiny().fingerprint()
    assert tiny().fingerprint() == base
    assert len({base, tiny(add_bos=True).fingerprint(), tiny(template=None).fingerprint(),
                tiny(eos=(EOS_ID, 0)).fingerprint()}) == 4

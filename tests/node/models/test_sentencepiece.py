"""SentencePiece-style (``tokenizer.ggml.model = llama``) GGUF vocabularies.

Two kinds of evidence: Gemma 3's real vocabulary (262,144 pieces, from a ~1 MB fixture of the
pulled GGUF's ``tokenizer.*`` metadata) must give, text for text, the ids ``transformers``' own
conversion of that file gave (recorded by ``bench/tokenizer_crosscheck.py``), and decode back to
the text; a tiny hand-made vocabulary pins each rule on its own (merge rank by position, byte
fallback, unknown bytes, the dummy prefix, added tokens, the refusal of a file out of merge order),
with ids worked out by hand.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import gguf
import pytest

from node.errors import ModelLoadError
from node.models.llama.gguf_loader import read_metadata
from node.models.tokenizer import TextTokenizer

DATA = Path(__file__).resolve().parents[2] / "data"
CASES = json.loads((DATA / "gemma3_270m_token_ids.json").read_text(encoding="utf-8"))["cases"]


@pytest.fixture(scope="module")
def gemma() -> TextTokenizer:
    meta = json.loads(lzma.decompress((DATA / "gemma3_270m_tokenizer.json.xz").read_bytes()))
    return TextTokenizer.from_gguf_metadata(meta, source="gemma-3-270m fixture")


def test_gemma_ids_are_transformers_ids(gemma):
    differ = [(c["text"], c["ids"], ids) for c in CASES if (ids := gemma.tokenizer.encode(c["text"], add_special_tokens=False).ids) != c["ids"]]
    assert not differ, differ[:3]
    assert len(CASES) >= 50 and sum(map(len, (c["ids"] for c in CASES))) > 300


def test_gemma_decodes_back_to_the_text_and_streams_whole_characters(gemma):
    for case in CASES:
        # A literal U+2581 in the text is SentencePiece's space: it comes back as one (so in transformers).
        assert gemma.decode(case["ids"], skip_special_tokens=False) == case["text"].replace("▁", " ")
    rare = "𠀀𪚥 rare"  # byte fallback: each character is four <0xNN> pieces
    ids = gemma.encode_prompt(rare)
    assert len(ids) > len(rare)
    decoder = gemma.incremental_decoder()
    chunks = [decoder.push(i) for i in ids]
    assert "".join(chunks) + decoder.flush() == rare and "\ufffd" not in "".join(chunks)


def test_gemma_rules(gemma):
    assert gemma.vocab_size == 262144 and gemma.bos_token_id == 2 and gemma.eos_token_ids == (1,)
    assert gemma.chat_template is None  # a base model
    assert gemma.encode_prompt("Hello world") == [2, 9259, 1902]  # add_bos_token, no dummy prefix
    assert gemma.decode([2, 105, 9259, 106, 1]) == "Hello"  # control tokens skipped


# ---------------------------------------------------------------------- a vocabulary small enough to reason about

CONTROL, USER, BYTE, NORMAL = 3, 4, 6, 1
PIECES = [  # (piece, type), in the file's order: for normal pieces that order is the merge rank
    ("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", CONTROL), ("<start_of_turn>", CONTROL),
    ("<0xC3>", BYTE), ("<0xA9>", BYTE), ("<0x0A>", BYTE), ("  ", USER), ("<b>", USER),
    ("▁", NORMAL), ("a", NORMAL), ("b", NORMAL), ("c", NORMAL), ("h", NORMAL), ("i", NORMAL),
    ("bc", NORMAL), ("ab", NORMAL), ("▁a", NORMAL), ("hi", NORMAL), ("▁hi", NORMAL),
]
ID = {p: i for i, (p, _) in enumerate(PIECES)}


def spm_meta(*, prefix: bool = False, scores: list[float] | None = None) -> dict:
    """Metadata as llama.cpp writes it: scores fall along the normal pieces, -1000 / 0 elsewhere."""
    default = [-float(i) if t == NORMAL else (0.0 if t == BYTE else -1000.0) for i, (_, t) in enumerate(PIECES)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [p for p, _ in PIECES],
            "tokenizer.ggml.scores": scores or default, "tokenizer.ggml.token_type": [t for _, t in PIECES],
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 3,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_space_prefix": prefix}


@pytest.mark.parametrize("text, pieces", [
    ("abc", ["a", "bc"]),  # b+c (rank 16) merges before a+b (rank 17), though "ab" could form first by length
    ("ab", ["ab"]),
    ("cab", ["c", "ab"]),
    (" a", ["▁a"]),  # spaces are U+2581, no dummy prefix
    ("a hi", ["a", "▁hi"]),
    ("  hi", ["  ", "hi"]),  # the user-defined run of spaces, respelled "▁▁", wins by its rank (8)
    ("é", ["<0xC3>", "<0xA9>"]),  # no piece: its UTF-8 bytes
    ("\n", ["<0x0A>"]),
    ("ñ", ["<unk>"]),  # 0xC3 0xB1: a byte with no piece makes the character unknown
    ("<start_of_turn>hi<b>a", ["<start_of_turn>", "hi", "<b>", "a"]),  # added tokens matched whole in the text
])
def test_tiny_vocab_pieces(text, pieces):
    tok = TextTokenizer.from_gguf_metadata(spm_meta())
    ids = tok.tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == [ID[p] for p in pieces]
    if "ñ" not in text:
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode_prompt(text) == [2, *ids]


def test_tiny_vocab_dummy_prefix():
    tok = TextTokenizer.from_gguf_metadata(spm_meta(prefix=True))
    assert tok.encode_prompt("hi") == [2, ID["▁hi"]]
    assert tok.tokenizer.encode("a hi", add_special_tokens=False).ids == [ID["▁a"], ID["▁hi"]]
    assert tok.decode([ID["▁a"], ID["▁hi"]]) == "a hi"  # the prefix comes off again


def test_a_vocabulary_out_of_merge_order_or_without_scores_is_refused():
    rising = spm_meta()["tokenizer.ggml.scores"]
    rising[ID["bc"]], rising[ID["ab"]] = rising[ID["ab"]], rising[ID["bc"]]
    with pytest.raises(ModelLoadError, match="not in merge order"):
        TextTokenizer.from_gguf_metadata(spm_meta(scores=rising))
    meta = spm_meta()
    del meta["tokenizer.ggml.scores"]
    with pytest.raises(ModelLoadError, match="scores"):
        TextTokenizer.from_gguf_metadata(meta)


def test_tiny_vocab_from_a_gguf_file(tmp_path):
    """Through a real file: the GGUF writer's arrays, read back as the loader reads them."""
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    meta = spm_meta()
    w.add_tokenizer_model("llama")
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_scores(meta["tokenizer.ggml.scores"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_add_space_prefix(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = TextTokenizer.from_gguf_metadata(read_metadata(path), source=str(path))
    assert tok.encode_prompt("abc é") == [2, ID["a"], ID["bc"], ID["▁"], ID["<0xC3>"], ID["<0xA9>"]]
    assert tok.add_bos  # llama.cpp's default where the file does not say

"""Text <-> token ids for a loaded model: encoding, chat templating, streaming decode, fingerprint.

One class, ``TextTokenizer``, wraps a ``tokenizers.Tokenizer`` (the Rust tokenizer of Hugging Face)
and adds the model-level rules that decide which ids a prompt becomes. Those ids go into the receipt's
``request_hash`` and the evidence, so the rules are explicit and hashed into ``model_id``
(``fingerprint()``):

* Raw completion prompts get BOS prepended iff the model says so (``add_bos``): for a GGUF file,
  ``tokenizer.ggml.add_bos_token``; for a Hugging Face folder, ``add_bos_token`` in
  ``tokenizer_config.json`` or, when that key is absent, whether ``tokenizer.json``'s post-processor
  adds BOS. Encoding itself never lets the post-processor add anything (``add_special_tokens=False``).
* Chat prompts are rendered by the model's Jinja chat template, which writes its own special tokens,
  and are encoded without adding any BOS: never a second BOS.
* Special tokens written as text (``<|im_start|>``) encode to their single id (``tokenizers`` always
  matches added tokens in the input).

Sources: a Hugging Face folder (``tokenizer.json`` plus ``tokenizer_config.json`` and/or
``chat_template.jinja``) or GGUF metadata (llama.cpp's ``tokenizer.ggml.*`` keys). For a GGUF
``gpt2`` vocabulary the byte-level BPE is rebuilt from the token list and merges: ``tokenizers`` BPE,
ByteLevel pre-tokenizer (``add_prefix_space=False``, GPT-2 regex on), ByteLevel decoder, no
normalizer, control/user-defined tokens added. On SmolLM2 this reproduces llama.cpp's ids
(DESIGN.md, Measured facts).

A GGUF ``llama`` (SentencePiece-style) vocabulary, Gemma's 262,144 pieces for one, is rebuilt as
``transformers``' GGUF loader rebuilds it (``integrations/gguf/gguf_tokenizer_mapping.py``): a
``tokenizers`` BPE with byte fallback (a character with no piece becomes its UTF-8 bytes' ``<0xNN>``
pieces; one whose byte has no piece, the unknown token), merges derived from the pieces and ranked
by their order in the file (``build_sentencepiece_bpe`` says why not by score), spaces written as
U+2581 by a normalizer, no dummy prefix where ``tokenizer.ggml.add_space_prefix`` is false (Gemma 3;
else a Metaspace pre-tokenizer prepends one to the text's first word, as llama.cpp defaults),
pieces of real spaces (Gemma's user-defined runs) respelled with U+2581, and control and
user-defined pieces added as for ``gpt2``. The decoder turns U+2581 back into spaces (so a literal
U+2581 in a text decodes as a space, as in SentencePiece) and fuses byte pieces. On Gemma 3 270M
this reproduces ``transformers``' ids on every text of ``bench/tokenizer_crosscheck.py``
(``tests/node/models/test_sentencepiece.py``).

Chat rendering follows ``transformers``' ``apply_chat_template``: a sandboxed, immutable Jinja
environment with ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson``
filter that keeps non-ASCII, and the ``raise_exception`` / ``strftime_now`` helpers.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

from node.errors import ConfigError, ModelLoadError, NoChatTemplateError, RequestError
from verify.canonical import canonical_hash
from verify.grammar import GrammarVocabulary
from verify.structured import described, with_tool_prompt

# GGUF ``tokenizer.ggml.token_type`` values (llama.cpp ``llama_token_type``).
GGUF_TOKEN_NORMAL = 1
GGUF_TOKEN_CONTROL = 3
GGUF_TOKEN_USER_DEFINED = 4

SPIECE_SPACE = "\u2581"  # SentencePiece's visible space

# Bumped whenever the meaning of the fingerprinted fields changes.
FINGERPRINT_VERSION = "proofmesh-tokenizer-v1"

REPLACEMENT_CHAR = "\ufffd"


class TextTokenizer:
    """A tokenizer plus the model's BOS/EOS rules and chat template."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Iterable[int],
        add_bos: bool,
        chat_template: str | None,
        source: str = "",
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_token_id = None if bos_token_id is None else int(bos_token_id)
        # Ordered, deduplicated: the first one is "the" EOS, every one ends generation.
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template
        self.source = source
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        if self.add_bos and self.bos_token_id is None:
            raise ConfigError("tokenizer says add_bos_token but defines no BOS token (key 'bos_token')")
        for tid in ([self.bos_token_id] if self.bos_token_id is not None else []) + list(self.eos_token_ids):
            if not 0 <= tid < self.vocab_size:
                raise ConfigError(f"special token id {tid} outside the vocabulary (size {self.vocab_size})")
        self._compiled_template = None
        self._grammar_vocabulary: GrammarVocabulary | None = None

    # ------------------------------------------------------------------ encoding

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a raw completion prompt: BOS first iff the model's ``add_bos`` rule says so."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos:
            ids = [self.bos_token_id, *ids]
        return ids

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] = (),
                    add_generation_prompt: bool = True) -> list[int]:
        """Ids of a templated chat; the template writes every special token, none is added.
        ``tools``: function definitions the model may call (``verify.structured``)."""
        text = self.render_chat(messages, tools, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    @property
    def template_knows_tools(self) -> bool:
        """Whether the chat template renders a ``tools`` list itself (else the node's documented
        tool prompt is added as a system message)."""
        return bool(self.chat_template) and re.search(r"\btools\b", self.chat_template) is not None

    def render_chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] = (),
                    add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages`` (OpenAI-style dicts with role and content)."""
        if not self.chat_template:
            # (the source path stays out: the message goes to HTTP clients, the path is the operator's)
            raise NoChatTemplateError("this model has no chat template (a base model); send it a raw prompt instead "
                                      "(/v1/completions, or proofmesh generate without --chat)")
        if self._compiled_template is None:
            self._compiled_template = _compile_template(self.chat_template)
        from jinja2 import TemplateError

        if tools and not self.template_knows_tools:
            messages, tools = with_tool_prompt(messages, tools), ()
        try:
            return self._compiled_template.render(
                messages=[dict(m) for m in messages],
                **({"tools": [{"type": "function", "function": described(f)} for f in tools]} if tools else {}),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.token_text(self.bos_token_id),
                eos_token=self.token_text(self.eos_token_ids[0] if self.eos_token_ids else None),
            )
        except TemplateError as exc:  # raise_exception(...) in the template: the messages do not fit it
            raise RequestError(f"chat template rejected the messages: {exc}") from exc

    def token_text(self, token_id: int | None) -> str:
        """The literal text of one token (``""`` for None)."""
        if token_id is None:
            return ""
        return self.tokenizer.id_to_token(token_id) or ""

    def grammar_vocabulary(self, vocab_size: int) -> GrammarVocabulary:
        """This vocabulary as the grammar engine sees it, over ``vocab_size`` logits (the model's,
        which may pad the tokenizer's); built on first use (~0.2 s for 49k tokens), then kept."""
        if self._grammar_vocabulary is None or self._grammar_vocabulary.vocab_size != vocab_size:
            self._grammar_vocabulary = GrammarVocabulary(self.tokenizer.to_str(), self.eos_token_ids, vocab_size)
        return self._grammar_vocabulary

    # ------------------------------------------------------------------ decoding

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ identity

    def fingerprint(self) -> str:
        """sha256 hex over the canonical tokenizer JSON and every rule that turns text into ids."""
        doc = {
            "v": FINGERPRINT_VERSION,
            "tokenizer": self.tokenizer.to_str(),
            "chat_template": self.chat_template,
            "add_bos": self.add_bos,
            "bos_token_id": self.bos_token_id,
            "eos_token_ids": list(self.eos_token_ids),
        }
        return canonical_hash(doc)  # the bytes model_id has always hashed: verify/'s canonical JSON

    def __repr__(self) -> str:
        return (
            f"TextTokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={self.eos_token_ids}, "
            f"add_bos={self.add_bos}, chat_template={'yes' if self.chat_template else 'no'})"
        )

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_hf_folder(cls, folder: str | Path, config: Mapping[str, Any] | None = None) -> "TextTokenizer":
        """From ``tokenizer.json`` + ``tokenizer_config.json`` / ``chat_template.jinja``.

        ``config`` is the model's ``config.json`` dict (fallback for BOS/EOS ids);
        ``generation_config.json``'s ``eos_token_id`` adds stop ids when present.
        """
        folder = Path(folder)
        tok_path = folder / "tokenizer.json"
        if not tok_path.is_file():
            raise ModelLoadError(f"missing tokenizer: {tok_path} not found (only tokenizer.json is supported)")
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # the Rust side raises plain Exception
            raise ModelLoadError(f"cannot parse {tok_path}: {exc}") from exc
        tok_cfg = _read_json(folder / "tokenizer_config.json") or {}
        gen_cfg = _read_json(folder / "generation_config.json") or {}
        config = dict(config or {})

        def token_id(key: str) -> int | None:
            tok = _token_content(tok_cfg.get(key))
            if tok is not None:
                tid = tokenizer.token_to_id(tok)
                if tid is None:
                    raise ConfigError(f"tokenizer_config.json {key}={tok!r} is not in the vocabulary")
                return tid
            return None

        bos = token_id("bos_token")
        if bos is None and isinstance(config.get("bos_token_id"), int):
            bos = config["bos_token_id"]
        eos: list[int] = []
        first_eos = token_id("eos_token")
        if first_eos is not None:
            eos.append(first_eos)
        for src in (config, gen_cfg):
            eos.extend(_as_id_list(src.get("eos_token_id")))

        if "add_bos_token" in tok_cfg and tok_cfg["add_bos_token"] is not None:
            add_bos = bool(tok_cfg["add_bos_token"])
        else:
            add_bos = _post_processor_adds_bos(tokenizer, bos)

        template = _hf_chat_template(folder, tok_cfg)
        return cls(
            tokenizer,
            bos_token_id=bos,
            eos_token_ids=eos,
            add_bos=add_bos and bos is not None,
            chat_template=template,
            source=str(folder),
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], source: str = "") -> "TextTokenizer":
        """From GGUF ``tokenizer.ggml.*`` / ``tokenizer.chat_template`` values (plain Python values)."""
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise ModelLoadError(f"missing tokenizer: GGUF {source} has no tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise ModelLoadError(f"GGUF tokenizer model {model!r} is not supported (byte-level BPE 'gpt2' and "
                                 "SentencePiece 'llama' are)")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelLoadError(f"GGUF {source} lacks tokenizer.ggml.tokens")
        token_types = meta.get("tokenizer.ggml.token_type") or [GGUF_TOKEN_NORMAL] * len(tokens)
        if len(token_types) != len(tokens):
            raise ModelLoadError("GGUF tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
        if model == "gpt2":
            merges = meta.get("tokenizer.ggml.merges")
            if merges is None:
                raise ModelLoadError(f"GGUF {source} lacks tokenizer.ggml.merges")
            tokenizer = build_byte_level_bpe(tokens, merges, token_types)
        else:
            scores = meta.get("tokenizer.ggml.scores")
            if scores is None or len(scores) != len(tokens):
                raise ModelLoadError(f"GGUF {source} lacks tokenizer.ggml.scores for each of its tokens")
            # llama.cpp's default for a SentencePiece vocabulary without the key is the dummy prefix.
            tokenizer = build_sentencepiece_bpe(tokens, scores, token_types,
                                                add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
                                                unk_token_id=meta.get("tokenizer.ggml.unknown_token_id"))

        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                 "tokenizer.ggml.eom_token_id") if meta.get(k) is not None]
        # llama.cpp's default for a vocabulary without the key is to add BOS (BPE and SentencePiece alike).
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
        return cls(
            tokenizer,
            bos_token_id=bos,
            eos_token_ids=eos,
            add_bos=add_bos and bos is not None,
            chat_template=meta.get("tokenizer.chat_template"),
            source=source,
        )


class IncrementalDecoder:
    """Turns a growing list of ids into new text chunks, never a broken UTF-8 sequence.

    The windowed scheme of text-generation-inference: decode a short window before and after the
    new ids, emit the difference, and hold back while the tail is U+FFFD (an incomplete multi-byte
    character split over tokens). ``flush()`` returns whatever is still held back at the end.
    """

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # ids before this are already emitted

    def push(self, new_ids: int | Iterable[int]) -> str:
        """Add ids; return the text they complete (possibly ``""``)."""
        if isinstance(new_ids, int):
            new_ids = [new_ids]
        self.ids.extend(int(i) for i in new_ids)
        prefix = self._tok.decode(self.ids[self._prefix_offset:self._read_offset], self._skip)
        full = self._tok.decode(self.ids[self._prefix_offset:], self._skip)
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT_CHAR):
            chunk = full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            return chunk
        return ""

    def flush(self) -> str:
        """Text still held back (a trailing incomplete character decodes to U+FFFD here)."""
        prefix = self._tok.decode(self.ids[self._prefix_offset:self._read_offset], self._skip)
        full = self._tok.decode(self.ids[self._prefix_offset:], self._skip)
        self._prefix_offset = self._read_offset = len(self.ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""


# ---------------------------------------------------------------------- helpers


def build_byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int]) -> Tokenizer:
    """GPT-2 style byte-level BPE from a GGUF vocabulary (see module docstring)."""
    vocab = _vocab_of(tokens)
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise ModelLoadError(f"malformed GGUF merge {m!r}")
        pairs.append((left, right))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return _with_added_tokens(tokenizer, tokens, token_types)


def build_sentencepiece_bpe(tokens: Sequence[str], scores: Sequence[float], token_types: Sequence[int], *,
                            add_space_prefix: bool, unk_token_id: int | None = None) -> Tokenizer:
    """A SentencePiece-style (``llama``) GGUF vocabulary as a ``tokenizers`` BPE (see module docstring).

    SentencePiece's BPE writes its pieces in the order it learnt them, so a piece's position is its
    merge's rank; the merges are every split of a piece into two pieces, ranked by the position of
    the piece they make, then longer left part first (``transformers``' ``generate_merges``, which
    its GGUF loader uses for Gemma). The scores are not the rank: Gemma's are placeholders (-1000)
    for control and user-defined pieces and 0 for the bytes. They only confirm the order: a file
    whose normal pieces' scores rise somewhere is not in merge order, and is refused.

    Gemma's 262,144 pieces give 514,906 merges: ~2.2 s on 2 cores alone (1.2 s of it the Python pass
    over every split, 0.6 s the Rust BPE), ~4 s beside other work; the prepared-checkpoint cache
    keeps the built tokenizer, so a model pays it once.
    """
    normal = [sc for sc, tt in zip(scores, token_types) if tt == GGUF_TOKEN_NORMAL]
    if any(later > earlier for earlier, later in zip(normal, normal[1:])):
        raise ModelLoadError("GGUF SentencePiece vocabulary is not in merge order (tokenizer.ggml.scores of its "
                             "normal tokens rise); only files written in merge order are supported")
    if unk_token_id is not None and not 0 <= unk_token_id < len(tokens):
        raise ConfigError(f"tokenizer.ggml.unknown_token_id {unk_token_id} is outside the vocabulary")
    # Runs of spaces are stored with real spaces (Gemma's user-defined pieces); the model sees U+2581.
    pieces = [t.replace(" ", SPIECE_SPACE) for t in tokens]
    vocab = _vocab_of(pieces)
    merges = []
    for rank, piece in enumerate(pieces):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((rank, -cut, left, right))
    merges.sort()
    unk = None if unk_token_id is None else pieces[unk_token_id]  # used only where a byte piece is missing
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(l, r) for _, _, l, r in merges], unk_token=unk,
                                     fuse_unk=True, byte_fallback=True))
    if add_space_prefix:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_SPACE, prepend_scheme="first", split=False)
    else:
        tokenizer.normalizer = normalizers.Replace(" ", SPIECE_SPACE)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                          + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    # A respelled piece is found by the merges, not matched as written: as transformers does.
    return _with_added_tokens(tokenizer, tokens, [tt if p == t else GGUF_TOKEN_NORMAL
                                                  for t, p, tt in zip(tokens, pieces, token_types)])


def _vocab_of(pieces: Sequence[str]) -> dict[str, int]:
    vocab = {tok: i for i, tok in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ModelLoadError("GGUF vocabulary has duplicate tokens")
    return vocab


def _with_added_tokens(tokenizer: Tokenizer, tokens: Sequence[str], token_types: Sequence[int]) -> Tokenizer:
    """Control tokens become special added tokens and user-defined ones plain added tokens, both
    matched whole in the raw text (as llama.cpp does), at their own ids."""
    special, user = [], []
    for tok, ttype in zip(tokens, token_types):
        if ttype == GGUF_TOKEN_CONTROL:
            special.append(AddedToken(tok, special=True, normalized=False))
        elif ttype == GGUF_TOKEN_USER_DEFINED:
            user.append(AddedToken(tok, special=False, normalized=False))
    if special:
        tokenizer.add_special_tokens(special)
    if user:
        tokenizer.add_tokens(user)
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ModelLoadError("rebuilt GGUF tokenizer does not cover the vocabulary one to one")
    return tokenizer


def _compile_template(source: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise ConfigError(f"chat template does not parse: {exc}") from exc


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def _token_content(value: Any) -> str | None:
    """``tokenizer_config.json`` writes special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return []


def _post_processor_adds_bos(tokenizer: Tokenizer, bos: int | None) -> bool:
    """Whether tokenizer.json's post-processor puts BOS first (probed, not parsed)."""
    if bos is None:
        return False
    with_special = tokenizer.encode("a", add_special_tokens=True).ids
    without = tokenizer.encode("a", add_special_tokens=False).ids
    return bool(with_special) and with_special[0] == bos and (not without or without[0] != bos)


def _hf_chat_template(folder: Path, tok_cfg: Mapping[str, Any]) -> str | None:
    """``chat_template.jinja`` (transformers >= 4.5x) wins over ``tokenizer_config.json``."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) and template else None


__all__ = ["IncrementalDecoder", "TextTokenizer", "build_byte_level_bpe", "build_sentencepiece_bpe"]

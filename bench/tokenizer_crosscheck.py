"""Gemma 3's SentencePiece tokenizer, ours against ``transformers``' conversion of the same GGUF.

Writes the two committed fixtures the tokenizer tests read, so CI needs neither the 237 MB model
nor ``transformers`` (which is no dependency of the project, not even for tests):

* ``tests/data/gemma3_270m_tokenizer.json.xz``: every ``tokenizer.*`` key of the pulled GGUF, as
  the GGUF loader hands them to ``TextTokenizer.from_gguf_metadata`` (token list, scores, types,
  special ids, flags): ~1 MB instead of the model;
* ``tests/data/gemma3_270m_token_ids.json``: ``TEXTS`` and the ids ``transformers`` gives each.

It exits 1 if our ids differ from ``transformers``' on any text (and prints where). Run it where
the model is pulled (``proofmesh pull gemma-3-270m``), with ``transformers`` installed apart from
the project's environment, e.g.::

    pip install --no-deps --target /tmp/tf transformers
    PYTHONPATH=/tmp/tf python -m bench.tokenizer_crosscheck

``transformers``' GGUF reader imports ``torch`` for tensor dtypes only; the tokenizer path uses
none of it, so a stand-in module is put in its place when ``torch`` is absent.
"""

from __future__ import annotations

import argparse
import json
import lzma
import sys
import types
from pathlib import Path


from compiled_models.registry import GEMMA_3_270M
from node.models.llama.gguf_loader import read_metadata
from node.models.tokenizer import TextTokenizer
from node.runtime.model_store import pulled_path

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
METADATA_FIXTURE = DATA / "gemma3_270m_tokenizer.json.xz"
IDS_FIXTURE = DATA / "gemma3_270m_token_ids.json"

TEXTS = [
    "Hello world", "The capital of France is Paris.", "hello", " hello", "hello ", "  hello  ", "",
    " ", "  ", "    ", "a  b   c    d", "\n", "\n\n", "line one\nline two\n\n\nline five", "\r\n",
    "\ttab\t\ttabs\t", " \t \n mixed \n\t ", "x" * 70, " " * 40 + "deep",
    "0", "42", "1234567890", "3.14159", "-17 + 2,000,000 = 1e-9", "2026-12-02T02:03:23Z",
    "café naïve façade", "Ünïcödé ÀÉÎÕÜ", "Straße", "Привет, мир", "مرحبا بالعالم", "नमस्ते",
    "日本語のテキスト", "中文分词测试", "한국어", "emoji 🤗🚀👍🏽 family 👨‍👩‍👧", "∑∫√∞ ≠ ≤",
    "\x00\x01\x7f", "\ue000 private use", "𠀀𪚥 rare", "▁ literal meta space ▁▁",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { s += a[i]; }",
    '{"key": [1, 2.5, null], "k2": "v"}', "<html><body><table><tr><td>cell</td></tr></table></body></html>",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n", "<bos>text<eos>",
    "<pad><unk><mask>", "<0x41> is a byte token's name", "[multimodal] <start_of_image>", "<unused0><unused6241>",
    "<start_of_turn", "end_of_turn>", "https://ai.google.dev/gemma/terms?x=1&y=2",
]


def transformers_tokenizer(path: Path):
    """The ``tokenizers.Tokenizer`` that ``transformers`` builds from the GGUF (its own reader)."""
    if "torch" not in sys.modules:
        try:
            import torch  # noqa: F401
        except ImportError:
            import transformers  # noqa: F401  - decides "no torch" before the stand-in appears

            class _Anything:
                def __getattr__(self, name):
                    return _Anything()

                def __call__(self, *args, **kwargs):
                    return _Anything()

                def __getitem__(self, key):
                    return _Anything()

                def __or__(self, other):
                    return _Anything()

                __ror__ = __or__

            class _Torch(types.ModuleType):
                def __getattr__(self, name):
                    return _Anything()

            sys.modules["torch"] = _Torch("torch")
    import transformers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    architecture, tokenizer_dict, _ = get_gguf_tokenizer(str(path))
    backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return backend, transformers.__version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=pulled_path(GEMMA_3_270M), help="the pulled Gemma 3 270M GGUF")
    args = parser.parse_args(argv)

    meta = {k: v for k, v in read_metadata(args.gguf).items() if k.startswith("tokenizer.")}
    DATA.mkdir(parents=True, exist_ok=True)
    METADATA_FIXTURE.write_bytes(lzma.compress(json.dumps(meta, ensure_ascii=False).encode(), preset=9 | lzma.PRESET_EXTREME))
    print(f"wrote {METADATA_FIXTURE} ({METADATA_FIXTURE.stat().st_size:,} bytes; keys {sorted(meta)})")

    ours = TextTokenizer.from_gguf_metadata(meta, source=str(args.gguf)).tokenizer
    reference, version = transformers_tokenizer(args.gguf)
    cases, differ = [], 0
    for text in TEXTS:
        want = reference.encode(text, add_special_tokens=False).ids
        got = ours.encode(text, add_special_tokens=False).ids
        if got != want:
            differ += 1
            print(f"DIFFER {text!r}\n  transformers {want}\n  ours         {got}")
        cases.append({"text": text, "ids": want})
    head = {"reference": f"transformers {version}, integrations.gguf convert_gguf_tokenizer, add_special_tokens=False",
            "gguf": f"{GEMMA_3_270M.filename} sha256 {GEMMA_3_270M.source.sha256}"}
    lines = ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases)  # one text a line: diffs read well
    IDS_FIXTURE.write_text(json.dumps(head, ensure_ascii=False)[:-1] + ',\n"cases": [\n' + lines + "\n]}\n")
    print(f"wrote {IDS_FIXTURE}: {len(cases)} texts, {sum(len(c['ids']) for c in cases)} ids; {differ} differ from ours")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

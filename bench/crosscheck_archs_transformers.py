"""Our float64 references of Qwen3 and Gemma 3 against ``transformers``' own modules: the check that
the references (which the TVM models are tested against) compute what the architectures are.

On the tiny random checkpoints the tests use (``tests.models_fixtures``: HF folders written as
transformers writes them, Gemma 3's with a 24-token sliding window crossed by the 60-token
sequence and a logit soft cap), ``Qwen3ForCausalLM`` / ``Gemma3ForCausalLM`` run in float64 with
eager attention beside ``node.models.{qwen3,gemma3}.reference``. With ``--gguf`` it also loads the
real gemma-3-270m GGUF into transformers (its GGUF loader dequantizes with the ``gguf`` package)
and compares teacher-forced logits over a prompt longer than the 512-token window.

``transformers`` and ``torch`` are no dependencies of the project (``.[bench]`` extra): install them
apart, e.g. in a venv with ``--system-site-packages``. Prints the largest differences; exits 1 if
one is above ``--tolerance``. transformers keeps RoPE's angles and Gemma's and Qwen3's RMSNorm in
float32 inside a float64 model, so the two agree to ~5e-6, not to float64's last bits; each
config key the architectures add moves the tiny models' logits by 0.07 to 40, and for Gemma 3 the
script also shows what a window one token too short or too long would be off by.

    python -m bench.crosscheck_archs_transformers [--gguf gemma-3-270m-q4_k_m.gguf]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

from node.models import architectures
from node.models.llama.load import load_checkpoint
from tests.models_fixtures import make_tiny_arch_hf_checkpoint, tiny_gemma3_config, tiny_qwen3_config

LONG_TEXT = ("The river runs through the old town, past the market and the church, and every "
             "morning the people walk along it to work. ")


def transformers_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, default=None, help="also check the real gemma-3-270m GGUF")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest |logit difference| on the tiny models")
    args = ap.parse_args()
    worst = 0.0
    tmp = Path(tempfile.mkdtemp(prefix="crosscheck-"))
    for cfg in (tiny_qwen3_config(), tiny_gemma3_config()):
        folder, _ = make_tiny_arch_hf_checkpoint(tmp / cfg.model_type, cfg)
        ckpt = load_checkpoint(folder)
        ours = architectures.of_config(cfg).reference.from_checkpoint(ckpt)
        theirs = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float64, attn_implementation="eager").eval()
        ids = [int(i) for i in np.random.default_rng(1).integers(3, cfg.vocab_size, 60)]
        reference = transformers_logits(theirs, ids)
        diff = float(np.abs(ours.logits(ids) - reference).max())
        worst = max(worst, diff)
        print(f"{cfg.model_type:7} tiny, {len(ids)} tokens: max |ours - transformers| = {diff:.2e}")
        if cfg.model_type == "gemma3":
            for window in (cfg.sliding_window - 1, cfg.sliding_window + 1):
                shifted = type(ours)(dataclasses.replace(cfg, sliding_window=window), ckpt.weights)
                print(f"        with a window of {window} instead: {float(np.abs(shifted.logits(ids) - reference).max()):.2e}")
    if args.gguf:
        ckpt = load_checkpoint(args.gguf)
        ours = architectures.of_config(ckpt.config).reference.from_checkpoint(ckpt)
        theirs = AutoModelForCausalLM.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name,
                                                      torch_dtype=torch.float64, attn_implementation="eager").eval()
        ids = ckpt.tokenizer.encode_prompt(LONG_TEXT * 20)
        ids = ids + [int(i) for i in np.random.default_rng(2).integers(3, 20000, 40)]  # past the window
        a, b = ours.logits(ids, from_position=len(ids) - 120), transformers_logits(theirs, ids)[-120:]
        print(f"gemma3  {args.gguf.name}, {len(ids)} tokens, last 120 rows: max |ours - transformers| = "
              f"{float(np.abs(a - b).max()):.2e} (logits up to {float(np.abs(b).max()):.1f}), "
              f"argmax agreement {int((a.argmax(1) == b.argmax(1)).sum())}/120")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())

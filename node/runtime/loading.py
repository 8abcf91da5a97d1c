"""From a model name or path to a ready runtime: resolve, load, identify, compile, upload.

The one place that strings the pieces together, so the CLI, the HTTP server, tests and
benchmarks all load a model the same way (and get the same ``model_id``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from node.runtime import model_store
from node.errors import ConfigError
from node.compiler.build import compile_model
from node.runtime.model_store import ModelManifest, ProgressFn
from node.runtime.prepared_cache import load_prepared, save_prepared
from node.models.checkpoint import Checkpoint
from node.models.llama.load import load_checkpoint
from node.models.llama.model import fuse_hf_weights, native_params
from node.runtime.allocator import return_freed_memory
from node.runtime.model_runtime import CacheLimits, ModelRuntime
from node.runtime.options import WEIGHT_MODES
from node.compiler.targets import DeviceTarget, detect
from node.models.tokenizer import TextTokenizer
from verify.grammar import GrammarVocabulary

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str
    path: Path
    config: Any  # the architecture's config (node.models.architectures)
    tokenizer: TextTokenizer
    manifest: ModelManifest
    runtime: ModelRuntime
    device: DeviceTarget
    load_seconds: float
    weight_layout: dict[str, str]  # weights kept as GGML blocks (module -> type); empty on the fp32 path

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    @property
    def backend(self) -> str:
        """The device's description, plus ``/native`` when quantized blocks are computed on in place
        (still fp32 arithmetic: the same precision class and tolerance)."""
        return self.device.description + ("/native" if self.weight_layout else "")

    @property
    def weight_format(self) -> str:
        """The checkpoint's stored weight types (``gguf:F32+Q4_K+Q6_K``): hashed into ``model_id``."""
        return self.manifest.weight_dtype

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.tokenizer.eos_token_ids

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``, special tokens skipped: the verifier's stop-string rule."""
        return self.tokenizer.decode(token_ids)

    def grammar_vocabulary(self) -> GrammarVocabulary:
        return self.tokenizer.grammar_vocabulary(self.vocab_size)

    def score(self, token_ids: Sequence[int], from_position: int = 0) -> np.ndarray:
        """Teacher-forced logits from ``from_position`` on, all rows at once."""
        return self.runtime.score(token_ids, from_position)

    def score_blocks(self, token_ids: Sequence[int], from_position: int = 0) -> Iterator[np.ndarray]:
        """The same rows a prefill chunk at a time: makes a LoadedModel a verifier backend."""
        return self.runtime.score_blocks(token_ids, from_position)

    @property
    def max_context(self) -> int:
        return min(self.config.context_limit, self.runtime.limits.max_total_tokens)


def manifest_of(ckpt: Checkpoint) -> ModelManifest:
    return ModelManifest(
        architecture=ckpt.config.shape_dict(),
        tokenizer_sha256=ckpt.tokenizer.fingerprint(),
        weight_dtype=ckpt.weight_format,
        weights_sha256=ckpt.weights_digest,
    )


def load_checkpoint_cached(path: Path, root: Path, progress: ProgressFn = log.info, *,
                           keep_quantized: bool = False) -> Checkpoint:
    """The checkpoint at ``path``, from the prepared cache when it holds it (warm start);
    quantized weights stay blocks with ``keep_quantized``, else come out as float32."""
    ckpt = load_prepared(root, path)
    if ckpt is None:
        progress(f"loading {path.name} (prepared once, then cached) ...")
        ckpt = load_checkpoint(path, keep_quantized=True)
        save_prepared(root, path, ckpt)
    return ckpt if keep_quantized else ckpt.dequantized()


def model_parameters(ckpt: Checkpoint) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The compiled model's parameters and weight layout (empty unless weights are still quantized)."""
    return native_params(fuse_hf_weights(ckpt.config, ckpt.weights))


def load_model(
    model: str,
    *,
    device: str | DeviceTarget = "auto",
    limits: CacheLimits = CacheLimits(),
    root: Path | None = None,
    progress: ProgressFn = log.info,
    weights: str = "native",
) -> LoadedModel:
    """``weights="native"`` keeps every matrix in its stored form (llama.cpp's blocks, 16-bit
    floats) and runs the native kernels on them; ``"fp32"`` widens every weight to float32 at
    load time. Both are honest backends of the same ``model_id``."""
    if weights not in WEIGHT_MODES:
        raise ConfigError(f"unknown weights mode {weights!r}; choose one of {', '.join(WEIGHT_MODES)}")
    start = time.perf_counter()
    root = root or model_store.store_root()
    path = model_store.resolve(model, root, progress)
    ckpt = load_checkpoint_cached(path, root, progress, keep_quantized=weights == "native")
    manifest = manifest_of(ckpt)
    manifest.save(root)
    target = device if isinstance(device, DeviceTarget) else detect(device)
    params, layout = model_parameters(ckpt)
    progress(f"model_id {manifest.model_id[:16]}…  backend {target.description}"
             + (f"  weights native ({', '.join(sorted(set(layout.values())))} blocks)" if layout else "  weights fp32"))
    library = compile_model(ckpt.config, target.target, root, layout=layout)
    runtime = ModelRuntime(ckpt.config, library, params, target, limits)
    config, tokenizer = ckpt.config, ckpt.tokenizer
    del ckpt, params  # uploaded: the host copies and the load's buffers go back to the OS
    return_freed_memory()
    return LoadedModel(
        name=model,
        path=path,
        config=config,
        tokenizer=tokenizer,
        manifest=manifest,
        runtime=runtime,
        device=target,
        load_seconds=time.perf_counter() - start,
        weight_layout=layout,
    )

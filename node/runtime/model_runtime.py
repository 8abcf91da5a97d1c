"""The model runtime: a compiled library, its weights on a device, and a paged KV cache.

This is the only module that drives TVM at run time. It speaks token ids and numpy logits;
sequence bookkeeping (which ids are live, who owns them) belongs to the engine. Calls are
not thread-safe: the engine owns one runtime and calls it from one worker thread.

KV-cache protocol (TVM's ``vm.builtin.kv_state_*``): ``add_sequence`` once, then for each
forward pass ``begin_forward(seq_ids, lengths)`` -> compiled ``prefill``/``decode`` ->
``end_forward``; ``remove_sequence`` frees the pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import tvm
from tvm import relax
from tvm.runtime import ShapeTuple

from node.compiler.build import CompiledLibrary
from node.compiler.cpu_attention import KV_PAGE_SIZE
from node.errors import ConfigError, ContextLengthError, ModelLoadError, RuntimeFault
from node.models import architectures
from node.compiler.targets import DeviceTarget

PAGE_SIZE = KV_PAGE_SIZE  # tokens per KV page (16): what the CPU attention kernels are built for
# Tokens per prefill pass; longer prompts are fed in chunks, one chunk per engine step at most, so
# a chunk's time is what one client's long prompt may cost everyone else's next token. Measured on
# the default model (znver5, 2 threads, 1,024-token prompt): chunks of 512 / 256 / 128 / 64 gave
# 453 / 500 / 482 / 436 tokens/s, one chunk taking 889 / 350 / 169 / 99 ms.
DEFAULT_PREFILL_CHUNK = 128
# The cache's ``support_sliding_window`` flag, off: with it on, TVM's cache may slide a whole
# sequence's window (``enable_sliding_window_for_seq``, dropping the pages behind it), which the
# node never asks for. A sliding-window model is served with no more context than its window, and
# Gemma 3's sliding layers are windowed per layer by the cache's ``attn_kind``, without the flag.
SEQUENCE_SLIDING_WINDOW = 0


@dataclass(frozen=True)
class CacheLimits:
    max_batch_size: int = 16  # sequences decoded together
    max_total_tokens: int = 16384  # KV slots shared by all live sequences
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK


class ModelRuntime:
    """One compiled model on one device: the TVM VM with the library loaded, the weights
    uploaded once, and the paged KV cache every live sequence shares, sized by ``CacheLimits``.

    It owns those three because they live and die together: the cache is built by the library's
    own ``create_paged_kv_cache`` for the weights' shapes, and the VM's functions take the weights
    and the cache on every call. It owns nothing else: which request a sequence serves, and when
    one is admitted, is the engine's (``node.runtime.engine``); what a token means is the
    tokenizer's. Here a sequence is its id and its length in the cache (``_live``); ``score``
    runs on scratch sequences with negative ids, so a teacher-forced pass never meets an engine's."""

    def __init__(
        self,
        cfg,  # the architecture's config (node.models.architectures)
        library: CompiledLibrary,
        params: dict[str, np.ndarray],
        device: DeviceTarget,
        limits: CacheLimits = CacheLimits(),
    ):
        window = architectures.of_config(cfg).sliding_window(cfg)
        if window is not None and limits.prefill_chunk > window:  # the in-chunk attention is not windowed
            raise ConfigError(f"prefill chunks of {limits.prefill_chunk} tokens are longer than {cfg.model_type}'s "
                              f"sliding window ({window}); a chunk must fit in it")
        self.cfg = cfg
        self.device = device
        self.limits = limits
        self._vm = relax.VirtualMachine(library.load(), device.device)
        self._params = self._upload(library, params, device)
        self._cache = self._vm["create_paged_kv_cache"](
            ShapeTuple([limits.max_batch_size]),
            ShapeTuple([limits.max_total_tokens]),
            ShapeTuple([limits.prefill_chunk]),
            ShapeTuple([PAGE_SIZE]),
            ShapeTuple([SEQUENCE_SLIDING_WINDOW]),
        )
        self._prefill_fn = self._vm["prefill"]
        self._decode_fn = self._vm["decode"]
        self._add = tvm.get_global_func("vm.builtin.kv_state_add_sequence")
        self._remove = tvm.get_global_func("vm.builtin.kv_state_remove_sequence")
        self._begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
        self._end = tvm.get_global_func("vm.builtin.kv_state_end_forward")
        self._live: dict[int, int] = {}  # seq id -> tokens in cache
        self._next_scratch_id = -1  # negative ids for internal scoring sequences

    @property
    def weight_bytes(self) -> int:
        """Bytes of parameters on the device: what one decode step streams from memory."""
        return sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in self._params)

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes the paged KV cache reserves: K and V (fp32) for every slot of every layer."""
        cfg = self.cfg
        return self.limits.max_total_tokens * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4

    @staticmethod
    def _upload(library: CompiledLibrary, params: dict[str, np.ndarray], device: DeviceTarget) -> list:
        tensors = []
        for name, shape, dtype in zip(library.param_names, library.param_shapes, library.param_dtypes):
            if name not in params:
                raise ModelLoadError(f"weights lack parameter {name!r} required by the compiled model")
            # float32 parameters accept any float array (as before quantized layouts); block arrays must match.
            array = np.ascontiguousarray(params[name], dtype=np.float32 if dtype == "float32" else None)
            if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
                raise ModelLoadError(f"parameter {name!r} is {array.dtype}{list(array.shape)}, "
                                     f"the model expects {dtype}{list(shape)}")
            tensors.append(tvm.runtime.tensor(array, device.device))
        return tensors

    # -- capacity -----------------------------------------------------------------
    @staticmethod
    def kv_slots(n_tokens: int) -> int:
        """KV slots a sequence of ``n_tokens`` occupies: pages are per sequence, so its last,
        partly filled page counts whole."""
        return -(-n_tokens // PAGE_SIZE) * PAGE_SIZE

    @property
    def kv_capacity(self) -> int:
        """Slots in whole pages: the most that all live sequences together can hold."""
        return self.limits.max_total_tokens // PAGE_SIZE * PAGE_SIZE

    @property
    def live_sequences(self) -> int:
        return len(self._live)

    # -- sequences ----------------------------------------------------------------
    def add_sequence(self, seq_id: int) -> None:
        if seq_id in self._live:
            raise RuntimeFault(f"sequence {seq_id} already exists")
        if len(self._live) >= self.limits.max_batch_size:
            raise RuntimeFault("KV cache holds the maximum number of sequences")
        self._add(self._cache, seq_id)
        self._live[seq_id] = 0

    def remove_sequence(self, seq_id: int) -> None:
        if self._live.pop(seq_id, None) is not None:
            self._remove(self._cache, seq_id)

    def sequence_length(self, seq_id: int) -> int:
        return self._live[seq_id]

    # -- forward passes -----------------------------------------------------------
    def prefill(self, seq_id: int, token_ids: Sequence[int], logits_from: int | None = None) -> np.ndarray:
        """Append ``token_ids`` to a sequence; float32 logits for rows ``logits_from`` onward of
        the new tokens (default: the last row only, what generation needs)."""
        return np.concatenate(list(self._prefill_blocks(seq_id, token_ids, logits_from)), axis=0)

    def _prefill_blocks(self, seq_id: int, token_ids: Sequence[int], logits_from: int | None) -> Iterator[np.ndarray]:
        """``prefill`` one chunk at a time: each chunk's wanted rows as soon as they are computed."""
        if len(token_ids) == 0:
            raise RuntimeFault("prefill needs at least one token")
        self._check_ids(token_ids)
        first = len(token_ids) - 1 if logits_from is None else logits_from
        if not 0 <= first < len(token_ids):
            raise RuntimeFault(f"logits_from {first} is outside the {len(token_ids)} new tokens")
        chunk = self.limits.prefill_chunk
        for start in range(0, len(token_ids), chunk):
            piece = np.asarray(token_ids[start : start + chunk], dtype=np.int32)
            # The lm head runs only on the rows asked for; a chunk before them still needs one
            # row (the compiled prefill takes at least one position), which is dropped.
            wanted = np.arange(max(first - start, 0), len(piece), dtype=np.int32)
            positions = wanted if wanted.size else np.array([len(piece) - 1], dtype=np.int32)
            logits = self._forward_prefill(seq_id, piece, positions)
            if wanted.size:
                yield logits

    def _forward_prefill(self, seq_id: int, piece: np.ndarray, positions: np.ndarray) -> np.ndarray:
        dev = self.device.device
        self._begin(self._cache, ShapeTuple([seq_id]), ShapeTuple([len(piece)]))
        try:
            logits, _ = self._prefill_fn(
                tvm.runtime.tensor(piece[None, :], dev), tvm.runtime.tensor(positions, dev), self._cache, self._params
            )
        finally:
            self._end(self._cache)
        self._live[seq_id] += len(piece)
        return logits.numpy()[0]  # (m, vocab)

    def decode(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
        """One new token for each sequence, all in one batched pass: logits (b, vocab)."""
        if len(seq_ids) != len(token_ids) or not seq_ids:
            raise RuntimeFault("decode needs one token per sequence")
        self._check_ids(token_ids)
        dev = self.device.device
        self._begin(self._cache, ShapeTuple(list(seq_ids)), ShapeTuple([1] * len(seq_ids)))
        try:
            logits, _ = self._decode_fn(
                tvm.runtime.tensor(np.asarray(token_ids, dtype=np.int32)[:, None], dev), self._cache, self._params
            )
        finally:
            self._end(self._cache)
        for s in seq_ids:
            self._live[s] += 1
        return logits.numpy()[:, 0]

    def score(self, token_ids: Sequence[int], from_position: int = 0) -> np.ndarray:
        """Teacher-forced logits at positions ``from_position..`` of ``token_ids`` (one prefill,
        no decode), in a scratch sequence that is freed afterwards.

        Row i predicts token ``from_position + i + 1``: what a verifier compares with a claimed
        answer (it starts at the last prompt token, so the lm head skips the prompt).
        """
        return np.concatenate(list(self.score_blocks(token_ids, from_position)), axis=0)

    def score_blocks(self, token_ids: Sequence[int], from_position: int = 0) -> Iterator[np.ndarray]:
        """``score``'s rows one prefill chunk at a time, so a long re-check never holds every
        row's logits at once (16k rows x a 49k vocabulary would be 3 GB)."""
        needed = self.kv_slots(len(token_ids))
        in_use = sum(self.kv_slots(n) for n in self._live.values())
        if needed > self.kv_capacity - in_use:
            raise ContextLengthError(
                f"scoring {len(token_ids)} tokens needs {needed} KV slots; {self.kv_capacity - in_use} of "
                f"{self.kv_capacity} are free"
            )
        seq_id = self._next_scratch_id
        self._next_scratch_id -= 1
        self.add_sequence(seq_id)
        try:
            yield from self._prefill_blocks(seq_id, token_ids, from_position)
        finally:
            self.remove_sequence(seq_id)

    def _check_ids(self, token_ids: Iterable[int]) -> None:
        ids = np.asarray(token_ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.cfg.vocab_size):
            raise RuntimeFault(f"token id out of range [0, {self.cfg.vocab_size})")

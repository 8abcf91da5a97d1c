"""The generation engine: continuous batching over one model runtime.

``async for event in engine.generate(request)`` streams tokens. Behind it one engine thread
repeats a *step* (TVM and numpy release the GIL, the event loop stays free): admit waiting
sequences (prefill each, sample its first token), then decode one token for every running
sequence in one batched pass. New requests join the running batch at the next step and finished
ones leave it, so a long answer never holds up a short one. The thread hands each step's events
to the event loop and goes straight on to the next step.

Admission: a request must fit the context (prompt + max_tokens); it waits in a bounded queue
until a batch slot and KV pages for its whole budget are free (so the cache never fills
mid-answer); a full queue raises ``EngineBusyError``. A caller that stops iterating cancels
its sequence, which frees its slot before the next step.

No one client takes what every client shares (DESIGN.md, "Who signed what"; a request names
its client, ``GenerationRequest.client``): one client may hold at most ``max_queue_per_client``
places in the queue (half of it by default), a free slot goes to the waiting client with the
fewest sequences running and no client's running sequences hold more than three quarters of the
slots or of the KV pages (there is no preemption: the rest is where a newcomer starts), and
prefill is chunked: a step prefills at most
``prefill_tokens_per_step`` prompt tokens (whole runtime chunks, taken in turn by the clients
whose prompts are being prefilled), so sequences already decoding get a token every step however
long the prompts that join, and a long prompt's client cannot hold the engine for one step of
minutes. A sequence cancelled mid-prefill is dropped before its next chunk. Chunks start at
multiples of the runtime's ``prefill_chunk``, as one whole prefill's do: an answer's logits do
not depend on what else was running.

A request with a grammar (JSON mode, a schema, a tool call) keeps a ``GrammarState``: its mask
joins the seeded draw at every step, exactly as ``verify.sampling`` defines it.

Every sampled position also records the top ``FINGERPRINT_K`` token ids and logits
(``verify.evidence``): the fingerprints a receipt commits to and a verifier re-checks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, TypeVar

import numpy as np

from node.errors import ClientShareError, ContextLengthError, EngineBusyError, RequestError
from node.compiler.targets import usable_cores
from node.runtime.model_runtime import ModelRuntime
from node.models.tokenizer import TextTokenizer
from node.runtime.events import AnswerText, GenerationRequest, GenerationResult, TokenEvent
from node.runtime.options import DEFAULT_MAX_QUEUE
from verify.canonical import request_hash as compute_request_hash
from verify.evidence import Fingerprint, position_fingerprint
from verify.grammar import GrammarError, GrammarState
from verify.receipts import FinishReason
from verify.sampling import sample_token

T = TypeVar("T")
# The share of the queue one client may hold by default: whatever one client sends, the other
# half stays open to everyone else (attack 10 of issue 21 filled all 64 places with 4 requests).
QUEUE_SHARE_PER_CLIENT = 0.5
# The share of the batch slots and of the KV pages one client's running sequences may hold. There
# is no preemption: a newcomer gets a slot only as one frees, and one client's long prompts (max
# tokens 1, attack 10) free theirs a whole prefill later, so a quarter is kept for the others.
RUNNING_SHARE_PER_CLIENT = 0.75
# Exclusive work (re-checks for peers and for fraud proofs) waiting for the engine's thread at
# once: past it, new work is refused (EngineBusyError), so re-checks cannot queue up without end.
MAX_EXCLUSIVE_WAITING = 4
# Seconds between hand-overs of a running answer's tokens to the event loop (streamed tokens
# arrive in bursts of a few; a stream's first and last events go at once).
DELIVERY_INTERVAL = 0.02

log = logging.getLogger(__name__)



def _deliver(outputs: list[tuple["_Sequence", "TokenEvent | BaseException"]]) -> None:
    """On the event loop: hand each event (or a step's exception) to its sequence's reader."""
    for seq, event in outputs:
        seq.events.put_nowait(event)


def _settle(done: asyncio.Future, result: Any, error: BaseException | None) -> None:
    """On the event loop: answer an exclusive job's caller (unless it stopped waiting)."""
    if done.cancelled():
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)


@dataclass(eq=False)  # identity: the batch lists hold each sequence once
class _Sequence:
    seq_id: int
    request: GenerationRequest
    request_hash: str
    events: asyncio.Queue
    text: AnswerText
    created: float = field(default_factory=time.perf_counter)
    grammar: GrammarState | None = None  # where the answer stands in its grammar, if it has one
    output_ids: list[int] = field(default_factory=list)
    fingerprints: list[Fingerprint] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    first_token_at: float | None = None
    prefilled: int = 0  # prompt tokens in the KV cache so far (prefill is chunked over steps)
    finish_reason: FinishReason | None = None
    failed: bool = False  # a step failed under it: its caller got the exception, not a finish
    cancelled: bool = False
    in_cache: bool = False


class Engine:
    """One model's generation: it owns the model runtime (its weights and its KV cache pages),
    the one thread that may call it, the waiting queue and the running batch, and the per-token
    sampler pool. The runtime is not thread-safe and a batched step is worth one pass however
    many sequences ride in it, so every call into it (steps, and a verifier's exclusive re-checks,
    ``run_exclusive``) goes through that thread, and the batch and queue live beside it to be
    shared out there (admission, client shares, chunked prefill). Callers on the event loop see
    only ``generate``'s stream of events and the results of ``complete`` and ``run_exclusive``:
    it knows no HTTP, so the node's routes, the CLI and the benches drive it alike."""

    def __init__(
        self,
        runtime: ModelRuntime,
        tokenizer: TextTokenizer,
        model_id: str,
        *,
        max_context: int,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_queue_per_client: int | None = None,
        prefill_tokens_per_step: int | None = None,
    ):
        """``max_queue_per_client``: places one client may hold in the queue (default
        ``QUEUE_SHARE_PER_CLIENT`` of ``max_queue``, at least one). ``prefill_tokens_per_step``:
        prompt tokens one step may prefill (default one runtime chunk, ``prefill_chunk``: a
        step then costs at most one chunk's prefill plus one decode, and a prompt alone is fed
        in the very passes one whole prefill made); at least one chunk runs a step."""
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_context = max_context
        self.max_queue = max_queue
        self.max_queue_per_client = (max(1, int(max_queue * QUEUE_SHARE_PER_CLIENT)) if max_queue_per_client is None
                                     else max_queue_per_client)
        self.prefill_tokens_per_step = prefill_tokens_per_step or runtime.limits.prefill_chunk
        self._prefill_turns: dict[str, int] = {}  # client -> when its prompts last got a chunk
        self._turns = itertools.count()
        self._waiting: list[_Sequence] = []
        self._running: list[_Sequence] = []
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None  # where events are delivered
        self._worker: asyncio.Future | None = None  # the engine thread's loop (``_work``)
        self._work_ready = threading.Event()  # set when there may be work: a request, a job, a cancel
        self._lock = threading.Lock()  # guards the waiting and running lists and the job queue
        self._jobs: deque[tuple[Callable[..., Any], tuple, asyncio.Future]] = deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="proofmesh-engine")
        # The per-token work of a batch (sampling, fingerprints: numpy, which releases the GIL)
        # runs on every core while the model waits for it; one sequence's stays on one thread.
        self._samplers = ThreadPoolExecutor(max_workers=usable_cores(), thread_name_prefix="proofmesh-sample")
        self._closing = False
        self.delivery_interval = DELIVERY_INTERVAL
        self._exclusive = 0  # exclusive jobs submitted and not yet finished
        self.steps_run = 0  # scheduler steps so far (for metrics and tests)

    # -- public API -----------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def validate(self, request: GenerationRequest) -> None:
        """Raise a ``RequestError`` if the engine could never serve ``request``."""
        if not request.prompt_ids:
            raise RequestError("the prompt is empty")
        vocab = self.runtime.cfg.vocab_size
        if not all(0 <= i < vocab for i in request.prompt_ids):  # one bad id would fail the whole batch's step
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        budget = len(request.prompt_ids) + request.params.max_tokens
        if budget > self.max_context:
            raise ContextLengthError(
                f"prompt ({len(request.prompt_ids)} tokens) plus max_tokens ({request.params.max_tokens}) "
                f"exceeds the context length {self.max_context}"
            )
        if self.runtime.kv_slots(budget) > self.runtime.kv_capacity:
            raise ContextLengthError(
                f"request needs {self.runtime.kv_slots(budget)} KV slots, the cache has {self.runtime.kv_capacity}"
            )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream an answer; the last event carries the finish reason and the full result.

        Leaving the loop early cancels the sequence and frees its slot."""
        seq = self._submit(request)
        try:
            while True:
                event: TokenEvent | BaseException = await seq.events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if seq.finish_reason is None and not seq.failed:
                seq.cancelled = True
                self._wake()

    async def complete(self, request: GenerationRequest) -> GenerationResult:
        """Run to the end and return the full result."""
        async for event in self.generate(request):
            if event.result is not None:
                return event.result
        raise RuntimeError("generation ended without a result")  # unreachable: last event has one

    def _result_of(self, seq: _Sequence) -> GenerationResult:
        assert seq.finish_reason is not None, "_result_of needs a finished sequence"
        return GenerationResult(
            prompt_ids=list(seq.request.prompt_ids),
            output_ids=list(seq.output_ids),
            text="".join(seq.text_parts),
            finish_reason=seq.finish_reason,
            request_hash=seq.request_hash,
            params=seq.request.params,
            seed_source=seq.request.seed_source,
            client=seq.request.client,
            fingerprints=list(seq.fingerprints),
            time_to_first_token=(seq.first_token_at or seq.created) - seq.created,
            duration=time.perf_counter() - seq.created,
        )

    async def run_exclusive(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the engine's own thread, between batch steps: the runtime is not
        thread-safe, and a verifier's teacher-forced pass must not run inside a decode step.
        At most ``MAX_EXCLUSIVE_WAITING`` such jobs at once; past that, ``EngineBusyError``."""
        if self._closing:
            raise EngineBusyError("the engine is shutting down")
        if self._exclusive >= MAX_EXCLUSIVE_WAITING:
            raise EngineBusyError(f"{self._exclusive} re-checks are already waiting for this engine; retry later")
        self._exclusive += 1
        try:
            self._ensure_worker()
            done = self._loop.create_future()
            with self._lock:
                self._jobs.append((fn, args, done))
            self._wake()
            return await done
        finally:
            self._exclusive -= 1

    async def __aenter__(self) -> "Engine":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Cancel every sequence and stop the engine thread (``async with Engine(...)`` does it on leaving)."""
        self._closing = True
        with self._lock:
            for seq in self._waiting + self._running:
                seq.cancelled = True
        self._wake()
        if self._worker is not None:
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=True)
        self._samplers.shutdown(wait=True)

    # -- scheduling -----------------------------------------------------------------
    def _submit(self, request: GenerationRequest) -> _Sequence:
        if self._closing:
            raise EngineBusyError("the engine is shutting down")
        self.validate(request)
        if len(self._waiting) >= self.max_queue:
            raise EngineBusyError(f"{len(self._waiting)} requests are already waiting; retry later")
        if sum(s.request.client == request.client for s in self._waiting) >= self.max_queue_per_client:
            raise ClientShareError(f"this client already has {self.max_queue_per_client} requests waiting, "
                                   "its share of the queue; retry later")
        params = request.params
        grammar = None
        if params.grammar is not None:
            try:
                grammar = self.tokenizer.grammar_vocabulary(self.runtime.cfg.vocab_size).state(params.grammar)
            except GrammarError as exc:
                raise RequestError(f"the grammar cannot be used: {exc}") from None
        seq = _Sequence(
            seq_id=next(self._ids),
            request=request,
            request_hash=compute_request_hash(self.model_id, list(request.prompt_ids), params.to_canonical_dict()),
            events=asyncio.Queue(),
            text=AnswerText(self.tokenizer, params),
            grammar=grammar,
        )
        with self._lock:
            self._waiting.append(seq)
        self._ensure_worker()
        self._wake()
        return seq

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():  # not started yet, or died of a bug: (re)start
            self._loop = asyncio.get_running_loop()
            self._worker = self._loop.run_in_executor(self._executor, self._work)

    def _wake(self) -> None:
        self._work_ready.set()

    def _work(self) -> None:
        """The engine thread: step after step while there is work, asleep when there is none.

        It never waits for the event loop: each step's events are handed over with one
        ``call_soon_threadsafe`` and the next step starts at once (a round trip through the
        event loop between steps cost 0.3-1.3 ms a token on 2 vCPUs: two thread wake-ups).
        Requests, cancellations and exclusive jobs reach it through the locked lists and
        ``_work_ready``. Events are handed over at most every ``delivery_interval`` seconds
        (each hand-over wakes the event loop, whose thread then competes with the model step's
        for the cores), at once when an answer starts or ends, and before the thread sleeps or
        runs an exclusive job."""
        pending: list[tuple[_Sequence, TokenEvent]] = []
        delivered_at = time.perf_counter()
        while True:
            self._run_jobs()
            with self._lock:
                self._drop_cancelled()
                idle = not self._waiting and not self._running and not self._jobs
                if idle and self._closing:
                    return
                if idle:
                    self._work_ready.clear()  # under the lock: a submit after this sets it again
                else:
                    self._admit()
            if idle:
                if pending:
                    self._loop.call_soon_threadsafe(_deliver, pending)
                    pending = []
                self._work_ready.wait()
                continue
            try:
                outputs = self._step()
            except Exception as exc:  # a failed step fails the sequences in it, not the engine
                log.exception("engine step failed")
                with self._lock:
                    failed = list(self._running)
                    for seq in failed:
                        self._retire(seq)
                        seq.failed = True
                self._loop.call_soon_threadsafe(_deliver, pending + [(seq, exc) for seq in failed])
                pending = []
                continue
            self.steps_run += 1
            with self._lock:
                self._release_finished()
            pending += outputs
            now = time.perf_counter()
            # at once: a first token, a last one, or before an exclusive job holds the thread
            if (self._jobs or now - delivered_at >= self.delivery_interval
                    or any(e.finish_reason or len(s.output_ids) == 1 for s, e in outputs)):
                self._loop.call_soon_threadsafe(_deliver, pending)
                pending, delivered_at = [], now

    def _run_jobs(self) -> None:
        """Exclusive jobs, between steps, each answered on the event loop."""
        while True:
            with self._lock:
                if not self._jobs:
                    return
                fn, args, done = self._jobs.popleft()
            try:
                result, error = fn(*args), None
            except Exception as exc:  # noqa: BLE001 - handed to the job's caller
                result, error = None, exc
            self._loop.call_soon_threadsafe(_settle, done, result, error)

    def _kv_reservation(self, seq: _Sequence) -> int:
        """KV slots for a sequence's whole budget (prompt + max_tokens), in whole pages."""
        return self.runtime.kv_slots(len(seq.request.prompt_ids) + seq.request.params.max_tokens)

    def _admit(self) -> None:
        """Move waiting sequences into the batch while slots and KV pages last: each free slot
        to the waiting client with the fewest sequences running (first come among equals), none
        past ``RUNNING_SHARE_PER_CLIENT`` of the slots or the pages. The one chosen waits for pages
        if they are short (a large request is not overtaken for ever)."""
        slots = max(1, int(self.runtime.limits.max_batch_size * RUNNING_SHARE_PER_CLIENT))
        pages = max(self.runtime.kv_capacity * RUNNING_SHARE_PER_CLIENT, 1)
        reserved = sum(self._kv_reservation(s) for s in self._running)
        load = Counter(s.request.client for s in self._running)
        held = Counter()  # KV slots reserved per client
        for s in self._running:
            held[s.request.client] += self._kv_reservation(s)

        def within_share(seq: _Sequence) -> bool:
            client, need = seq.request.client, self._kv_reservation(seq)
            return load[client] < slots and (held[client] == 0 or held[client] + need <= pages)

        while self._waiting and len(self._running) < self.runtime.limits.max_batch_size:
            eligible = [s for s in self._waiting if within_share(s)]
            if not eligible:
                break
            seq = min(eligible, key=lambda s: load[s.request.client])  # min keeps the first of equals
            if reserved + self._kv_reservation(seq) > self.runtime.kv_capacity:
                break
            self._waiting.remove(seq)
            reserved += self._kv_reservation(seq)
            load[seq.request.client] += 1
            held[seq.request.client] += self._kv_reservation(seq)
            self._running.append(seq)

    def _prefill_plan(self, prefilling: list[_Sequence]) -> list[tuple[_Sequence, int]]:
        """This step's prefill: (sequence, end of its next chunk) pairs, at most
        ``prefill_tokens_per_step`` tokens in all (the first chunk always), one chunk at a time
        to the client whose prompts waited longest for one, each client's sequences in order."""
        chunk = self.runtime.limits.prefill_chunk
        queues: dict[str, deque[_Sequence]] = {}
        for seq in prefilling:
            queues.setdefault(seq.request.client, deque()).append(seq)
        self._prefill_turns = {c: t for c, t in self._prefill_turns.items() if c in queues}
        plan: list[tuple[_Sequence, int]] = []
        planned: dict[int, int] = {}  # seq id -> end of its last planned chunk
        used = 0
        while queues:
            client = min(queues, key=lambda c: self._prefill_turns.get(c, -1))
            seq = queues[client][0]
            start = planned.get(seq.seq_id, seq.prefilled)
            end = min(len(seq.request.prompt_ids), (start // chunk + 1) * chunk)
            if plan and used + end - start > self.prefill_tokens_per_step:
                break
            plan.append((seq, end))
            planned[seq.seq_id] = end
            used += end - start
            self._prefill_turns[client] = next(self._turns)
            if end == len(seq.request.prompt_ids):
                queues[client].popleft()
                if not queues[client]:
                    del queues[client]
        return plan

    def _retire(self, seq: _Sequence) -> None:
        """Take a sequence out of the batch and free its KV pages."""
        if seq in self._running:
            self._running.remove(seq)
        if seq.in_cache:
            self.runtime.remove_sequence(seq.seq_id)
            seq.in_cache = False

    def _drop_cancelled(self) -> None:
        self._waiting = [s for s in self._waiting if not s.cancelled]
        for seq in [s for s in self._running if s.cancelled]:
            self._retire(seq)

    def _release_finished(self) -> None:
        for seq in [s for s in self._running if s.finish_reason is not None]:
            self._retire(seq)

    # -- one step (worker thread) ---------------------------------------------------
    def _step(self) -> list[tuple[_Sequence, TokenEvent]]:
        """One step: this step's prefill chunks (``_prefill_plan``; a prompt's last chunk gives
        its first token), then one decode for every sequence that had a token before the step."""
        outputs: list[tuple[_Sequence, TokenEvent]] = []
        live = [s for s in self._running if s.finish_reason is None and not s.cancelled]
        decoding = [s for s in live if s.output_ids]
        for seq, end in self._prefill_plan([s for s in live if not s.output_ids]):
            if seq.cancelled:  # its client left while earlier chunks ran: no more work for it
                continue
            if not seq.in_cache:
                self.runtime.add_sequence(seq.seq_id)
                seq.in_cache = True
            logits = self.runtime.prefill(seq.seq_id, list(seq.request.prompt_ids[seq.prefilled:end]))
            seq.prefilled = end
            if end == len(seq.request.prompt_ids):
                outputs.append(self._accept(seq, logits[-1]))
        if decoding:
            last = [s.output_ids[-1] for s in decoding]
            logits = self.runtime.decode([s.seq_id for s in decoding], last)
            if len(decoding) == 1:
                outputs.append(self._accept(decoding[0], logits[0]))
            else:
                outputs.extend(self._samplers.map(self._accept, decoding, logits))
        return outputs

    def _accept(self, seq: _Sequence, logits: np.ndarray) -> tuple[_Sequence, TokenEvent]:
        """Sample one token for ``seq`` from its logits and turn it into events."""
        params = seq.request.params
        step = len(seq.output_ids)
        allowed = seq.grammar.allowed() if seq.grammar is not None else None
        token = sample_token(logits, params, bytes.fromhex(seq.request_hash), step, seq.output_ids, allowed)
        if seq.grammar is not None:
            seq.grammar.advance(token)
        fingerprint = position_fingerprint(logits, token)
        seq.fingerprints.append(fingerprint)
        seq.output_ids.append(token)
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        text, finish = seq.text.push(token)
        seq.text_parts.append(text)
        if finish is None:
            return seq, TokenEvent.of(token, text, fingerprint)
        seq.finish_reason = finish
        return seq, TokenEvent.of(token, text, fingerprint, finish, self._result_of(seq))

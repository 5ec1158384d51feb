"""The engine thread of `python -m runtime.serve`, and the server's Prometheus metrics.

The engine is not thread-safe, so one thread (`EngineLoop`) owns it: HTTP handlers on the asyncio loop
hand it submissions and aborts through a thread-safe queue; it admits them between scheduler steps,
steps while anything is unfinished and blocks on the queue when idle (no busy spin). It also turns
each request's tokens into text: incremental detokenization (never a split UTF-8 character), stop
strings cut with StopStringChecker, and abort_request the moment one appears, so the request's blocks
are freed in the same iteration. Events (Accepted / Failed / Delta) go back through each submission's
thread-safe `deliver`. If a step raises, every pending request gets a 500, new ones a 503, and
`healthy` turns False.

`Metrics` reads the loop's latest stats snapshot at scrape time (the engine itself is never touched
from another thread) and observes the latency histograms as requests finish.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from runtime.detokenize import IncrementalDetokenizer, StopStringChecker
from runtime.protocol import APIError
from runtime.sampling import SamplingParams


# -- what travels between the HTTP handlers and the engine thread ---------------------------------
@dataclass
class Submission:
    request_id: str
    index: int  # the choice (completions accept a batch of prompts)
    prompt_token_ids: list[int]
    params: SamplingParams
    deliver: Callable[[object], None]  # thread-safe: puts an event on the request's asyncio queue
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class Accepted:
    index: int


@dataclass
class Failed:
    index: int
    error: APIError


@dataclass
class Delta:
    index: int
    text: str
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Track:
    """Per-request state owned by the engine thread."""

    sub: Submission
    detok: IncrementalDetokenizer
    stops: StopStringChecker
    stop_ids: set[int]
    first_token_at: float | None = None
    last_token_at: float | None = None


_STOP = object()


class EngineLoop:
    """The one thread that owns the engine: add / abort / step, detokenization, stop strings."""

    def __init__(self, engine, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.active: dict[str, _Track] = {}
        self.error: BaseException | None = None
        self.stopped = False
        self.lock = threading.Lock()  # orders submit() against the loop dying or stopping
        self.snapshot = engine.stats()  # read by /metrics; replaced (never mutated) after each iteration
        self.eos_ids = set(getattr(engine, "eos_ids", ()) or ())
        self.thread = threading.Thread(target=self._run, name="kvq-engine", daemon=True)

    # -- called from any thread -------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    @property
    def healthy(self) -> bool:
        return self.error is None and self.thread.is_alive()

    def submit(self, sub: Submission) -> None:
        with self.lock:
            if self.error is not None or self.stopped:
                why = "server is shutting down" if self.error is None else f"engine loop died: {self.error!r}"
                sub.deliver(Failed(sub.index, APIError(503, why)))
                return
            self.inbox.put(("add", sub))

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        with self.lock:
            self.stopped = True
        self.inbox.put(_STOP)
        if self.thread.is_alive():
            self.thread.join(timeout)

    # -- the engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._drain(block=not self.engine.has_unfinished_requests()):
                if self.engine.has_unfinished_requests():
                    self._dispatch(self.engine.step())
                self.snapshot = self.engine.stats()
            self._fail_all(APIError(503, "server is shutting down"))
        except BaseException as e:  # whatever killed the loop goes to the clients and /health
            traceback.print_exc()
            with self.lock:
                self.error = e
            self._fail_all(APIError(500, f"engine loop died: {e!r}"))

    def _fail_all(self, error: APIError) -> None:
        with self.lock:  # nothing new gets in after this (submit sees error / stopped)
            items = []
            with contextlib.suppress(queue.Empty):
                while True:
                    items.append(self.inbox.get_nowait())
        for item in items:
            if item is not _STOP and item[0] == "add":
                item[1].deliver(Failed(item[1].index, error))
        for track in self.active.values():
            track.sub.deliver(Failed(track.sub.index, error))
        self.active.clear()

    def _drain(self, block: bool) -> bool:
        """Admit submissions and apply aborts; False once asked to stop."""
        items = [self.inbox.get()] if block else []
        with contextlib.suppress(queue.Empty):
            while True:
                items.append(self.inbox.get_nowait())
        for item in items:
            if item is _STOP:
                return False
            kind, x = item
            if kind == "add":
                self._add(x)
            elif x in self.active:  # abort of a request still running (finished ones are gone already)
                del self.active[x]
                self.engine.abort_request(x)
                if self.metrics:
                    self.metrics.finished("abort")
        return True

    def _add(self, sub: Submission) -> None:
        try:
            self.engine.add_request(sub.prompt_token_ids, sub.params, sub.request_id)
        except ValueError as e:  # RequestError: prompt + max_tokens beyond session_len or the pool
            sub.deliver(Failed(sub.index, APIError(400, str(e))))
            return
        except Exception as e:  # one bad request must not take the engine loop (and every client) down
            traceback.print_exc()
            sub.deliver(Failed(sub.index, APIError(500, f"could not add the request: {e!r}")))
            return
        p = sub.params
        stop_ids = set(p.stop_token_ids or ()) | (set() if p.ignore_eos else self.eos_ids)
        self.active[sub.request_id] = _Track(
            sub,
            IncrementalDetokenizer(self.engine.tokenizer, sub.prompt_token_ids),
            StopStringChecker(p.stop),
            stop_ids,
        )
        sub.deliver(Accepted(sub.index))

    def _dispatch(self, outputs) -> None:
        now = time.monotonic()
        for out in outputs:
            track = self.active.get(out.request_id)
            if track is None:  # aborted (client gone or stop string) while the step ran
                continue
            pieces, hit = [], False
            for k, tok in enumerate(out.new_token_ids):
                if self.metrics and track.last_token_at is not None:
                    self.metrics.itl.observe(now - track.last_token_at)
                track.first_token_at = track.first_token_at or now
                track.last_token_at = now
                last = k == len(out.new_token_ids) - 1
                if out.finished and last and out.finish_reason == "stop" and tok in track.stop_ids:
                    continue  # EOS / stop token: ends the answer, is not part of its text (as vLLM)
                piece, hit = track.stops.feed(track.detok.add(tok))
                pieces.append(piece)
                if hit:
                    break
            finished, reason = out.finished, out.finish_reason
            if hit:
                finished, reason = True, "stop"
                if not out.finished:
                    self.engine.abort_request(out.request_id)  # frees its blocks now
            elif out.finished:
                piece, hit = track.stops.feed(_final_text(track.detok))
                pieces.append(piece + track.stops.flush())
                reason = "stop" if hit else reason
            text = "".join(pieces)
            if text or finished:
                track.sub.deliver(
                    Delta(track.sub.index, text, finished, reason, out.num_prompt_tokens, out.num_output_tokens)
                )
            if finished:
                del self.active[out.request_id]
                if self.metrics:
                    self.metrics.request_done(track, now, reason)


def _final_text(detok: IncrementalDetokenizer) -> str:
    """What the detokenizer still holds at the end of a response, minus an incomplete UTF-8 tail (max_tokens
    cut a character short) where the detokenizer has `finish` for that; `flush` keeps the tail as U+FFFD."""
    finish = getattr(detok, "finish", None)
    return finish() if finish is not None else detok.flush()


# -- metrics --------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics in the app's own registry: engine gauges/counters read from the engine thread's
    latest stats snapshot at scrape time, latency histograms observed as requests finish."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.loop: EngineLoop | None = None
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100)
        self.ttft = Histogram(
            "kvq_time_to_first_token_seconds",
            "Arrival to first generated token",
            buckets=buckets,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "kvq_e2e_request_latency_seconds", "Arrival to the last token", buckets=buckets, registry=self.registry
        )
        self.itl = Histogram(
            "kvq_time_per_output_token_seconds",
            "Gap between consecutive tokens",
            buckets=buckets,
            registry=self.registry,
        )
        self._finished = Counter(
            "kvq_requests_finished", "Requests by finish reason", ["finished_reason"], registry=self.registry
        )
        self.registry.register(_EngineCollector(self))

    def request_done(self, track: _Track, now: float, reason: str | None) -> None:
        self.e2e.observe(now - track.sub.arrival)
        if track.first_token_at is not None:
            self.ttft.observe(track.first_token_at - track.sub.arrival)
        self.finished(reason or "stop")

    def finished(self, reason: str) -> None:
        self._finished.labels(reason).inc()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _EngineCollector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        loop = self.metrics.loop
        if loop is None:
            return
        s = loop.snapshot
        gauges = [
            ("kvq_num_requests_running", "Requests being prefilled or decoded", s.num_running),
            ("kvq_num_requests_waiting", "Requests queued for KV blocks", s.num_waiting),
            ("kvq_kv_blocks_total", "KV cache blocks in the pool", s.num_blocks),
            ("kvq_kv_blocks_used", "KV cache blocks in use", s.num_blocks - s.num_free_blocks),
            ("kvq_kv_cache_tokens", "Tokens the KV pool holds", s.kv_cache_tokens),
            ("kvq_engine_healthy", "1 while the engine loop runs", int(loop.healthy)),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        info = GaugeMetricFamily(
            "kvq_kv_cache_info", "KV cache storage dtype and block size", labels=["kv_dtype", "block_size"]
        )
        info.add_metric([str(s.kv_dtype), str(s.block_size)], 1)
        yield info
        counters = [
            ("kvq_generation_tokens", "Generated tokens", s.num_generated_tokens),
            ("kvq_prompt_tokens", "Prefilled prompt tokens", s.num_prompt_tokens),
            ("kvq_num_preemptions", "Requests preempted for lack of KV blocks", s.num_preemptions),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)

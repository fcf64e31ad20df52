"""The engine loop: one background thread owns the synchronous `Engine`; the asyncio side talks to it by messages.

The engine is not thread-safe, so every engine call (`add_request`, `step`, `abort`) happens on the loop thread.
The asyncio side puts ("add" | "abort" | "stop") commands on a thread-safe queue; the loop drains them between
steps (requests join and leave between denoising steps: continuous batching) and hands each step's events back in
one `loop.call_soon_threadsafe` call, which routes them into per-request `asyncio.Queue`s. The asyncio side alone
touches `_streams`, so no lock is needed there.

Failures: a request whose own step fails (its constraint hits a dead end, its detokenizer raises) is finished by
the engine alone with finish_reason "error" (`RequestOutput.error`); the HTTP layer answers it with an error.
Anything else that raises on the engine thread (a failed forward, a bug here) fails every request in flight with an
"error" event (500) and the loop goes on serving: no client is left waiting, and /health stays ok.

Admission control is here too: at most `max_num_seqs + max_waiting` requests are in flight; one more raises
`QueueFullError` (the HTTP layer answers 503 + Retry-After) instead of letting the queue grow without bound.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

from ..engine import Engine
from ..constraint import ConstraintError
from ..outputs import Failure, RequestOutput, StreamEvent
from ..sampling_params import SamplingParams
from ..parallel import CollectiveError
from .memory import kv_usage
from .metrics import ServerMetrics

log = logging.getLogger("dgemma.server")


class QueueFullError(RuntimeError):
    """Every slot is busy and the waiting queue is full."""


class EngineUnavailableError(RuntimeError):
    """The engine loop is not running (not started, shut down, or crashed)."""


class AsyncEngine:
    def __init__(self, engine: Engine, metrics: ServerMetrics, max_waiting: int = 64):
        self.engine, self.metrics, self.max_waiting = engine, metrics, max_waiting
        self.max_num_seqs = engine.cfg.max_num_seqs
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}  # asyncio thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # engine thread only: submission times (queue-wait metric) and which requests held a slot last step
        self._submitted: dict[str, tuple[float, int]] = {}
        self._held: set[str] = set()  # engine thread only: requests added and not yet answered (finished/error)
        self._stats = dict(engine.stats)

    # -- lifecycle (asyncio side) ------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="dgemma-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._cmds.put(("stop",))
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def capacity(self) -> int:
        return self.max_num_seqs + self.max_waiting

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    # -- requests (asyncio side) -------------------------------------------------------------------------------
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, images=None) -> asyncio.Queue:
        """Queue a request; its StreamEvents (and a final "finished" or "error" event) arrive on the returned queue."""
        if not self.alive:
            raise EngineUnavailableError("the engine loop is not running")
        if len(self._streams) >= self.capacity:
            raise QueueFullError(f"server busy: {self.max_num_seqs} requests running and {self.max_waiting} "
                                 "waiting (the queue is full); retry later")
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id}")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        self._cmds.put(("add", request_id, prompt_ids, params, time.monotonic(), images))  # [vision] images
        with self.metrics.lock:
            self.metrics.in_flight.set(len(self._streams))
        return q

    def abort(self, request_id: str) -> bool:
        """Cancel a request (client gone): it leaves the queue or frees its slot before the next step."""
        if self._streams.pop(request_id, None) is None:
            return False  # already finished
        self._cmds.put(("abort", request_id))
        with self.metrics.lock:
            self.metrics.finished.inc(finish_reason="cancelled")
            self.metrics.in_flight.set(len(self._streams))
        return True

    def _dispatch(self, events: list[StreamEvent]) -> None:
        for ev in events:
            q = self._streams.get(ev.request_id)
            if q is None:
                continue  # aborted while this step ran
            q.put_nowait(ev)
            if ev.kind in ("finished", "error"):
                del self._streams[ev.request_id]
        with self.metrics.lock:
            self.metrics.in_flight.set(len(self._streams))

    def _post(self, events: list[StreamEvent]) -> None:
        self._held.difference_update(ev.request_id for ev in events if ev.kind in ("finished", "error"))
        try:
            self._loop.call_soon_threadsafe(self._dispatch, events)
        except RuntimeError:
            pass  # the event loop has closed: the server is shutting down

    # -- the loop (engine thread) ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                if self._turn():
                    return
            except Exception as e:  # a bug outside the step: fail what is in flight, keep the thread alive
                log.exception("engine loop failed")
                self._fail_all(f"engine failure: {e}")

    def _turn(self) -> bool:
        """Take the commands that arrived, then step once (or update the gauges when idle); True: stop."""
        eng = self.engine
        try:
            # Block only when idle; while requests run, take whatever arrived and step again.
            cmd = self._cmds.get(timeout=1.0) if not eng.has_work() else self._cmds.get_nowait()
        except queue.Empty:
            cmd = None
        stop = False
        while cmd is not None:
            stop |= self._handle(cmd)
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                cmd = None
        if stop:
            return True
        if eng.has_work():
            self._step()
        else:
            self._gauges()
        return False

    def _fail_all(self, message: str) -> None:
        """End every request the engine holds with an "error" event (answered 500), freeing their slots. The
        engine state of the failed step goes with them."""
        eng = self.engine
        # Also those that finished in the failed step: their events were lost with it.
        ids = sorted(self._held | {s.id for s in eng.slots if s is not None} | {s.id for s in eng.waiting})
        for rid in ids:
            try:
                eng.fail(rid, Failure("internal", message))
            except Exception:  # pragma: no cover - _finish does only bookkeeping
                log.exception("could not free request %s", rid)
            self._submitted.pop(rid, None)
        self._post([StreamEvent(rid, "error", text_delta=message) for rid in ids])
        with self.metrics.lock:
            self.metrics.finished.inc(len(ids), finish_reason="error")

    def _handle(self, cmd: tuple) -> bool:
        if cmd[0] == "stop":
            return True
        if cmd[0] == "abort":
            try:
                self.engine.abort(cmd[1])
            except Exception as e:  # e.g. its detokenizer fails on the flush: free it without one
                log.exception("abort of %s failed", cmd[1])
                self.engine.fail(cmd[1], Failure("internal", f"abort failed: {e}"))
            self._submitted.pop(cmd[1], None)
            self._held.discard(cmd[1])
        elif cmd[0] == "add":
            _, rid, prompt, params, t0, images = cmd
            try:
                self.engine.add_request(prompt, params, rid, images=images)
                self._submitted[rid] = (t0, len(prompt))
                self._held.add(rid)
            except ConstraintError as e:  # its matcher could not be built for this tokenizer: the request's fault
                out = RequestOutput(rid, prompt, finished=True, finish_reason="error",
                                    error=Failure("constraint", str(e)))
                self._post([StreamEvent(rid, "finished", output=out)])
                with self.metrics.lock:
                    self.metrics.finished.inc(finish_reason="error")
            except Exception as e:  # validated on the asyncio side already; this is a last line of defence
                self._post([StreamEvent(rid, "error", text_delta=str(e))])
        return False

    def _step(self) -> None:
        eng = self.engine
        t0 = time.perf_counter()
        try:
            events = eng.step()
        except Exception as e:  # not one request's failure (the engine ends those alone): fail them all
            if isinstance(e, CollectiveError):  # [parallel] a rank is lost: fail everything and stop serving
                self._fatal(e)
                return
            log.exception("engine step failed")
            self._fail_all(f"engine failure: {e}")
            return
        try:
            self._account(events, time.perf_counter() - t0)
        except Exception:  # the events still go out: a client must not wait on a metrics bug
            log.exception("metrics update failed")
        if events := [ev for ev in events if ev.kind != "admitted"]:
            self._post(events)

    def _account(self, events: list[StreamEvent], dt: float) -> None:
        """The step's metrics, and the gauges (before the events go out: a client that saw its first event sees
        itself running)."""
        eng = self.engine
        now = time.monotonic()
        admitted = [ev.request_id for ev in events if ev.kind == "admitted" and ev.request_id in self._submitted]
        finished = [ev for ev in events if ev.kind == "finished"]
        stats, old = eng.stats, self._stats
        m = self.metrics
        with m.lock:
            m.step_time.observe(dt)
            for rid in admitted:
                t_sub, n_prompt = self._submitted[rid]
                m.queue_wait.observe(max(0.0, now - t_sub - dt))
                m.prompt_tokens.inc(n_prompt)
            for ev in finished:
                m.finished.inc(finish_reason=ev.output.finish_reason or "stop")
                for c in ev.output.canvases:
                    m.steps_per_canvas.observe(c.steps)
            m.forwards.inc(stats["forwards"] - old["forwards"])
            m.decoder_forwards.inc(stats["decoder_forwards"] - old["decoder_forwards"])
            m.generation_tokens.inc(stats["tokens"] - old["tokens"])
            m.canvases.inc(stats["canvases"] - old["canvases"])
            m.prefix_queries.inc(stats["prefix_cache_queries"] - old["prefix_cache_queries"])
            m.prefix_hits.inc(stats["prefix_cache_hits"] - old["prefix_cache_hits"])
            m.prefill_tokens.inc(stats["prefill_tokens"] - old["prefill_tokens"])
            m.preemptions.inc(stats["preemptions"] - old["preemptions"])
            if stats["forwards"]:
                m.tokens_per_forward.set(stats["tokens"] / stats["forwards"])
            if stats["decoder_forwards"]:
                m.tokens_per_decoder_forward.set(stats["tokens"] / stats["decoder_forwards"])
        self._stats = dict(stats)
        for rid in admitted:
            self._submitted.pop(rid, None)
        self._gauges()

    def _fatal(self, e: Exception) -> None:
        """[parallel] The tensor-parallel group broke: every request fails, the loop ends, the server shuts down
        (`dgemma serve` then exits non-zero)."""
        log.error("%s; shutting down", e)
        eng = self.engine
        ids = [s.id for s in eng.slots if s is not None] + [s.id for s in eng.waiting]
        self._post([StreamEvent(rid, "error", text_delta=f"engine failure: {e}") for rid in ids])
        self.fatal = str(e)
        self._cmds.put(("stop",))
        if self.on_fatal is not None:
            self.on_fatal(self.fatal)

    fatal: str | None = None
    on_fatal = None  # called with the message from the engine thread (the app stops uvicorn)

    def _gauges(self) -> None:
        with self.metrics.lock:
            self.metrics.queue_depth.set(len(self.engine.waiting))
            self.metrics.running.set(self.engine.num_running)
            used, allocated = kv_usage(self.engine.cache)
            self.metrics.kv_cache.set(used, state="used")
            self.metrics.kv_cache.set(allocated - used, state="free")
            pool = self.engine.pool
            self.metrics.kv_blocks.set(pool.num_used, state="used")
            self.metrics.kv_blocks.set(len(pool.lru), state="cached")
            self.metrics.kv_blocks.set(len(pool.free), state="free")
            self.metrics.kv_blocks.set(pool.reserved, state="reserved")

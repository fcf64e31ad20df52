"""Prometheus metrics for `dgemma serve`, in the text exposition format (version 0.0.4), written by hand.

Plain formatting rather than `prometheus_client`: a dozen counters, gauges and histograms do not justify a dependency,
and the output is the standard format any Prometheus scraper reads. Two threads write (the engine loop and the
asyncio side), so every update and the rendering take one lock; updates are a few dict operations, far below the cost
of one denoising step.
"""

from __future__ import annotations

import math
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(esc.items())) + "}"


def _num(x: float) -> str:
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) < 2**53):
        return str(int(x))
    return "+Inf" if x == math.inf else repr(float(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str):
        self.name, self.help = name, help_text
        self.values: dict[tuple, float] = {}

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(dict(k))} {_num(v)}" for k, v in sorted(self.values.items())]


class Counter(_Metric):
    kind = "counter"

    def inc(self, n: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0) + n

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0)


class Gauge(_Metric):
    kind = "gauge"

    def set(self, v: float, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] = v

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        super().__init__(name, help_text)
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if v <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets + (math.inf,), self.counts):
            acc += c
            out.append(f'{self.name}_bucket{{le="{_num(b)}"}} {acc}')
        return out + [f"{self.name}_sum {_num(self.sum)}", f"{self.name}_count {self.count}"]


class ServerMetrics:
    """The server's metrics. Call `update(fn)` to change several under the lock; `render()` for the scrape."""

    def __init__(self, max_num_seqs: int, max_waiting: int):
        self.lock = threading.Lock()
        c, g, h = Counter, Gauge, Histogram
        self.received = c("dgemma_requests_received_total", "Generation requests received, by endpoint.")
        self.finished = c("dgemma_requests_finished_total", "Generation requests ended, by finish reason "
                          "(stop, length, cancelled: the client went away, error).")
        self.errors = c("dgemma_http_errors_total", "Error responses sent, by HTTP status code.")
        self.prompt_tokens = c("dgemma_prompt_tokens_total", "Prompt tokens of admitted requests.")
        self.generation_tokens = c("dgemma_generation_tokens_total", "Output tokens committed.")
        self.forwards = c("dgemma_forwards_total", "Engine model forwards (each batches prefill, commit and "
                          "denoising rows of many requests).")
        self.decoder_forwards = c("dgemma_decoder_forwards_total", "Denoising steps, summed over requests.")
        self.canvases = c("dgemma_canvases_total", "Canvases committed.")
        self.tokens_per_forward = g("dgemma_tokens_per_forward", "Output tokens per engine forward, since start "
                                    "(parallel decoding times batching).")
        self.tokens_per_decoder_forward = g("dgemma_tokens_per_decoder_forward", "Output tokens per denoising step "
                                            "of one request, since start (parallel decoding alone).")
        self.queue_depth = g("dgemma_queue_depth", "Requests waiting for a slot.")
        self.running = g("dgemma_running_canvases", "Requests holding a slot (prefilling or denoising a canvas).")
        self.in_flight = g("dgemma_requests_in_flight", "Requests accepted and not yet ended.")
        self.max_num_seqs = g("dgemma_max_num_seqs", "Slots (concurrent requests the engine runs).")
        self.kv_cache = g("dgemma_kv_cache_bytes", "KV cache bytes: used (committed tokens of the slots in use, "
                          "sliding layers at most their window) and free (the rest of what is allocated: free blocks "
                          "of the full layers' pool, unfilled positions of held blocks, idle sliding rings).")
        self.kv_blocks = g("dgemma_kv_blocks", "Blocks of the full layers' paged KV pool: used (held by a request), "
                           "cached (prefix-cache blocks no request holds, reusable until evicted), free (neither), "
                           "reserved (promised to admitted requests, not yet allocated).")
        self.prefix_queries = c("dgemma_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = c("dgemma_prefix_cache_hits_total", "Prompt tokens found in the prefix cache (whole "
                             "blocks); the last layers' receptive field before a hit is still re-encoded.")
        self.prefill_tokens = c("dgemma_prefill_tokens_total", "Prompt tokens encoded (prefix-cache hits skipped).")
        self.preemptions = c("dgemma_preemptions_total", "Requests preempted for lack of KV blocks (always 0: "
                             "admission reserves every block a request can need).")
        self.max_waiting = g("dgemma_max_waiting", "Bound of the waiting queue.")
        self.steps_per_canvas = h("dgemma_denoising_steps_per_canvas", "Denoising steps each committed canvas took.",
                                  STEP_BUCKETS)
        self.ttft = h("dgemma_time_to_first_token_seconds", "From request arrival to its first committed text.",
                      LATENCY_BUCKETS)
        self.latency = h("dgemma_request_latency_seconds", "From request arrival to its end (finished requests).",
                         LATENCY_BUCKETS)
        self.queue_wait = h("dgemma_queue_wait_seconds", "From submission to the engine until a slot was taken.",
                            LATENCY_BUCKETS)
        self.step_time = h("dgemma_engine_step_seconds", "Duration of one engine step (one batched forward).",
                           LATENCY_BUCKETS)
        self.max_num_seqs.set(max_num_seqs)
        self.max_waiting.set(max_waiting)

    def all(self) -> list[_Metric]:
        return [m for m in vars(self).values() if isinstance(m, _Metric)]

    def render(self) -> str:
        with self.lock:
            lines = []
            for m in self.all():
                lines += m.header() + m.lines()
        return "\n".join(lines) + "\n"

    def sample(self, name: str, **labels: str) -> float:
        """One current value by metric name (tests and the benchmark read these)."""
        with self.lock:
            for m in self.all():
                if m.name == name and isinstance(m, (Counter, Gauge)):
                    return m.get(**labels)
        raise KeyError(name)


def parse_text(text: str) -> dict[str, float]:
    """A Prometheus text scrape -> {'name{labels}': value} (for tests and benchmarks, not a full parser)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out

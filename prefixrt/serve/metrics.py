"""The server's Prometheus metrics, in a registry of its own (never prometheus-client's global one), so that
several servers (tests, the benchmark's two) live in one process without sharing or clashing.

Names follow vLLM's where there is one (``prefixrt_`` instead of ``vllm:``). The engine loop thread sets the
gauges after every step and observes the latencies, measured from the moment the HTTP request arrived.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["CONTENT_TYPE_LATEST", "ServeMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _latency_histogram(name: str, documentation: str, registry: CollectorRegistry) -> Histogram:
    """A histogram of seconds in ``registry``, on the latency buckets (1 ms to 60 s)."""
    return Histogram(name, documentation, registry=registry, buckets=_LATENCY_BUCKETS)


class ServeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.running = Gauge("prefixrt_num_requests_running", "Requests in the engine's batch.", registry=r)
        self.waiting = Gauge(
            "prefixrt_num_requests_waiting", "Requests accepted and not yet running.", registry=r
        )
        self.kv_pool_bytes = Gauge(
            "prefixrt_kv_pool_bytes", "Bytes of the engine's preallocated K/V pool.", registry=r
        )
        self.kv_pool_rows = Gauge(
            "prefixrt_kv_pool_rows", "Rows of the K/V pool (max batch size).", registry=r
        )
        self.kv_pool_usage = Gauge(
            "prefixrt_kv_pool_usage_ratio", "Fraction of the K/V pool's rows in use (0 to 1).", registry=r
        )
        self.prefixes = Gauge("prefixrt_num_prefixes", "Prefixes in the bank.", registry=r)
        self.ttft = _latency_histogram(
            "prefixrt_time_to_first_token_seconds",
            "From the HTTP request's arrival to its first generated token.",
            r,
        )
        self.itl = _latency_histogram(
            "prefixrt_inter_token_latency_seconds", "Between two tokens of one request.", r
        )
        self.e2e = _latency_histogram(
            "prefixrt_e2e_request_latency_seconds",
            "From the HTTP request's arrival to its request's end (finished, stopped, aborted or failed).",
            r,
        )
        self.generation_tokens = Counter(
            "prefixrt_generation_tokens", "Tokens generated (every request).", registry=r
        )
        self.prompt_tokens = Counter(
            "prefixrt_prompt_tokens", "Prompt tokens of accepted requests.", registry=r
        )
        self.accepted = Counter(
            "prefixrt_requests_accepted",
            "Engine requests accepted (one per choice of each prompt); each ends once, in prefixrt_requests.",
            registry=r,
        )
        self.requests = Counter(
            "prefixrt_requests",
            "Engine requests that ended, by model (a prefix name or the base model) and how they ended "
            "(stop, length, aborted, failed, error).",
            ["model", "finish_reason"],
            registry=r,
        )
        self.http_errors = Counter(
            "prefixrt_http_errors", "Error answers, by HTTP status.", ["status"], registry=r
        )
        self.steps = Counter("prefixrt_engine_steps", "Engine steps run.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

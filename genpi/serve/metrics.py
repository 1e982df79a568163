"""genpi serve's Prometheus metrics, served at GET /metrics in Prometheus' text format (prometheus-client).

    genpi_requests_total{model, status}            chat completion requests answered, by HTTP status
    genpi_prompt_tokens_total{model}               tokens in: prompt tokens of the completions the engine ran
    genpi_completion_tokens_total{model}           tokens out: tokens the engine generated
    genpi_queue_depth{model}                       requests in the engine now (waiting for a row or generating)
    genpi_time_to_first_token_seconds{model}       from a request's arrival to its first generated token
    genpi_request_duration_seconds{model}          from a request's arrival to its completion

`model` is what a request asked for (a prompt id, or the base's name), one of those served; a request refused
before its model was read (bad JSON, a wrong key) counts under model="". Each app has a registry of its own, so
several apps (tests) count apart.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from genpi.engines import Completion

CONTENT_TYPE = CONTENT_TYPE_LATEST
# seconds: from a small model on a GPU (tens of ms) to a long prompt on a busy CPU
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServeMetrics:
    """The metrics of one app; the app calls `submitted` as a request enters the engine, `finished` as it leaves,
    `answered` once its HTTP status is known."""

    def __init__(self, models: list[str]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "genpi_requests", "chat completion requests answered", ["model", "status"], registry=self.registry
        )
        self.prompt_tokens = Counter(
            "genpi_prompt_tokens", "prompt tokens of the completions run (tokens in)", ["model"], registry=self.registry
        )
        self.completion_tokens = Counter(
            "genpi_completion_tokens", "tokens generated (tokens out)", ["model"], registry=self.registry
        )
        self.queue = Gauge(
            "genpi_queue_depth",
            "requests in the engine: waiting for a row or generating",
            ["model"],
            registry=self.registry,
        )
        self.first_token = Histogram(
            "genpi_time_to_first_token_seconds",
            "from a request's arrival to its first generated token",
            ["model"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.duration = Histogram(
            "genpi_request_duration_seconds",
            "from a request's arrival to its completion",
            ["model"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        for model in models:  # every served model's series from the start, at 0
            for metric in (self.prompt_tokens, self.completion_tokens, self.queue, self.first_token, self.duration):
                metric.labels(model)

    def submitted(self, model: str) -> None:
        self.queue.labels(model).inc()

    def finished(self, model: str, completion: Completion, first_token_s: float | None, seconds: float) -> None:
        self.queue.labels(model).dec()
        self.prompt_tokens.labels(model).inc(completion.prompt_tokens)
        self.completion_tokens.labels(model).inc(completion.completion_tokens)
        if first_token_s is not None:
            self.first_token.labels(model).observe(first_token_s)
        self.duration.labels(model).observe(seconds)

    def answered(self, model: str, status: int) -> None:
        self.requests.labels(model, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

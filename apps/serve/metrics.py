"""The server's Prometheus metrics (prometheus-client), modelled on Triton's ``nv_inference_*`` counters:
requests by model and outcome, where a request's time goes (parse, queue, compute, serialise, in all),
executed batch sizes, queue depth and requests in flight. Each application has its own registry, so
several can live in one process (tests, embedding)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds: from 50 us (parsing a small tensor) to 30 s (the default request timeout).
TIME_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Every metric the server keeps, in one registry."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dlpipe_requests", "Inference requests by model and outcome "
                                "(success, bad_request, not_found, overloaded, timeout, error).",
                                ["model", "outcome"], registry=r)
        self.request_seconds = Histogram("dlpipe_request_duration_seconds", "Whole request handling time.",
                                         ["model"], buckets=TIME_BUCKETS, registry=r)
        self.parse_seconds = Histogram("dlpipe_parse_duration_seconds", "Parsing a request body into tensors.",
                                       ["model"], buckets=TIME_BUCKETS, registry=r)
        self.queue_seconds = Histogram("dlpipe_queue_duration_seconds", "Time a request waited in the queue.",
                                       ["model"], buckets=TIME_BUCKETS, registry=r)
        self.compute_seconds = Histogram("dlpipe_compute_duration_seconds",
                                         "Time of one model execution (a whole batch).", ["model"],
                                         buckets=TIME_BUCKETS, registry=r)
        self.serialize_seconds = Histogram("dlpipe_serialize_duration_seconds", "Encoding a response.",
                                           ["model"], buckets=TIME_BUCKETS, registry=r)
        self.batch_size = Histogram("dlpipe_batch_size", "Rows per model execution (dynamic batching).",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.rows = Counter("dlpipe_inference_rows", "Rows inferred (Triton: nv_inference_count).", ["model"],
                            registry=r)
        self.executions = Counter("dlpipe_inference_executions",
                                  "Model executions (Triton: nv_inference_exec_count).", ["model"], registry=r)
        self.queue_depth = Gauge("dlpipe_queue_depth", "Requests waiting for a model.", ["model"], registry=r)
        self.in_flight = Gauge("dlpipe_requests_in_flight", "Inference requests being handled.", registry=r)

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)

"""`GET /metrics` of sodiff-serve: Prometheus text from prometheus_client, kept by the ingress
(one process sees every request): requests by route and status, request latency, the
pipeline stages of each restored image (its Server-Timing), requests in flight, batch sizes,
tau and the predicted QF."""
from __future__ import annotations

from .config import HEADER_PREFIX

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
TAU_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
QF_BUCKETS = (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServeMetrics:
    """The service's metrics, in a registry of its own (several services in one process, as in
    the tests, never collide)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("sodiff_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("sodiff_request_seconds", "Seconds from request to response, "
                                 "by route", ["route"], buckets=STAGE_BUCKETS, registry=r)
        self.stages = Histogram("sodiff_stage_seconds", "Seconds per pipeline stage of each "
                                "restored image (its Server-Timing)", ["stage"],
                                buckets=STAGE_BUCKETS, registry=r)
        self.inflight = Gauge("sodiff_requests_in_flight", "Requests waiting or restoring, over "
                              "all replicas", registry=r)
        self.batch = Histogram("sodiff_batch_requests", "Requests restored in one batch call",
                               buckets=BATCH_BUCKETS, registry=r)
        self.tau = Histogram("sodiff_tau", "Timestep tau of restored images",
                             buckets=TAU_BUCKETS, registry=r)
        self.qf = Histogram("sodiff_qf_predicted", "Predicted JPEG quality of restored images",
                            buckets=QF_BUCKETS, registry=r)

    def observe(self, route: str, status: int, seconds: float, headers) -> None:
        """One answered request; a restored image's headers fill the image metrics."""
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status != 200 or route != "/restore":
            return
        for part in headers.get("server-timing", "").split(","):
            stage, _, dur = part.strip().partition(";dur=")
            if stage and dur:
                self.stages.labels(stage).observe(float(dur) / 1000)
        for name, metric in (("Batch", self.batch), ("Tau", self.tau), ("QF", self.qf)):
            value = headers.get(HEADER_PREFIX + name)
            if value is not None:
                metric.observe(float(value))

    def text(self, inflight: int | None) -> tuple[bytes, str]:
        """The exposition (and its content type), with the in-flight gauge read now."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if inflight is not None:
            self.inflight.set(inflight)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

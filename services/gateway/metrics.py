"""/metrics in Prometheus text: the deployment's figures, asked of the control plane at each
scrape (the gateway keeps none), and this gateway's own broker figures from FastStream's
Prometheus middleware."""

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from ..settings import Settings

BROKER_REGISTRY = CollectorRegistry()  # what FastStream's middleware counts in this process


def broker_middleware(settings: Settings):
    if settings.broker_kind == "rabbit":  # each imports its broker's client (see bus._wire)
        from faststream.rabbit.prometheus import RabbitPrometheusMiddleware as kind
    else:
        from faststream.kafka.prometheus import KafkaPrometheusMiddleware as kind
    return kind(registry=BROKER_REGISTRY, app_name="conveyor-gateway")


def render(figures: dict[str, Any]) -> bytes:
    """The control plane's figures (Client.deployment_metrics) and the broker's, as text."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Deployment(figures))
    return generate_latest(registry) + generate_latest(BROKER_REGISTRY)


class _Deployment:
    def __init__(self, figures: dict[str, Any]) -> None:
        self.figures = figures

    def collect(self):
        figures = self.figures
        tasks = GaugeMetricFamily("conveyor_tasks", "Tasks the control plane holds (finished "
                                  "ones until their TTL), by service and status",
                                  labels=["service", "status"])
        depth = GaugeMetricFamily("conveyor_queue_depth", "Tasks waiting to start, by service",
                                  labels=["service"])
        for row in figures["tasks"]:
            tasks.add_metric([row["service"], row["status"]], row["count"])
            if row["status"] == "queued":
                depth.add_metric([row["service"]], row["count"])
        yield tasks
        yield depth
        retries = CounterMetricFamily("conveyor_task_retries", "Attempts after the first, of "
                                      "the tasks held, by service", labels=["service"])
        for service, count in figures["retries"].items():
            retries.add_metric([service], count)
        yield retries
        durations = HistogramMetricFamily(
            "conveyor_task_duration_seconds", "Seconds from a task's creation (its wait in the "
            "queue included) to its end, of the finished tasks held, by service",
            labels=["service"])
        bounds = figures["bucket_bounds"]
        for service, found in figures["durations"].items():
            buckets = [(str(bound), n) for bound, n in zip(bounds, found["buckets"], strict=True)]
            durations.add_metric([service], [*buckets, ("+Inf", found["count"])],
                                 sum_value=found["sum"])
        yield durations
        counted = figures["counters"]
        yield CounterMetricFamily("conveyor_tasks_recovered", "Tasks dispatched again after "
                                  "their worker went silent",
                                  value=counted.get("tasks_recovered", 0))
        yield CounterMetricFamily("conveyor_stale_attempts_rejected", "Results, events and "
                                  "checkpoints of replaced attempts, rejected",
                                  value=counted.get("stale_attempts_rejected", 0))

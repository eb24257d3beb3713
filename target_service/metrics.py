"""Prometheus metrics, one registry per app so that several apps can live in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.queries = Counter(
            "mlaas_queries", "Images answered and charged", ["model"], registry=self.registry
        )
        self.requests = Counter(
            "mlaas_predict_requests", "Predict requests answered", ["model"], registry=self.registry
        )
        self.refusals = Counter(
            "mlaas_refusals", "Requests refused, by error code", ["code"], registry=self.registry
        )
        self.alarms = Counter(
            "mlaas_alarms", "Detector alarms raised", ["model", "detector"], registry=self.registry
        )
        self.detector_errors = Counter(
            "mlaas_detector_errors",
            "Detector failures (the detector is rebuilt from the query log on the client's next "
            "request)",
            ["model", "detector"],
            registry=self.registry,
        )
        self.input_flagged = Counter(
            "mlaas_input_flagged",
            "Images an input defence flagged as adversarial (TARGET_INPUT_DEFENSES)",
            ["model"],
            registry=self.registry,
        )
        self.input_rejected = Counter(
            "mlaas_input_rejected",
            "Images an input defence refused to answer (charged, label null)",
            ["model"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mlaas_predict_seconds", "Predict latency", ["model"], registry=self.registry
        )

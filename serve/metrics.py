"""Prometheus metrics of the gateway, with bounded label sets (tenant, deployment, adapter
digest, variant)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

__all__ = ["Metrics", "OTHER"]

OTHER = "_other"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_CONFIDENCE_BUCKETS = (
    -5,
    -3,
    -2,
    -1.5,
    -1,
    -0.7,
    -0.5,
    -0.3,
    -0.2,
    -0.1,
    -0.05,
    -0.02,
    -0.01,
    -0.001,
    0,
)


class Metrics:
    """All gateway metrics in one registry. Past `max_series` (tenant, deployment, adapter) label
    sets, new ones are counted under `_other`, so a tenant with thousands of names cannot blow up
    Prometheus. Variants are "stable", "canary" or an A/B test's versions, a handful per
    deployment."""

    def __init__(self, max_series: int = 1000) -> None:
        self.registry = CollectorRegistry()
        self.max_series = max_series
        self._seen: set[tuple[str, str, str, str]] = set()
        labels = ["tenant", "deployment", "adapter", "variant"]
        self.requests = Counter(
            "lorafleet_requests",
            "Chat requests by outcome",
            [*labels, "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "lorafleet_request_errors",
            "Failed chat requests by error code",
            [*labels, "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lorafleet_request_latency_seconds",
            "Chat request latency",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "lorafleet_time_to_first_token_seconds",
            "Streaming time to first chunk",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "lorafleet_tokens", "Tokens processed", [*labels, "kind"], registry=self.registry
        )
        self.engine_up = Gauge(
            "lorafleet_engine_up", "1 while the engine answers", registry=self.registry
        )
        self.engine = Info(
            "lorafleet_engine",
            "The served base model, its quantization and the hardware",
            registry=self.registry,
        )
        self.engine_restarts = Counter(
            "lorafleet_engine_restarts", "Engine (re)starts after a failure", registry=self.registry
        )
        self.engine_start_seconds = Gauge(
            "lorafleet_engine_start_seconds",
            "Duration of the last engine start",
            registry=self.registry,
        )
        self.engine_state = Gauge(
            "lorafleet_engine_state",
            "1 for the engine's current state (starting, up, "
            "restarting, crash_loop, unreachable, stopped)",
            ["state"],
            registry=self.registry,
        )
        self.engine_failed_starts = Gauge(
            "lorafleet_engine_failed_starts",
            "Engine starts in a row that failed",
            registry=self.registry,
        )
        self.engine_last_exit_code = Gauge(
            "lorafleet_engine_last_exit_code",
            "Exit code of the last engine process "
            "that exited by itself (negative: the signal that ended it)",
            registry=self.registry,
        )
        self.engine_supervision_errors = Counter(
            "lorafleet_engine_supervision_errors",
            "Unexpected errors in engine supervision (logged with their traceback)",
            registry=self.registry,
        )
        self.adapter_loads = Counter(
            "lorafleet_adapter_loads",
            "Adapter registrations on the engine",
            ["outcome"],
            registry=self.registry,
        )
        self.adapter_load_seconds = Histogram(
            "lorafleet_adapter_load_seconds",
            "Adapter registration time",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30),
            registry=self.registry,
        )
        # one series per replica of the fleet; a replica that leaves takes its series along
        replica = ["replica"]
        self.adapter_resident = Gauge(
            "lorafleet_adapter_resident",
            "Adapters in the replica's memory (tier cpu, GPU ones included) and GPU slots (tier "
            "gpu), as the gateway's model of vLLM's LRU caches says",
            [*replica, "tier"],
            registry=self.registry,
        )
        self.adapter_cold_loads = Counter(
            "lorafleet_adapter_cold_loads",
            "Requests whose registered adapter had left the replica's memory: read from disk first",
            replica,
            registry=self.registry,
        )
        self.adapter_evictions = Counter(
            "lorafleet_adapter_evictions",
            "Adapters pushed out of the replica's memory (tier cpu) or GPU slots (tier gpu)",
            [*replica, "tier"],
            registry=self.registry,
        )
        self.adapter_stray_unloads = Counter(
            "lorafleet_adapter_stray_unloads",
            "Copies of adapters unloaded from a replica that is not their home, once idle",
            replica,
            registry=self.registry,
        )
        self.replica_up = Gauge(
            "lorafleet_replica_up",
            "1 while the replica answers and takes requests",
            replica,
            registry=self.registry,
        )
        self.replica_requests = Gauge(
            "lorafleet_replica_requests",
            "Requests on the replica at its last scrape (vLLM's running and waiting)",
            [*replica, "state"],
            registry=self.registry,
        )
        self.replica_adapters = Gauge(
            "lorafleet_replica_adapters",
            "Adapters registered on the replica",
            replica,
            registry=self.registry,
        )
        self.placements = Counter(
            "lorafleet_placements",
            "Chat requests placed on a replica, by why that one",
            [*replica, "reason"],
            registry=self.registry,
        )
        self.placement_spills = Counter(
            "lorafleet_placement_spills",
            "Chat requests whose adapter's home replica "
            "was at its load bound, so another served them",
            registry=self.registry,
        )
        self.failovers = Counter(
            "lorafleet_failovers",
            "Chat requests sent again to another replica after theirs failed to answer",
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "lorafleet_rate_limited",
            "Chat requests refused by a tenant limit (429)",
            ["tenant", "limit"],
            registry=self.registry,
        )
        self.fair_queue_waiting = Gauge(
            "lorafleet_fair_queue_waiting",
            "Chat requests waiting for an engine slot",
            registry=self.registry,
        )
        self.catalog_connections = Gauge(
            "lorafleet_catalog_connections_in_use",
            "Catalog connections checked out of the pool now",
            registry=self.registry,
        )
        rollout = ["tenant", "deployment"]
        self.rollout_phase = Gauge(
            "lorafleet_rollout_phase",
            "1 for the current phase of the deployment's rollout",
            [*rollout, "phase"],
            registry=self.registry,
        )
        self.rollout_step = Gauge(
            "lorafleet_rollout_step",
            "Index of the current canary step",
            rollout,
            registry=self.registry,
        )
        self.rollout_weight = Gauge(
            "lorafleet_rollout_canary_weight_percent",
            "Canary traffic share",
            rollout,
            registry=self.registry,
        )
        self.rollout_srm_p = Gauge(
            "lorafleet_rollout_srm_pvalue",
            "Sample-ratio-mismatch p-value at the last look",
            rollout,
            registry=self.registry,
        )
        self.rollout_decisions = Counter(
            "lorafleet_rollout_decisions",
            "Recorded rollout decisions",
            [*rollout, "action", "reason"],
            registry=self.registry,
        )

        drift, by_variant = ["tenant", "deployment"], ["tenant", "deployment", "variant"]
        self.validation_score = Gauge(
            "lorafleet_validation_score",
            "Mean task score of the last validation replay",
            by_variant,
            registry=self.registry,
        )
        self.validation_exact_match = Gauge(
            "lorafleet_validation_exact_match_rate",
            "Share of validation answers equal to the version's baseline",
            by_variant,
            registry=self.registry,
        )
        self.input_drift_p = Gauge(
            "lorafleet_input_drift_pvalue",
            "p-value of the last input-drift look",
            drift,
            registry=self.registry,
        )
        self.input_drift_alarm = Gauge(
            "lorafleet_input_drift_alarm",
            "1 when the last input look is an alarm (after alpha spending and Benjamini-Hochberg)",
            drift,
            registry=self.registry,
        )
        self.output_drift_p = Gauge(
            "lorafleet_output_drift_pvalue",
            "p-value of the last output-drift look",
            by_variant,
            registry=self.registry,
        )
        self.output_drift_alarm = Gauge(
            "lorafleet_output_drift_alarm",
            "1 when the last output look is an alarm",
            by_variant,
            registry=self.registry,
        )
        self.output_tokens_mean = Gauge(
            "lorafleet_output_drift_tokens_mean",
            "Mean answer length in the last drift window",
            by_variant,
            registry=self.registry,
        )
        self.output_empty_rate = Gauge(
            "lorafleet_output_drift_empty_rate",
            "Empty or refusing answers in the last drift window",
            by_variant,
            registry=self.registry,
        )
        self.output_format_validity = Gauge(
            "lorafleet_output_drift_format_validity",
            "Answers valid against the deployment's format in the last drift window",
            by_variant,
            registry=self.registry,
        )
        self.confidence_drift_p = Gauge(
            "lorafleet_confidence_drift_pvalue",
            "p-value of the last output-confidence "
            "look (answers' mean token log-probability against the baseline replay)",
            by_variant,
            registry=self.registry,
        )
        self.confidence_drift_alarm = Gauge(
            "lorafleet_confidence_drift_alarm",
            "1 when the last output-confidence "
            "look is an alarm (after alpha spending and Benjamini-Hochberg)",
            by_variant,
            registry=self.registry,
        )
        self.output_confidence_mean = Gauge(
            "lorafleet_output_confidence_mean",
            "Mean of the answers' mean token log-probability in the last drift window",
            by_variant,
            registry=self.registry,
        )

        # the feedback loop: confidence of every answer, users' feedback, captured requests, the
        # request log
        self.confidence = Histogram(
            "lorafleet_response_confidence",
            "Answers' mean token log-probability",
            labels,
            buckets=_CONFIDENCE_BUCKETS,
            registry=self.registry,
        )
        self.feedback = Histogram(
            "lorafleet_feedback_value",
            "Users' feedback on answers, on [0, 1] (thumbs down 0, up 1)",
            ["tenant", "deployment", "variant"],
            buckets=(0.0, 0.25, 0.5, 0.75, 1.0),
            registry=self.registry,
        )
        self.captures = Counter(
            "lorafleet_captures",
            "Live requests kept in full for retraining",
            ["tenant", "deployment"],
            registry=self.registry,
        )
        self.request_log_dropped = Counter(
            "lorafleet_request_log_dropped",
            "Request-log rows lost: the buffer was full, or the catalog refused them",
            registry=self.registry,
        )
        self.usage_flush_failures = Counter(
            "lorafleet_usage_flush_failures",
            "Usage writes the catalog refused (the usage is kept and written with the next)",
            registry=self.registry,
        )
        self.budget_used = Gauge(
            "lorafleet_budget_used_ratio",
            "How much of a tenant's budget its current period has spent (1: all of it), as this "
            "gateway last saw the shared counters",
            ["tenant", "period"],
            registry=self.registry,
        )
        self.budget_alert_at = Gauge(
            "lorafleet_budget_alert_ratio",
            "A tenant budget's alert threshold (a fraction of the budget)",
            ["tenant", "period"],
            registry=self.registry,
        )
        self.budget_events = Counter(
            "lorafleet_budget_events",
            "Budget alert thresholds crossed (event=alert) and budgets spent (event=exceeded), "
            "counted once per period by the gateway that recorded it",
            ["tenant", "period", "event"],
            registry=self.registry,
        )
        self.gc_deleted = Counter(
            "lorafleet_gc_deleted",
            "Garbage collected by this gateway: orphan blobs, temporary "
            "and scratch entries, and catalog rows past retention",
            ["kind"],
            registry=self.registry,
        )

    def labels(
        self, tenant: str, deployment: str, digest: str, variant: str
    ) -> tuple[str, str, str, str]:
        """Label values for one request, or `_other` once the series budget is spent."""
        key = (tenant, deployment, digest[:12], variant)
        if key in self._seen:
            return key
        if len(self._seen) < self.max_series:
            self._seen.add(key)
            return key
        return (OTHER, OTHER, OTHER, OTHER)

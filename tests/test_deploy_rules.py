"""The shipped alert rules and dashboard only use metrics the gateway exports, with labels it
sets."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from lorafleet.serve.metrics import Metrics

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "alerts.yml"


def _exported() -> dict[str, set[str]]:
    """Every sample name the gateway exports, with its label names (one series of each metric)."""
    metrics = Metrics()
    for metric in metrics.registry._names_to_collectors.values():
        if metric._labelnames:
            metric.labels(*["x"] * len(metric._labelnames))
    samples: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    assert generate_latest(metrics.registry)  # and the registry renders
    return samples


def test_alert_rules_reference_exported_metrics_and_labels():
    exported = _exported()
    rules = [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]
    assert {r["alert"] for r in rules} >= {
        "LorafleetRolloutRolledBack",
        "LorafleetRolloutAborted",
        "LorafleetRolloutSampleRatioMismatch",
        "LorafleetValidationReplayChanged",
        "LorafleetInputDrift",
        "LorafleetOutputDrift",
        "LorafleetConfidenceDrift",
    }
    for rule in rules:
        used = re.findall(r"(lorafleet_[a-z_]+)(?:\{([^}]*)\})?", rule["expr"])
        assert used, rule["alert"]
        for name, selector in used:
            assert name in exported, f"{rule['alert']}: {name} is not exported"
            for label in re.findall(r"(\w+)\s*[=!]~?", selector):
                assert label in exported[name], f"{rule['alert']}: {name} has no label {label}"
        for label in re.findall(r"by \(([^)]*)\)", rule["expr"]):
            for name in (n.strip() for n in label.split(",")):
                assert any(name in labels for labels in exported.values()), (
                    f"{rule['alert']}: label {name}"
                )


def test_drift_alerts_fire_on_the_corrected_alarm_of_each_variant():
    """Not on a raw p-value: the alarm gauges are already corrected for repeated looks and many
    deployments."""
    rules = {
        rule["alert"]: rule
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    }
    for alert, gauge in (
        ("LorafleetOutputDrift", "lorafleet_output_drift_alarm"),
        ("LorafleetConfidenceDrift", "lorafleet_confidence_drift_alarm"),
    ):
        rule = rules[alert]
        assert rule["expr"] == f"max by (tenant, deployment, variant) ({gauge}) == 1", alert
        assert (
            rule["labels"] == {"severity": "warning"}
            and "{{ $labels.variant }}" in rule["annotations"]["summary"]
        )


def test_dashboard_panels_query_exported_metrics():
    import json

    exported = _exported()
    dashboard = json.loads((RULES.parent.parent / "grafana" / "lorafleet.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert any("lorafleet_validation_exact_match_rate" in e for e in exprs)
    for expr in exprs:
        for name in re.findall(r"lorafleet_[a-z_]+", expr):
            assert name in exported, f"{name} in {expr!r} is not exported"

"""Staged canary rollouts and A/B tests of a deployment."""

from __future__ import annotations

import json
import time
from typing import Annotated, Optional

import typer
from rich.table import Table

from lorafleet.serve.cli.common import (
    DEFAULT_URL,
    ApiKey,
    Url,
    console,
    group,
    progress,
    when,
    working,
)
from lorafleet.serve.gateway_client import LorafleetClient
from lorafleet.serve.rollouts.series import MAX_BUCKET_S, MIN_BUCKET_S

__all__ = ["rollout", "ab"]

rollout = group("Staged canary rollouts with a validation gate (tenant key).")
ab = group("A/B tests with fixed weights (tenant key).")


def _seconds(value: str) -> float:
    """60, 60s, 2m, 1h -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (value[:-1], units[value[-1]]) if value and value[-1] in units else (value, 1)
    try:
        seconds = float(number) * unit
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a duration: use e.g. 60s, 5m or 1h") from None
    if seconds <= 0:
        raise typer.BadParameter(f"{value!r}: the interval must be positive")
    return seconds


def _steps(value: str) -> list[float]:
    try:
        return [float(part) for part in value.split(",")]
    except ValueError:
        raise typer.BadParameter(
            f"{value!r}: steps are comma-separated percents, e.g. 10,25,50,100"
        ) from None


def _print_rollout(r: dict, decisions: int = 8) -> None:
    colors = {"Promoted": "green", "RolledBack": "red", "GateRefused": "red", "Aborted": "yellow"}
    color = colors.get(r["phase"], "cyan")
    step = (
        f"step {r['step_index'] + 1}/{len(r['steps'])}"
        if r["kind"] == "canary" and r["step_index"] >= 0
        else r["kind"]
    )
    console.print(
        f"[bold]{r['deployment']}[/bold] {r['kind']} #{r['id']}: "
        f"[{color}]{r['phase']}[/{color}] ({step}) - {r['reason']}: {r['message']}",
        highlight=False,
    )
    table = Table("variant", "version", "digest", "weight")
    for v in r["variants"]:
        table.add_row(v["label"], v["ref"], v["digest"][:12], f"{v['weight']:g}%")
    console.print(table)
    if r["decisions"]:
        history = Table("time", "action", "reason", "actor", "message", title="decisions")
        for d in r["decisions"][-decisions:]:
            history.add_row(
                when(d["at"], "%H:%M:%S"), d["action"], d["reason"], d["actor"], d["message"]
            )
        console.print(history)


@rollout.command("start")
def rollout_start(
    deployment: str,
    to: Annotated[str, typer.Option(help="Candidate: NAME, NAME@N or a digest.")],
    steps: Annotated[str, typer.Option(help="Canary weight per step, percent.")] = "10,25,50,100",
    min_requests: Annotated[
        int, typer.Option(min=1, help="Per variant and step before advancing.")
    ] = 100,
    interval: Annotated[
        str, typer.Option(help="Minimum time per step, and between looks (60s, 5m).")
    ] = "60s",
    margin: Annotated[
        float, typer.Option(min=0, max=1, help="Validation-gate non-inferiority margin.")
    ] = 0.05,
    gate: Annotated[
        bool, typer.Option(help="Run the validation-set gate before any traffic.")
    ] = True,
    feedback_rollback: Annotated[
        bool,
        typer.Option(
            help="Roll back when users' feedback on the canary is worse than on stable by more "
            "than the margin."
        ),
    ] = False,
    feedback_min: Annotated[
        int, typer.Option(min=1, help="Feedback per variant before it may roll back.")
    ] = 30,
    feedback_margin: Annotated[
        float, typer.Option(min=0, max=1, help="Tolerated drop of the mean feedback (on [0, 1]).")
    ] = 0.05,
    wait: Annotated[bool, typer.Option(help="Wait for the gate's verdict.")] = True,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Start a staged canary rollout of DEPLOYMENT to a new adapter version."""
    client = LorafleetClient(url, api_key)
    r = client.start_rollout(
        deployment,
        to=to,
        steps=_steps(steps),
        min_requests=min_requests,
        interval_s=_seconds(interval),
        margin=margin,
        gate=gate,
        feedback_rollback=feedback_rollback,
        feedback_min=feedback_min,
        feedback_margin=feedback_margin,
    )
    if wait and r["phase"] == "Gating":
        with progress("the gate: both versions answer the validation set", "answers") as update:
            while r["phase"] == "Gating":
                time.sleep(1)
                r = client.rollout(deployment)
                if r.get("gate_progress"):  # null before the gate starts, and on other gateways
                    update(r["gate_progress"]["answered"], r["gate_progress"]["total"], "")
    _print_rollout(r)
    if r["phase"] == "GateRefused":
        raise typer.Exit(1)


@rollout.command("status")
def rollout_status(
    deployment: Annotated[Optional[str], typer.Argument()] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """One deployment's rollout with its recent decisions, or every deployment's latest rollout."""
    client = LorafleetClient(url, api_key)
    if deployment:
        r = client.rollout(deployment)
        _print_rollout(r)
        _print_signals(r)
        return
    table = Table("deployment", "kind", "phase", "step", "variants", "reason")
    for r in client.rollouts():
        step = str(r["step_index"] + 1) if r["kind"] == "canary" else "-"
        table.add_row(
            r["deployment"],
            r["kind"],
            r["phase"],
            step,
            ", ".join(f"{v['label']} {v['ref']} {v['weight']:g}%" for v in r["variants"]),
            r["reason"],
        )
    console.print(table)


def _bucket(value: Optional[float]) -> Optional[float]:
    if value is not None and not MIN_BUCKET_S <= value <= MAX_BUCKET_S:  # NaN too
        raise typer.BadParameter(
            f"{value:g}: a period is {MIN_BUCKET_S:g} to {MAX_BUCKET_S:g} seconds"
        )
    return value


@rollout.command("series")
def rollout_series(
    deployment: str,
    bucket: Annotated[
        Optional[float],
        typer.Option(callback=_bucket, help="Seconds per period (default: at most ~60 periods)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """The rollout's requests, errors, latency, format validity and feedback per variant and
    period."""
    series = LorafleetClient(url, api_key).rollout_series(deployment, bucket)
    if as_json:
        typer.echo(json.dumps(series, indent=2))
        return
    table = Table(
        "variant",
        "from",
        "requests",
        "errors",
        "error rate",
        "mean ms",
        "format valid",
        "feedback n",
        "feedback mean",
        title=f"rollout #{series['rollout_id']} of {deployment}, periods of "
        f"{series['bucket_s']:g} s since {when(series['start'], '%H:%M:%S')}",
    )
    for v in series["variants"]:
        for b in v["buckets"]:
            table.add_row(
                v["variant"],
                when(b["start"], "%H:%M:%S"),
                str(b["requests"]),
                str(b["errors"]),
                _fmt(b["error_rate"]),
                _fmt(b["latency_ms_mean"], ".0f"),
                f"{b['format_valid']}/{b['format_checked']}" if b["format_checked"] else "-",
                str(b["feedback_count"]),
                _fmt(b["feedback_mean"]),
            )
    console.print(table)


@rollout.command("promote")
def rollout_promote(
    deployment: str,
    full: Annotated[bool, typer.Option(help="Straight to 100%.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Advance one step now (or all the way with --full), without waiting for the analysis."""
    _print_rollout(
        LorafleetClient(url, api_key).rollout_action(deployment, "promote", full=full), decisions=3
    )


@rollout.command("pause")
def rollout_pause(deployment: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    _print_rollout(LorafleetClient(url, api_key).rollout_action(deployment, "pause"), decisions=3)


@rollout.command("resume")
def rollout_resume(deployment: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    _print_rollout(LorafleetClient(url, api_key).rollout_action(deployment, "resume"), decisions=3)


@rollout.command("abort")
def rollout_abort(deployment: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Send all traffic back to the stable version at once."""
    _print_rollout(LorafleetClient(url, api_key).rollout_action(deployment, "abort"), decisions=3)


@rollout.command("undo")
def rollout_undo(deployment: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Serve the previous stable version again."""
    d = LorafleetClient(url, api_key).undo(deployment)
    console.print(
        f"{d['name']} -> {d['adapter']['name']}@{d['adapter']['version']} "
        f"(was {d['previous_adapter']})"
    )


def _variant(value: str) -> tuple[str, float]:
    ref, sep, weight = value.rpartition("=")
    try:
        if not sep or not ref:
            raise ValueError
        return ref, float(weight)
    except ValueError:
        raise typer.BadParameter(f"{value!r}: use NAME@N=WEIGHT, e.g. invoice@3=50") from None


@ab.command("start")
def ab_start(
    deployment: str,
    variant: Annotated[
        list[str], typer.Option(help="NAME@N=WEIGHT (percent); repeat for each variant.")
    ],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Split DEPLOYMENT's traffic between versions with fixed weights (they must sum to 100)."""
    _print_rollout(
        LorafleetClient(url, api_key).start_ab(deployment, [_variant(v) for v in variant])
    )


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _estimate(value: float | None, interval: list[float] | None, spec: str = ".3f") -> str:
    """0.812 [0.741, 0.870], or just the value where the interval is undefined."""
    if value is None:
        return "-"
    return (
        f"{value:{spec}} [{interval[0]:{spec}}, {interval[1]:{spec}}]"
        if interval
        else format(value, spec)
    )


def _print_signals(r: dict) -> None:
    """Users' feedback per variant over the whole rollout, and the answers' confidence
    (informational)."""
    reference = "stable" if r["kind"] == "canary" else r["variants"][0]["label"]
    table = Table(
        "variant",
        "requests",
        "feedback n",
        "rate",
        "mean [95% CI]",
        f"diff vs {reference} [95% CI]",
        title="feedback",
    )
    for f in r.get("feedback", []):
        table.add_row(
            f["variant"],
            str(f["requests"]),
            str(f["count"]),
            _fmt(f["rate"]),
            _estimate(f["mean"], f["interval"]),
            _estimate(f["difference"], f["difference_interval"], "+.3f"),
        )
    console.print(table)
    for c in r.get("confidence", []):
        vs = (
            f"; diff vs {reference} {_estimate(c['difference'], c['difference_interval'], '+.3f')}"
            if c["variant"] != reference
            else ""
        )
        console.print(
            f"confidence {c['variant']}: mean log-prob {_estimate(c['mean'], c['interval'])} "
            f"(n={c['count']}){vs} (informational)",
            highlight=False,
        )


def _interval(entry: dict | None, spec: str = "+.3f") -> str:
    if not entry:
        return "-"
    low, high = entry["interval"]
    return f"{entry['diff']:{spec}} [{low:{spec}}, {high:{spec}}]"


@ab.command("status")
def ab_status(
    deployment: str,
    validation_scores: Annotated[
        bool, typer.Option("--validation", help="Also replay the validation set.")
    ] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Per-variant live metrics and differences from the first variant, with 95% intervals."""
    client = LorafleetClient(url, api_key)
    status = client.ab_status(deployment)
    _print_rollout(status["rollout"], decisions=3)
    table = Table(
        "variant",
        "requests",
        "units",
        "error rate",
        "p50 ms",
        "p95 ms",
        "output tokens",
        "format valid",
    )
    for v in status["variants"]:
        table.add_row(
            v["variant"],
            str(v["requests"]),
            str(v["units"]),
            _fmt(v["error_rate"]),
            _fmt(v["latency_p50_ms"], ".0f"),
            _fmt(v["latency_p95_ms"], ".0f"),
            _fmt(v["output_tokens_mean"], ".1f"),
            _fmt(v["format_validity"]),
        )
    console.print(table)
    diffs = Table(
        "variant",
        "vs",
        "error rate diff [95% CI]",
        "format validity diff [95% CI]",
        "output tokens diff [95% CI]",
        "latency median ratio (p)",
        title="differences",
    )
    for c in status["comparisons"]:
        latency = c.get("latency")
        diffs.add_row(
            c["variant"],
            c["against"],
            _interval(c.get("error_rate")),
            _interval(c.get("format_validity")),
            _interval(c.get("output_tokens"), "+.1f"),
            f"{latency['median_ratio']:.2f} (p={latency['p']:.2g})" if latency else "-",
        )
    console.print(diffs)
    console.print(status["sample_ratio"]["message"], highlight=False)
    _print_signals(status["rollout"])
    if validation_scores:
        with working("every variant answers the validation set"):
            result = client.ab_evaluate(deployment)
        scores = Table(
            "variant",
            f"{result['metric']} (n={result['items']})",
            "diff vs first [95% CI]",
            "verdict",
            "test",
            "p",
            title="validation set",
        )
        first = next(iter(result["scores"]))
        scores.add_row(first, f"{result['scores'][first]:.3f}", "-", "-", "-", "-")
        for d in result["differences"]:
            low, high = d["interval"]
            scores.add_row(
                d["variant"],
                f"{result['scores'][d['variant']]:.3f}",
                f"{d['effect']:+.3f} [{low:+.3f}, {high:+.3f}]",
                d["verdict"],
                d["test"],
                f"{d['p']:.2g}",
            )
        console.print(scores)


@ab.command("stop")
def ab_stop(
    deployment: str,
    keep: Annotated[Optional[str], typer.Option(help="NAME@N that becomes stable.")] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """End the A/B test; --keep makes that variant the stable version."""
    _print_rollout(LorafleetClient(url, api_key).stop_ab(deployment, keep), decisions=3)

"""Drift monitoring of live adapters: replays, looks, status, the HTML report, the sampling
opt-out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from lorafleet.serve.cli.common import DEFAULT_URL, ApiKey, Url, console, group, working
from lorafleet.serve.gateway_client import LorafleetClient

__all__ = ["drift"]

drift = group("Drift monitoring of live adapters (tenant key).")


@drift.command("check")
def drift_check(deployment: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Every live version answers the validation set now (greedy) and is compared with its
    baseline."""
    with working("every live version answers the validation set"):
        runs = LorafleetClient(url, api_key).drift_check(deployment)
    table = Table("variant", "version", "kind", "score", "equal to baseline", "message")
    for run in runs:
        table.add_row(
            run["variant"],
            run["version"],
            run["kind"],
            f"{run['score']:.3f}",
            f"{run['exact_match_rate']:.3f}",
            run["message"],
        )
    console.print(table)
    if any(run["changed"] for run in runs):
        raise typer.Exit(1)


@drift.command("look")
def drift_look(deployment: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Test the requests sampled so far for input and output drift now."""
    _print_drift([LorafleetClient(url, api_key).drift_look(deployment)])


_SPARKS = "▁▂▃▄▅▆▇█"


def _confidence(check: dict | None) -> str:
    if check is None:
        return "-"
    n = check["numbers"]
    return f"{n['confidence_mean']:.2f} vs {n['baseline_confidence_mean']:.2f} ({check['p']:.2g})"


def _print_drift(statuses: list[dict]) -> None:
    table = Table(
        "deployment",
        "variant",
        "validation score",
        "equal to baseline",
        "input drift p (q)",
        "output drift p (q)",
        "confidence vs baseline (p)",
        "samples",
        "status",
    )
    for s in statuses:
        outputs = {c["variant"]: c for c in s["output"]}
        confidences = {c["variant"]: c for c in s.get("confidence", [])}
        variants = [r["variant"] for r in s["runs"]] or list(outputs) or ["-"]
        for variant in variants:
            run = next((r for r in s["runs"] if r["variant"] == variant), None)
            out, confidence = outputs.get(variant), confidences.get(variant)
            alarms = [
                name
                for name, bad in (
                    ("replay changed", run and run["changed"]),
                    ("input drift", s["input"] and s["input"]["drifted"]),
                    ("output drift", out and out["drifted"]),
                    ("confidence drift", confidence and confidence["drifted"]),
                )
                if bad
            ]
            table.add_row(
                s["deployment"],
                variant,
                f"{run['score']:.3f}" if run else "-",
                f"{run['exact_match_rate']:.3f}" if run else "-",
                f"{s['input']['p']:.2g} ({s['input']['q']:.2g})" if s["input"] else "-",
                f"{out['p']:.2g} ({out['q']:.2g})" if out else "-",
                _confidence(confidence),
                f"{s['samples']}{'' if s['sample_inputs'] else ' (opted out)'}",
                "[red]" + ", ".join(alarms) + "[/red]" if alarms else "[green]ok[/green]",
            )
    console.print(table)
    _print_feedback(statuses)


def _sparkline(values: list[float | None]) -> str:
    """One character per period: the value on [0, 1] as a bar, `·` where there is none."""
    return "".join(
        "·" if v is None else _SPARKS[min(int(v * len(_SPARKS)), len(_SPARKS) - 1)] for v in values
    )


def _print_feedback(statuses: list[dict]) -> None:
    """Per live version: answered requests and feedback over the timeline, and its mean value per
    period."""
    timelines = [
        (s["deployment"], t)
        for s in statuses
        for t in s.get("feedback", [])
        if any(p["requests"] or p["feedback"] for p in t["periods"])
    ]
    if not timelines:
        return
    first = timelines[0][1]
    period = (
        f"{first['bucket_s'] // 3600} h"
        if first["bucket_s"] % 3600 == 0
        else f"{first['bucket_s'] // 60} min"
    )
    title = f"Users' feedback over the last {len(first['periods'])} periods of {period}"
    table = Table(
        "deployment",
        "variant",
        "version",
        "answered",
        "feedback",
        "rate",
        "mean",
        f"mean per {period}, oldest first",
        title=title,
    )
    for deployment, t in timelines:
        answered, judged = (
            sum(p["requests"] for p in t["periods"]),
            sum(p["feedback"] for p in t["periods"]),
        )
        total = sum(p["mean"] * p["feedback"] for p in t["periods"] if p["mean"] is not None)
        table.add_row(
            deployment,
            t["variant"],
            t["version"],
            str(answered),
            str(judged),
            f"{judged / answered:.3f}" if answered else "-",
            f"{total / judged:.2f}" if judged else "-",
            _sparkline([p["mean"] for p in t["periods"]]),
        )
    console.print(table)


@drift.command("status")
def drift_status(
    deployment: Annotated[Optional[str], typer.Argument()] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Validation replay, input, output and confidence drift of every live version, one row each,
    and the users' feedback on each over the last 24 hours."""
    _print_drift(LorafleetClient(url, api_key).drift_status(deployment))


@drift.command("report")
def drift_report(
    deployment: str,
    out: Annotated[Path, typer.Option(help="HTML file to write.")] = Path("report.html"),
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Write a self-contained HTML report with plots of the deployment's replays and drift looks."""
    from lorafleet.serve.drift.report import render_report

    client = LorafleetClient(url, api_key)
    page = render_report(client.drift_history(deployment), client.drift_status(deployment)[0])
    out.write_text(page, encoding="utf-8")
    console.print(f"report written to {out} ({len(page) // 1024} KiB)")


@drift.command("sampling")
def drift_sampling(
    state: Annotated[str, typer.Argument(help="on | off")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Opt this tenant in or out of live-request sampling (off deletes what was kept)."""
    if state not in ("on", "off"):
        raise typer.BadParameter(f"{state!r}: use on or off")
    result = LorafleetClient(url, api_key).drift_sampling(state == "on")
    console.print(
        f"live-request sampling {state}; {result['deleted_samples']} stored samples deleted"
    )

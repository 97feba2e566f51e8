"""The feedback loop from the command line (tenant key): feedback on answers, the request log and
the live traffic it sums up, and captured requests (policy, listing, deletion, export as the
trainer's chat JSONL).

    lorafleet feedback [--deployment D] [--since T]       lorafleet feedback send ID up|down|0.7
                                                              [--correction T]
    lorafleet requests [--all] [--json]                   lorafleet capture
                                                              on|off|status|list|delete|export
    lorafleet traffic DEPLOYMENT [--window 300] [--json]

Times are epoch seconds, ISO 8601, or how long ago: 15m, 2h, 7d.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from lorafleet.serve.cli.common import DEFAULT_URL, ApiKey, Url, console, group, when, working
from lorafleet.serve.feedback.traffic import DEFAULT_WINDOW_S, MAX_WINDOW_S, MIN_WINDOW_S
from lorafleet.serve.gateway_client import LorafleetClient

__all__ = ["feedback", "requests", "traffic", "capture", "parse_when"]

feedback = typer.Typer(no_args_is_help=False, help="Users' feedback on answers (tenant key).")
capture = group(
    "Capture of live requests for retraining, and their export as chat JSONL (tenant key)."
)

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(value: Optional[str]) -> Optional[str]:
    """A time option as the API takes it: epoch seconds or ISO 8601 as given; 15m, 2h, 7d ago as
    epoch seconds."""
    if value is None or value == "":
        return None
    if ago := _AGO.match(value):
        return f"{time.time() - float(ago[1]) * _UNIT_S[ago[2]]:.3f}"
    from lorafleet.errors import InvalidRequest
    from lorafleet.serve.feedback.records import parse_time

    try:
        parse_time(value, "time")
    except InvalidRequest:
        raise typer.BadParameter(
            f"{value!r} is not a time: use epoch seconds, ISO 8601 (2026-05-01T12:00) or "
            "how long ago (15m, 2h, 7d)"
        ) from None
    return value


_THUMBS = {"up": 1.0, "down": -1.0}


def _score(value: str) -> float:
    """up | down (thumbs: 1, -1; a bare -1 would read as an option), or a number in [0, 1]."""
    try:
        score = _THUMBS[value] if value in _THUMBS else float(value)
    except ValueError:
        score = float("nan")
    if score not in (-1, 1) and not 0 <= score <= 1:
        raise typer.BadParameter(f"{value!r}: use up or down (thumbs), or a number in [0, 1]")
    return score


def _rate(value: float) -> float:
    if not 0 < value <= 1:
        raise typer.BadParameter(f"{value:g}: the share of answered requests kept, in (0, 1]")
    return value


Since = Annotated[
    Optional[str],
    typer.Option(callback=parse_when, help="From this time on (epoch, ISO 8601, 2h)."),
]
Until = Annotated[
    Optional[str], typer.Option(callback=parse_when, help="Before this time (epoch, ISO 8601, 2h).")
]
Deployment = Annotated[Optional[str], typer.Option(help="Only this deployment's.")]
Limit = Annotated[int, typer.Option(min=1, max=1000, help="Rows (per page).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")]


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _short(text: str | None, width: int = 40) -> str:
    if not text:
        return "-"
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _print_json(rows: list[dict]) -> None:
    typer.echo(json.dumps(rows, indent=2))


# --- feedback ---


@feedback.callback(invoke_without_command=True)
def feedback_list(
    ctx: typer.Context,
    deployment: Deployment = None,
    since: Since = None,
    until: Until = None,
    limit: Limit = 100,
    as_json: AsJson = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Users' feedback on answers, newest first (`lorafleet feedback send ID SCORE` adds one)."""
    if ctx.invoked_subcommand is not None:
        return
    rows = LorafleetClient(url, api_key).feedback(
        deployment=deployment, since=since, until=until, limit=limit
    )["data"]
    if as_json:
        _print_json(rows)
        return
    table = Table("request time", "id", "deployment", "variant", "score", "correction", "comment")
    for f in rows:
        table.add_row(
            when(f["at"], "%m-%d %H:%M:%S"),
            f["id"],
            f["deployment"],
            f["variant"],
            f"{f['score']:g}",
            _short(f["correction"]),
            _short(f["comment"]),
        )
    console.print(table)


@feedback.command("send")
def feedback_send(
    request_id: Annotated[str, typer.Argument(metavar="ID", help="The `id` of the chat response.")],
    score: Annotated[
        str, typer.Argument(callback=_score, help="up or down (thumbs), or in [0, 1].")
    ],
    correction: Annotated[
        Optional[str], typer.Option(help="The answer that should have been given.")
    ] = None,
    comment: Annotated[str, typer.Option(help="A note on the answer.")] = "",
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Judge one answer (sending again for the same id replaces the earlier feedback)."""
    f = LorafleetClient(url, api_key).send_feedback(request_id, float(score), correction, comment)
    fixed = " with a correction" if f["correction"] is not None else ""
    console.print(
        f"feedback {f['score']:g} on {f['id']} ({f['deployment']}, {f['variant']}){fixed}",
        highlight=False,
        soft_wrap=True,
    )


# --- the request log ---


def requests(
    deployment: Deployment = None,
    since: Since = None,
    until: Until = None,
    limit: Limit = 100,
    every: Annotated[
        bool, typer.Option("--all", help="Follow the pages to the oldest request.")
    ] = False,
    as_json: AsJson = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Your request log, newest first: what served each chat request and how it went."""
    client = LorafleetClient(url, api_key)
    rows: list[dict] = []
    cursor = None
    while True:
        page = client.requests(
            deployment=deployment, since=since, until=until, limit=limit, cursor=cursor
        )
        rows += page["data"]
        cursor = page["next_cursor"]
        if not every or cursor is None:
            break
    if as_json:
        _print_json(rows)
        return
    table = Table(
        "time",
        "key",
        "deployment",
        "variant",
        "adapter",
        "tokens",
        "status",
        "ms",
        "confidence",
        "feedback",
    )
    for r in rows:
        status = (
            str(r["status"])
            if r["status"] == 200
            else f"{r['status']} {r['error_code'] or ''}".strip()
        )
        table.add_row(
            when(r["at"], "%m-%d %H:%M:%S"),
            str(r["key_id"] or "-"),
            r["deployment"],
            r["variant"],
            r["adapter"][:8],
            f"{r['prompt_tokens']}+{r['completion_tokens']}",
            status,
            f"{r['latency_s'] * 1000:.0f}",
            _fmt(r["confidence_mean"]),
            _fmt(r["feedback"], "g"),
        )
    console.print(table)
    if not every and cursor is not None:
        console.print(
            f"(more: --all, or --until {rows[-1]['at']:.3f})", highlight=False, soft_wrap=True
        )


# --- live traffic ---


def _traffic_row(table: Table, label: str, adapter: str, t: dict) -> None:
    latency = t["latency_ms"]
    table.add_row(
        label,
        adapter,
        str(t["requests"]),
        f"{t['per_s']:.3g}",
        str(t["errors"]),
        str(t["client_errors"]),
        _fmt(t["error_rate"]),
        _fmt(latency["p50"], ".0f"),
        _fmt(latency["p95"], ".0f"),
        _fmt(latency["mean"], ".0f"),
    )


def _window(value: float) -> float:
    if not MIN_WINDOW_S <= value <= MAX_WINDOW_S:  # NaN too
        raise typer.BadParameter(
            f"{value:g}: the window is {MIN_WINDOW_S:g} to {MAX_WINDOW_S:g} seconds"
        )
    return value


def traffic(
    deployment: str,
    window: Annotated[
        float, typer.Option(callback=_window, help="Seconds back from now.")
    ] = DEFAULT_WINDOW_S,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """DEPLOYMENT's requests of the last --window seconds: rate, errors (5xx), client errors
    (4xx) and latency of the answered ones, in total and per variant."""
    t = LorafleetClient(url, api_key).traffic(deployment, window)
    if as_json:
        typer.echo(json.dumps(t, indent=2))
        return
    table = Table(
        "variant",
        "adapter",
        "requests",
        "per s",
        "errors",
        "4xx",
        "error rate",
        "p50 ms",
        "p95 ms",
        "mean ms",
        title=f"{t['deployment']}, the last {t['window_s']:g} s",
    )
    _traffic_row(table, "all", "", t)
    for v in t["variants"]:
        _traffic_row(table, v["variant"] or "-", v["digest"][:12] or "-", v)
    console.print(table)


# --- captured requests ---


def _describe(policy: dict | None) -> str:
    if policy is None:
        return "off"
    return (
        f"{policy['sample_rate'] * 100:g}% of answered requests, at most "
        f"{policy['max_per_day']} a day (UTC), each kept {policy['retention_days']:g} days"
    )


@capture.command("on")
def capture_on(
    deployment: str,
    sample_rate: Annotated[
        float, typer.Option(callback=_rate, help="Share of answered requests kept.")
    ] = 0.1,
    max_per_day: Annotated[int, typer.Option(min=1, help="At most this many a UTC day.")] = 1000,
    retention_days: Annotated[float, typer.Option(min=0.001, help="Then they are deleted.")] = 30.0,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Keep a sampled share of DEPLOYMENT's requests in full (images included) for retraining."""
    d = LorafleetClient(url, api_key).set_capture(
        deployment,
        {"sample_rate": sample_rate, "max_per_day": max_per_day, "retention_days": retention_days},
    )
    console.print(
        f"{d['name']} captures {_describe(d['capture'])}", highlight=False, soft_wrap=True
    )


@capture.command("off")
def capture_off(deployment: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Stop capturing DEPLOYMENT's requests and delete what was kept."""
    deleted = LorafleetClient(url, api_key).capture_off(deployment)
    console.print(
        f"{deployment} captures nothing now; deleted {deleted['captures']} captures and "
        f"{deleted['images']} images",
        highlight=False,
        soft_wrap=True,
    )


@capture.command("status")
def capture_status(deployment: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """DEPLOYMENT's capture policy, and what is kept under it."""
    s = LorafleetClient(url, api_key).capture_status(deployment)
    console.print(
        f"{s['deployment']}: capture {_describe(s['policy'])}", highlight=False, soft_wrap=True
    )
    console.print(
        f"{s['captures']} captures ({s['today']} today), {s['images']} images, "
        f"{s['bytes']} bytes of text",
        highlight=False,
        soft_wrap=True,
    )


@capture.command("list")
def capture_list(
    deployment: Deployment = None,
    since: Since = None,
    until: Until = None,
    limit: Limit = 100,
    as_json: AsJson = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Your captures, newest first."""
    rows = LorafleetClient(url, api_key).captures(
        deployment=deployment, since=since, until=until, limit=limit
    )["data"]
    if as_json:
        _print_json(rows)
        return
    table = Table(
        "time", "id", "deployment", "variant", "adapter", "confidence", "images", "answer"
    )
    for c in rows:
        table.add_row(
            when(c["at"], "%m-%d %H:%M:%S"),
            c["id"],
            c["deployment"],
            c["variant"],
            c["adapter"][:8],
            _fmt(c["confidence_mean"]),
            str(len(c["images"])),
            _short(c["answer"]),
        )
    console.print(table)


@capture.command("delete")
def capture_delete(
    deployment: Deployment = None,
    since: Since = None,
    until: Until = None,
    request_id: Annotated[Optional[str], typer.Option("--id", help="Only this request's.")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Delete all without asking.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Delete captures (of a deployment, a time range, one request; none of these: all of yours)."""
    client = LorafleetClient(url, api_key)
    if request_id is not None:
        deleted = client.delete_capture(request_id)
    else:
        if not (deployment or since or until or yes):
            typer.confirm("Delete every capture of this tenant?", abort=True)
        deleted = client.delete_captures(deployment=deployment, since=since, until=until)
    console.print(
        f"deleted {deleted['captures']} captures and {deleted['images']} images",
        highlight=False,
        soft_wrap=True,
    )


def _left_out(header: str) -> str:
    """'negative_feedback=2, no_feedback=3' (the export's header) as words."""
    from lorafleet.serve.feedback.export import LEFT_OUT

    counts = [part.split("=") for part in header.split(", ") if "=" in part]
    return ", ".join(f"{count} {LEFT_OUT.get(reason, reason)}" for reason, count in counts)


@capture.command("export")
def capture_export(
    deployment: str,
    out: Annotated[Path, typer.Option(help="The chat JSONL file to write (replaced at the end).")],
    with_feedback: Annotated[
        bool, typer.Option("--with-feedback", help="Only captures that got feedback.")
    ] = False,
    corrections_only: Annotated[
        bool, typer.Option("--corrections-only", help="Only captures with a correction.")
    ] = False,
    lowest_confidence: Annotated[
        Optional[int],
        typer.Option(
            min=1, help="Only the N least confident answers, least confident first, for review."
        ),
    ] = None,
    review: Annotated[
        bool,
        typer.Option(
            "--review", help="Keep negative feedback without a correction, marked for review."
        ),
    ] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Write DEPLOYMENT's captures as the trainer's chat JSONL (`lorafleet train --train OUT`
    reads it as it is): corrections replace the served answers, answers judged wrong without one
    are left out."""
    client = LorafleetClient(url, api_key)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as file, working(f"exporting {deployment}'s captures"):
            written, headers = client.export_captures(
                deployment,
                file,
                with_feedback=with_feedback,
                corrections_only=corrections_only,
                lowest_confidence=lowest_confidence,
                review=review,
            )
        os.replace(temp, out)  # a failed export leaves an earlier file as it was
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    marked = int(headers.get("x-lorafleet-review", "0"))
    examples = f"{written} example{'' if written == 1 else 's'}"
    console.print(
        f"{examples} written to {out}" + (f" ({marked} marked for review)" if marked else ""),
        highlight=False,
        soft_wrap=True,
    )
    if left_out := _left_out(headers.get("x-lorafleet-left-out", "")):
        console.print(f"left out: {left_out}", highlight=False, soft_wrap=True)

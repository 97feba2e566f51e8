"""`lorafleet usage`: the usage report (a tenant's with its key, every tenant's with the admin key),
as a table, JSON or CSV: thin calls to `GET /v1/usage`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Column, Table

from lorafleet.errors import InvalidRequest
from lorafleet.serve.cli.common import DEFAULT_URL, AdminKey, ApiKey, Url, console, notice, when
from lorafleet.serve.gateway_client import LorafleetClient

__all__ = ["usage", "budgets_table"]


def usage(
    start: Annotated[
        Optional[str], typer.Option(help="First day, YYYY-MM-DD (UTC); default: the month's first.")
    ] = None,
    end: Annotated[Optional[str], typer.Option(help="Last day, included; default: today.")] = None,
    group_by: Annotated[
        Optional[str],
        typer.Option(
            "--group-by", help="Comma-separated: deployment, adapter, day (tenant: admin key)."
        ),
    ] = None,
    tenant: Annotated[
        Optional[str], typer.Option(help="This tenant's report (the admin key).")
    ] = None,
    every_tenant: Annotated[
        bool, typer.Option("--every-tenant", help="Every tenant's report (the admin key).")
    ] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV, the header first.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="The API's JSON.")] = False,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Write to this file, not stdout.")
    ] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    admin_key: AdminKey = None,
) -> None:
    """What requests used and cost: answered requests' tokens, images and engine time, failed
    requests apart, live and batch apart; with the budgets in effect. Your own with your API key;
    with the admin key, every tenant's (--every-tenant, or --group-by tenant) or one
    (--tenant NAME), also when an API key is set."""
    groups = {g.strip() for g in (group_by or "").split(",")}
    admin = tenant is not None or every_tenant or "tenant" in groups or not api_key
    if admin and not admin_key:
        raise InvalidRequest(
            "give your API key (--api-key) for your usage, or the admin key (--admin-key) for a "
            "tenant's or every tenant's"
        )
    key = admin_key if admin else api_key
    client = LorafleetClient(url, key)
    params = {"start": start, "end": end, "group_by": group_by, "tenant": tenant}
    if as_csv:
        _write(client.usage_csv(**params), output)
        return
    report = client.usage(**params)
    if as_json:
        _write(json.dumps(report, indent=2) + "\n", output)
        return
    title = f"{report['tenant'] or 'every tenant'}: {report['start']} to {report['end']} (UTC)"
    console.print(_usage_table(report, title))
    if report["budgets"]:
        console.print(budgets_table(report["budgets"], report["currency"]))
    if output is not None:
        notice.print("(--output writes --csv or --json)")


def _write(text: str, output: Path | None) -> None:
    if output is None:
        print(text, end="")
    else:
        output.write_text(text, encoding="utf-8")
        notice.print(f"wrote {output}")


def _usage_table(report: dict, title: str) -> Table:
    groups = report["group_by"]  # in the report's order
    currency = report["currency"]
    table = Table(
        *(Column(g, overflow="fold") for g in groups),
        "kind",
        Column("requests", justify="right"),
        Column("failed", justify="right"),
        Column("prompt", justify="right"),
        Column("completion", justify="right"),
        Column("images", justify="right"),
        Column("engine s", justify="right"),
        Column(f"cost {currency}", justify="right"),
        title=f"{title}; tokens: prompt, completion",
    )
    for row in report["rows"]:
        table.add_row(*(_group(row, g) for g in groups), row["kind"], *_sums(row))
    if len(report["rows"]) != 1:
        table.add_section()
        table.add_row(*([""] * len(groups)), "total", *_sums(report["total"]), style="bold")
    return table


def _group(row: dict, name: str) -> str:
    if name == "adapter":
        return row["adapter"] or (row["digest"] or "")[:12]
    return str(row[name]) if row[name] not in (None, "") else "(none)"


def _sums(row: dict) -> list[str]:
    return [
        f"{row['requests']:,}",
        f"{row['failed_requests']:,}",
        f"{row['prompt_tokens']:,}",
        f"{row['completion_tokens']:,}",
        f"{row['images']:,}",
        f"{row['engine_seconds']:.1f}",
        f"{row['cost']:.4f}",
    ]


def budgets_table(budgets: list[dict], currency: str) -> Table:
    """Each budget in its current period: what it allows and what was spent of it."""
    table = Table("period", "budget", "spent", "used", "alert at", "resets (UTC)", "state")
    for b in budgets:
        limits, spent = [], []
        if b["tokens"] is not None:
            limits.append(f"{b['tokens']:,} tokens")
            spent.append(f"{b['spent_tokens']:,} tokens")
        if b["cost"] is not None:
            limits.append(f"{b['cost']:g} {currency}")
            spent.append(f"{b['spent_cost']:.4f} {currency}")
        table.add_row(
            f"{b['period']} {b['start']}",
            " or ".join(limits),
            ", ".join(spent),
            f"{100 * b['used']:.1f}%",
            f"{100 * b['alert_at']:.0f}%" if b["alert_at"] is not None else "-",
            when(b["resets_at"], "%Y-%m-%d %H:%M"),
            "[red]spent (429)[/red]" if b["exceeded"] else "open",
        )
    return table

"""Tenants and their keys, limits, prices, budgets, disabling and deletion, and the audit trail
(admin key): thin calls to the API."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer
from rich.table import Table

from lorafleet.serve.cli.common import DEFAULT_URL, AdminKey, Url, console, group, notice, when
from lorafleet.serve.cli.usage import budgets_table
from lorafleet.serve.gateway_client import LorafleetClient

__all__ = ["tenants", "audit"]

tenants = group("Tenants, their keys, limits, prices and budgets (admin key).")
keys = group("A tenant's API keys (admin key).")
tenants.add_typer(keys, name="keys")

_LIMIT_HELP = "0: unlimited; 'default': back to the setting's default."


@tenants.command("create")
def tenants_create(name: str, url: Url = DEFAULT_URL, admin_key: AdminKey = None) -> None:
    """Create a tenant and print its API key (shown only once): the key alone on stdout, what it
    is on stderr."""
    created = LorafleetClient(url, admin_key).create_tenant(name)
    notice.print(
        f"tenant [bold]{created['name']}[/bold] created; API key "
        "(store it now, it is not shown again):"
    )
    print(created["api_key"])


@tenants.command("list")
def tenants_list(url: Url = DEFAULT_URL, admin_key: AdminKey = None) -> None:
    for name in LorafleetClient(url, admin_key).list_tenants():
        print(name)


@tenants.command("show")
def tenants_show(name: str, url: Url = DEFAULT_URL, admin_key: AdminKey = None) -> None:
    """The tenant's state, usage and limits in effect."""
    t = LorafleetClient(url, admin_key).get_tenant(name)
    state = (
        f"disabled ({t['disabled_reason'] or 'no reason given'})" if t["disabled"] else "enabled"
    )
    console.print(
        f"{t['name']}: {state}; {t['keys']} live keys; {t['adapters']} adapter versions "
        f"({t['adapter_bytes']} bytes); {t['deployments']} deployments"
    )
    console.print(_limits_table({"limit": t["limits"]}))


def _limits_table(columns: dict[str, dict[str, int]]) -> Table:
    table = Table("limit", *columns)
    for name in next(iter(columns.values())):
        table.add_row(
            name,
            *(
                str(c.get(name, "")) if c.get(name, "") != 0 else "unlimited"
                for c in columns.values()
            ),
        )
    return table


def _limit(value: str) -> int | None:
    """A number, or None: back to the default."""
    if value == "default":
        return None
    if not value.isdigit():
        raise typer.BadParameter(f"{value!r}: give a whole number (0: unlimited) or 'default'")
    return int(value)


@tenants.command("limits")
def tenants_limits(
    name: str,
    rpm: Annotated[
        Optional[str], typer.Option(help=f"Chat requests per minute. {_LIMIT_HELP}")
    ] = None,
    tpm: Annotated[
        Optional[str], typer.Option(help=f"Prompt + completion tokens per minute. {_LIMIT_HELP}")
    ] = None,
    concurrency: Annotated[
        Optional[str], typer.Option(help=f"Chat requests in flight. {_LIMIT_HELP}")
    ] = None,
    images: Annotated[
        Optional[str], typer.Option(help=f"Images per request. {_LIMIT_HELP}")
    ] = None,
    image_bytes: Annotated[
        Optional[str], typer.Option(help=f"Bytes per image. {_LIMIT_HELP}")
    ] = None,
    image_pixels: Annotated[
        Optional[str], typer.Option(help=f"Pixels per image. {_LIMIT_HELP}")
    ] = None,
    adapters: Annotated[
        Optional[str], typer.Option(help=f"Adapter versions stored. {_LIMIT_HELP}")
    ] = None,
    adapter_bytes: Annotated[
        Optional[str], typer.Option(help=f"Bytes of adapters stored. {_LIMIT_HELP}")
    ] = None,
    files: Annotated[
        Optional[str], typer.Option(help=f"Files stored (batch inputs, outputs). {_LIMIT_HELP}")
    ] = None,
    batches: Annotated[
        Optional[str], typer.Option(help=f"Batches not yet finished. {_LIMIT_HELP}")
    ] = None,
    batch_lines: Annotated[
        Optional[str], typer.Option(help=f"Request lines in one batch. {_LIMIT_HELP}")
    ] = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Show the tenant's limits, or set those given."""
    given = {
        "rpm": rpm,
        "tpm": tpm,
        "concurrency": concurrency,
        "images_per_request": images,
        "image_bytes": image_bytes,
        "image_pixels": image_pixels,
        "adapters": adapters,
        "adapter_bytes": adapter_bytes,
        "files": files,
        "batches": batches,
        "batch_lines": batch_lines,
    }
    changes = {k: _limit(v) for k, v in given.items() if v is not None}
    client = LorafleetClient(url, admin_key)
    result = client.set_limits(name, changes) if changes else client.get_limits(name)
    console.print(_limits_table({"in effect": result["limits"], "default": result["defaults"]}))


_PRICE_HELP = "'default': back to the setting's default."


def _price(value: str) -> float | None:
    """A price, or None: back to the default."""
    if value == "default":
        return None
    try:
        return float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r}: give a number (0: free) or 'default'") from None


@tenants.command("prices")
def tenants_prices(
    name: str,
    prompt: Annotated[
        Optional[str], typer.Option(help=f"Per million prompt tokens. {_PRICE_HELP}")
    ] = None,
    completion: Annotated[
        Optional[str], typer.Option(help=f"Per million completion tokens. {_PRICE_HELP}")
    ] = None,
    image: Annotated[Optional[str], typer.Option(help=f"Per image. {_PRICE_HELP}")] = None,
    engine_hour: Annotated[
        Optional[str], typer.Option(help=f"Per hour of engine time. {_PRICE_HELP}")
    ] = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Show the tenant's prices, or set those given (from now on: recorded usage keeps its
    cost)."""
    given = {
        "prompt_per_million": prompt,
        "completion_per_million": completion,
        "per_image": image,
        "per_engine_hour": engine_hour,
    }
    changes = {k: _price(v) for k, v in given.items() if v is not None}
    client = LorafleetClient(url, admin_key)
    result = client.set_prices(name, changes) if changes else client.prices(name)
    currency = result["prices"].pop("currency")
    result["defaults"].pop("currency")
    table = Table("price", f"in effect ({currency})", "default")
    for price, value in result["prices"].items():
        table.add_row(price, f"{value:g}", f"{result['defaults'][price]:g}")
    console.print(table)


@tenants.command("budget")
def tenants_budget(
    name: str,
    period: Annotated[
        Optional[str], typer.Argument(help="day or month (UTC). Omitted: show the budgets.")
    ] = None,
    tokens: Annotated[
        Optional[int], typer.Option(help="Prompt + completion tokens per period.")
    ] = None,
    cost: Annotated[
        Optional[float], typer.Option(help="Money per period, in the prices' currency.")
    ] = None,
    alert_at: Annotated[
        Optional[float],
        typer.Option(help="Record an alert (audit event, metric) at this fraction, e.g. 0.8."),
    ] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Remove the period's budget.")] = False,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Show the tenant's budgets with what each period spent, or set (replace) or remove one.
    Over a budget, the tenant's chat and batch requests get 429 until the period ends."""
    client = LorafleetClient(url, admin_key)
    if period is None:
        result = client.budgets(name)
    elif remove:
        result = client.delete_budget(name, period)
    else:
        budget = {"tokens": tokens, "cost": cost, "alert_at": alert_at}
        result = client.set_budget(name, period, {k: v for k, v in budget.items() if v is not None})
    if remove and period is not None:
        console.print(f"{name}'s {period} budget removed")
    if not result["budgets"]:
        console.print(f"{name} has no budget{' left' if remove else ''}")
        return
    console.print(budgets_table(result["budgets"], result["currency"]))


@tenants.command("objective")
def tenants_objective(
    name: str,
    deployment: str,
    objective: Annotated[
        Optional[str],
        typer.Argument(
            help="An InferenceObjective in the pool's namespace; 'default': back to "
            "LORAFLEET_POOL_OBJECTIVE. Omitted: show it."
        ),
    ] = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """The InferenceObjective (its priority in an InferencePool) of a tenant's deployment."""
    client = LorafleetClient(url, admin_key)
    if objective is None:
        result = client.objective(name, deployment)
    else:
        result = client.set_objective(
            name, deployment, None if objective == "default" else objective
        )
    default = result["default"] or "none (the pool's default priority)"
    console.print(
        f"{result['tenant']}/{result['deployment']}: objective "
        + (result["objective"] or f"{default}, the default"),
        highlight=False,
    )


@tenants.command("disable")
def tenants_disable(
    name: str,
    reason: Annotated[str, typer.Option(help="Shown to the tenant's clients.")] = "",
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Every key of the tenant answers 401 (with the reason) until it is enabled; nothing is
    deleted."""
    LorafleetClient(url, admin_key).disable_tenant(name, reason)
    console.print(f"tenant {name} disabled")


@tenants.command("enable")
def tenants_enable(name: str, url: Url = DEFAULT_URL, admin_key: AdminKey = None) -> None:
    LorafleetClient(url, admin_key).enable_tenant(name)
    console.print(f"tenant {name} enabled")


@tenants.command("delete")
def tenants_delete(
    name: str,
    force: Annotated[bool, typer.Option(help="Also while a rollout or A/B test runs.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Delete the tenant and everything it owns (adapters, deployments, validation sets, samples,
    files)."""
    if not yes:
        if not sys.stdin.isatty():
            console.print(
                f"[red]deleting tenant {name} asks for confirmation and there is no terminal: "
                "pass --yes[/red]"
            )
            raise typer.Exit(1)
        typer.confirm(f"delete tenant {name} and everything it owns?", abort=True)
    deleted = LorafleetClient(url, admin_key).delete_tenant(name, force)
    rows = ", ".join(f"{n} {table}" for table, n in deleted["deleted"].items() if n)
    console.print(
        f"tenant {name} deleted ({rows or 'nothing else'}; {deleted['blobs_deleted']} stored files)"
    )


def _keys_table(rows: list[dict]) -> Table:
    table = Table("id", "prefix", "label", "created", "last used", "expires", "state")
    for k in rows:
        state = "revoked" if k["revoked_at"] else "live" if k["live"] else "expired"
        table.add_row(
            str(k["id"]),
            k["prefix"] + "…",
            k["label"],
            when(k["created_at"]),
            when(k["last_used_at"]),
            when(k["expires_at"]),
            state,
        )
    return table


@keys.command("list")
def keys_list(name: str, url: Url = DEFAULT_URL, admin_key: AdminKey = None) -> None:
    console.print(_keys_table(LorafleetClient(url, admin_key).list_keys(name)))


@keys.command("create")
def keys_create(
    name: str,
    label: Annotated[str, typer.Option()] = "",
    expires_in: Annotated[Optional[float], typer.Option(help="Seconds until it expires.")] = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Another key for the tenant (printed once: the key alone on stdout)."""
    created = LorafleetClient(url, admin_key).create_key(name, label, expires_in)
    notice.print(
        f"key {created['id']} created (expires {when(created['expires_at'])}); store it now:"
    )
    print(created["api_key"])


@keys.command("revoke")
def keys_revoke(name: str, key_id: int, url: Url = DEFAULT_URL, admin_key: AdminKey = None) -> None:
    """The key stops working now."""
    LorafleetClient(url, admin_key).revoke_key(name, key_id)
    console.print(f"key {key_id} of {name} revoked")


@keys.command("rotate")
def keys_rotate(
    name: str,
    key_id: int,
    grace: Annotated[float, typer.Option(help="Seconds the old key keeps working.")] = 3600.0,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """A new key replacing KEY_ID, which expires after the grace period."""
    rotated = LorafleetClient(url, admin_key).rotate_key(name, key_id, grace)
    console.print(
        f"key {key_id} expires {when(rotated['old']['expires_at'])}; "
        f"new key {rotated['new']['id']} (store it now):"
    )
    print(rotated["new"]["api_key"])


def audit(
    tenant: Annotated[Optional[str], typer.Option(help="Only this tenant's events.")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 50,
    before: Annotated[
        Optional[int], typer.Option(help="Events older than this id (paging).")
    ] = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Admin operations: who did what to which tenant, when."""
    table = Table("id", "when (UTC)", "actor", "action", "tenant", "details")
    for e in LorafleetClient(url, admin_key).audit(tenant, limit, before):
        details = ", ".join(f"{k}={v}" for k, v in e["details"].items() if v is not None)
        table.add_row(str(e["id"]), when(e["at"]), e["actor"], e["action"], e["tenant"], details)
    console.print(table)

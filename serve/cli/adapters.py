"""Adapters, deployments and validation sets: thin calls to the gateway's API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TransferSpeedColumn
from rich.table import Table

from lorafleet.adapters.manifest import manifest_summary
from lorafleet.serve.cli.common import DEFAULT_URL, ApiKey, Url, console, group, working
from lorafleet.serve.gateway_client import LorafleetClient

__all__ = ["adapters", "deployments", "validation"]

adapters = group("Adapter versions (tenant key).")
deployments = group("Deployments (tenant key).")
validation = group("A deployment's fixed validation set (tenant key).")


@adapters.command("push")
def adapters_push(
    name: str,
    folder: Annotated[Path, typer.Argument(exists=True, file_okay=False)],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Upload a PEFT LoRA adapter folder as a new version of NAME."""
    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        tasks: list[TaskID] = []  # shown once bytes go out (after the folder and key are checked)

        def advance(sent: int, total: int) -> None:
            if not tasks:
                tasks.append(progress.add_task(f"uploading {name}", total=total))
            progress.update(tasks[0], completed=sent, total=total)

        version = LorafleetClient(url, api_key).push_adapter(name, folder, advance)
    console.print(
        f"{version['name']}@{version['version']}  digest {version['digest']}  "
        f"rank {version['rank']}  parts {'+'.join(version['parts'])}  {version['size_bytes']} bytes"
    )


def _versions_table(rows: list[dict]) -> Table:
    table = Table("adapter", "version", "digest", "rank", "parts", "targets", "bytes", "created")
    for v in rows:
        table.add_row(
            v["name"],
            str(v["version"]),
            v["digest"][:12],
            str(v["rank"]),
            "+".join(v["parts"]),
            ",".join(v["target_modules"]),
            str(v["size_bytes"]),
            v["created_at"][:19],
        )
    return table


@adapters.command("list")
def adapters_list(url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    adapters = LorafleetClient(url, api_key).list_adapters()
    console.print(_versions_table([v for a in adapters for v in a["versions"]]))


_MATCHES = {
    True: "the manifest's adapter digest matches",
    None: "the manifest records no adapter digest",
    False: "[red]the manifest records another adapter digest: it came with other weights[/red]",
}


def _manifest_lines(version: dict) -> list[str]:
    """A version's manifest in a few lines (its key numbers), or that it has none."""
    ref = f"{version['name']}@{version['version']}"
    if version.get("manifest") is None:
        return [f"{ref}: no manifest"]
    summary = [f"  {line}" for line in manifest_summary(version["manifest"])]
    return [f"{ref} manifest ({_MATCHES[version.get('manifest_matches')]}):", *summary]


@adapters.command("show")
def adapters_show(name: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """NAME's versions, and a summary of the trainer's manifest each was uploaded with."""
    versions = LorafleetClient(url, api_key).get_adapter(name)["versions"]
    console.print(_versions_table(versions))
    for version in versions:
        console.print("\n".join(_manifest_lines(version)), highlight=False, soft_wrap=True)


@adapters.command("delete")
def adapters_delete(
    name: str, version: int, url: Url = DEFAULT_URL, api_key: ApiKey = None
) -> None:
    """Delete one version (refused while a deployment serves it)."""
    deleted = LorafleetClient(url, api_key).delete_version(name, version)
    console.print(f"deleted {deleted['name']}@{deleted['version']}")


@deployments.command("set")
def deployments_set(
    deployment: str,
    adapter: Annotated[str, typer.Argument(help="NAME, NAME@N or a digest.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Serve ADAPTER under DEPLOYMENT (the `model` clients send) from the next request on."""
    result = LorafleetClient(url, api_key).deploy(deployment, adapter)
    a = result["adapter"]
    console.print(f"{result['name']} -> {a['name']}@{a['version']} ({a['digest'][:12]})")


@deployments.command("list")
def deployments_list(url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    table = Table("deployment", "adapter", "digest", "updated")
    for d in LorafleetClient(url, api_key).list_deployments():
        a = d["adapter"]
        table.add_row(
            d["name"], f"{a['name']}@{a['version']}", a["digest"][:12], d["updated_at"][:19]
        )
    console.print(table)


@deployments.command("format")
def deployments_format(
    deployment: str,
    json_schema: Annotated[
        Optional[Path], typer.Option(exists=True, dir_okay=False, help="JSON schema file.")
    ] = None,
    regex: Annotated[Optional[str], typer.Option(help="Regex the whole answer must match.")] = None,
    choice: Annotated[
        Optional[str], typer.Option(help="The answers allowed, comma-separated, e.g. A,B,C,D.")
    ] = None,
    enforce: Annotated[
        bool,
        typer.Option(
            help="The engine produces the format (vLLM's structured outputs) for every request "
            "that sends no constraint of its own; else it is only measured."
        ),
    ] = False,
    clear: Annotated[bool, typer.Option(help="Remove the declared format.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Declare the answer format (rollouts, A/B tests and drift measure format validity against
    it; `--enforce` makes the engine produce it)."""
    given = (json_schema, regex, choice, clear or None)
    if sum(x is not None for x in given) != 1:
        raise typer.BadParameter("give exactly one of --json-schema, --regex, --choice or --clear")
    spec: dict[str, Any]
    try:
        spec = (
            {"json_schema": json.loads(json_schema.read_text())}
            if json_schema
            else {"regex": regex}
            if regex
            else {"choice": [c.strip() for c in choice.split(",")]}
            if choice
            else {}
        )
    except ValueError as exc:
        raise typer.BadParameter(f"{json_schema} is not valid JSON: {exc}") from exc
    if enforce:
        spec["enforce"] = True
    result = LorafleetClient(url, api_key).set_answer_format(deployment, spec)
    console.print(f"{result['name']}: answer format {json.dumps(result['answer_format'])}")


@validation.command("push")
def validation_push(
    deployment: str,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    metric: Annotated[str, typer.Option(help="exact_match | anls | json_fields")] = "exact_match",
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Upload FILE (chat JSONL, the training format) as DEPLOYMENT's fixed validation set."""
    with working("checking and uploading the validation set"):
        stored = LorafleetClient(url, api_key).push_validation(deployment, file, metric)
    console.print(
        f"{deployment}: validation set {stored['digest'][:12]}, {stored['items']} items, "
        f"metric {stored['metric']}"
    )


@validation.command("show")
def validation_show(deployment: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    stored = LorafleetClient(url, api_key).get_validation(deployment)
    console.print(
        f"{deployment}: validation set {stored['digest']}, {stored['items']} items, metric "
        f"{stored['metric']}, uploaded {stored['created_at'][:19]}"
    )

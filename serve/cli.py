"""`lorafleet`: one CLI. Each command parses, calls one library function, and prints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from adapters.errors import LorafleetError

from .client import LorafleetClient

__all__ = ["app"]

console = Console()


class _Commands(typer.core.TyperGroup):
    """Our errors are caught once, here: `ErrorType: message` in red, exit code 1."""

    def invoke(self, ctx: typer.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except LorafleetError as exc:
            Console(stderr=True).print(f"[red]{type(exc).__name__}: {exc.message}[/red]", highlight=False)
            raise typer.Exit(1) from None


app = typer.Typer(cls=_Commands, no_args_is_help=True, help="Serve many tenants' LoRA adapters on one base VLM.")
tenants = typer.Typer(no_args_is_help=True, help="Tenants (admin key).")
adapters_cli = typer.Typer(no_args_is_help=True, help="Adapter versions (tenant key).")
deployments = typer.Typer(no_args_is_help=True, help="Deployments (tenant key).")
tiny = typer.Typer(no_args_is_help=True, help="The tiny local Qwen2.5-VL used by the demo and the tests.")
app.add_typer(tenants, name="tenants")
app.add_typer(adapters_cli, name="adapters")
app.add_typer(deployments, name="deployments")
app.add_typer(tiny, name="tiny-model")

Url = Annotated[str, typer.Option(envvar="LORAFLEET_URL", help="Gateway URL.")]
ApiKey = Annotated[Optional[str], typer.Option(envvar="LORAFLEET_API_KEY", help="Tenant API key.")]
AdminKey = Annotated[Optional[str], typer.Option(envvar="LORAFLEET_ADMIN_KEY", help="Admin key.")]
DEFAULT_URL = "http://127.0.0.1:8000"


@app.command()
def serve(
    base: Annotated[Optional[str], typer.Option(help="Base model: hub id or local path.")] = None,
    host: Annotated[Optional[str], typer.Option()] = None,
    port: Annotated[Optional[int], typer.Option()] = None,
    home: Annotated[Optional[Path], typer.Option(help="State folder (catalog, adapters, logs).")] = None,
) -> None:
    """Run the gateway and its supervised vLLM engine."""
    import uvicorn

    from .gateway import create_app
    from .settings import Settings

    overrides = {k: v for k, v in dict(base=base, host=host, port=port, home=home).items() if v is not None}
    settings = Settings(**overrides)
    try:
        settings.require_admin_key()
        application = create_app(settings)
    except (ValueError, OSError) as exc:
        raise LorafleetError(str(exc)) from exc
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the engine health checks every few seconds
    console.print(f"lorafleet gateway on http://{settings.host}:{settings.port}, base {settings.base}, "
                  f"state in {settings.home}")
    uvicorn.run(application, host=settings.host, port=settings.port, log_level="info")


@tenants.command("create")
def tenants_create(name: str, url: Url = DEFAULT_URL, admin_key: AdminKey = None) -> None:
    """Create a tenant and print its API key (shown only once)."""
    created = LorafleetClient(url, admin_key).create_tenant(name)
    console.print(f"tenant [bold]{created['name']}[/bold] created; API key (store it now, it is not shown again):")
    print(created["api_key"])


@tenants.command("list")
def tenants_list(url: Url = DEFAULT_URL, admin_key: AdminKey = None) -> None:
    for name in LorafleetClient(url, admin_key).list_tenants():
        print(name)


@adapters_cli.command("push")
def adapters_push(name: str, folder: Annotated[Path, typer.Argument(exists=True, file_okay=False)],
                  url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Upload a PEFT LoRA adapter folder as a new version of NAME."""
    columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"uploading {name}", total=None)
        version = LorafleetClient(url, api_key).push_adapter(
            name, folder, lambda sent, total: progress.update(task, completed=sent, total=total))
    console.print(f"{version['name']}@{version['version']}  digest {version['digest']}  rank {version['rank']}  "
                  f"{version['size_bytes']} bytes")


def _versions_table(rows: list[dict]) -> Table:
    table = Table("adapter", "version", "digest", "rank", "targets", "bytes", "created")
    for v in rows:
        table.add_row(v["name"], str(v["version"]), v["digest"][:12], str(v["rank"]), ",".join(v["target_modules"]),
                      str(v["size_bytes"]), v["created_at"][:19])
    return table


@adapters_cli.command("list")
def adapters_list(url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    adapters = LorafleetClient(url, api_key).list_adapters()
    console.print(_versions_table([v for a in adapters for v in a["versions"]]))


@adapters_cli.command("show")
def adapters_show(name: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    console.print(_versions_table(LorafleetClient(url, api_key).get_adapter(name)["versions"]))


@adapters_cli.command("delete")
def adapters_delete(name: str, version: int, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Delete one version (refused while a deployment serves it)."""
    deleted = LorafleetClient(url, api_key).delete_version(name, version)
    console.print(f"deleted {deleted['name']}@{deleted['version']}")


@deployments.command("set")
def deployments_set(deployment: str, adapter: Annotated[str, typer.Argument(help="NAME, NAME@N or a digest.")],
                    url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Serve ADAPTER under DEPLOYMENT (the `model` clients send) from the next request on."""
    result = LorafleetClient(url, api_key).deploy(deployment, adapter)
    a = result["adapter"]
    console.print(f"{result['name']} -> {a['name']}@{a['version']} ({a['digest'][:12]})")


@deployments.command("list")
def deployments_list(url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    table = Table("deployment", "adapter", "digest", "updated")
    for d in LorafleetClient(url, api_key).list_deployments():
        a = d["adapter"]
        table.add_row(d["name"], f"{a['name']}@{a['version']}", a["digest"][:12], d["updated_at"][:19])
    console.print(table)


@tiny.command("build")
def tiny_build(out: Path, seed: int = 0) -> None:
    """Build the tiny Qwen2.5-VL (tokenizer, processor, weights) in OUT."""
    from train.tiny_model import build_tiny_model

    console.print(f"tiny model written to {build_tiny_model(out, seed)}")


@tiny.command("adapter")
def tiny_adapter(base: Path, out: Path, seed: int = 1, rank: int = 8) -> None:
    """Write a random (seeded) LoRA adapter for BASE that visibly changes its outputs."""
    from train.random_adapter import make_random_adapter

    console.print(f"adapter written to {make_random_adapter(base, out, seed, rank)}")


if __name__ == "__main__":
    app()

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
def tiny_build(out: Path, seed: int = 0,
               pretrain_steps: Annotated[Optional[int], typer.Option(help="General-task pre-training steps.")] = None) -> None:
    """Build the tiny Qwen2.5-VL in OUT and pre-train it on the shapes world (a base with something to forget)."""
    from train.tiny_model import PRETRAIN_STEPS, build_tiny_model

    steps = PRETRAIN_STEPS if pretrain_steps is None else pretrain_steps
    with console.status(f"building the tiny model ({steps} pre-training steps)"):
        console.print(f"tiny model written to {build_tiny_model(out, seed, steps)}")


@tiny.command("data")
def tiny_data(out: Path, train_size: int = 400, val_size: int = 60, seed: int = 0) -> None:
    """Write the shapes world's tasks as chat JSONL: general (the probe), json and french (tenant tasks)."""
    from train.shapes import TASKS, write_task

    for task in TASKS:
        write_task(task, train_size, out / f"{task}-train.jsonl", seed)
        write_task(task, val_size, out / f"{task}-val.jsonl", seed + 1)
    console.print(f"{', '.join(TASKS)} train/val sets written to {out}")


@tiny.command("adapter")
def tiny_adapter(base: Path, out: Path, seed: int = 1, rank: int = 8) -> None:
    """Write a random (seeded) LoRA adapter for BASE that visibly changes its outputs."""
    from train.random_adapter import make_random_adapter

    console.print(f"adapter written to {make_random_adapter(base, out, seed, rank)}")


def report_table(report) -> Table:
    """Base vs adapter, side by side, per data set."""
    table = Table("set", "n", "metric", "base", "adapter", "change", "format", "base fmt", "adapter fmt")
    for s in report.sets:
        fmt = (s.format_name or "-", f"{s.base_format:.0%}" if s.base_format is not None else "-",
               f"{s.adapter_format:.0%}" if s.adapter_format is not None else "-")
        table.add_row(s.name, str(s.n), s.metric, f"{s.base:.3f}", f"{s.adapter:.3f}", f"{s.delta:+.3f}", *fmt)
    return table


def _print_report(report) -> None:
    console.print(report_table(report))
    for line in report.verdicts():
        console.print(f"[yellow]{line}[/yellow]", highlight=False)


Opt = typer.Option


@app.command("train")
def train_command(
    base: Annotated[Optional[str], Opt(help="Base model: hub id or local path.")] = None,
    train: Annotated[Optional[Path], Opt(help="Training chat JSONL.")] = None,
    val: Annotated[Optional[Path], Opt(help="Validation chat JSONL.")] = None,
    probe: Annotated[Optional[Path], Opt(help="General-ability probe JSONL (forgetting check).")] = None,
    out: Annotated[Optional[Path], Opt(help="Adapter output folder.")] = None,
    mix: Annotated[Optional[Path], Opt(help="General chat JSONL mixed into training (against forgetting).")] = None,
    mix_ratio: Annotated[Optional[float], Opt(help="Mixed examples per training example.")] = None,
    config: Annotated[Optional[Path], Opt(help="YAML config; flags override it.")] = None,
    rank: Annotated[Optional[int], Opt()] = None, alpha: Annotated[Optional[float], Opt()] = None,
    dropout: Annotated[Optional[float], Opt()] = None, lr: Annotated[Optional[float], Opt()] = None,
    epochs: Annotated[Optional[int], Opt()] = None, max_steps: Annotated[Optional[int], Opt()] = None,
    batch_size: Annotated[Optional[int], Opt()] = None, grad_accum: Annotated[Optional[int], Opt()] = None,
    max_length: Annotated[Optional[int], Opt()] = None, seed: Annotated[Optional[int], Opt()] = None,
    eval_every: Annotated[Optional[int], Opt()] = None, patience: Annotated[Optional[int], Opt()] = None,
    metric: Annotated[Optional[str], Opt(help="exact_match | anls | json_fields")] = None,
    gradient_checkpointing: Annotated[Optional[bool], Opt()] = None,
    qlora: Annotated[Optional[str], Opt(help="auto | on | off")] = None,
    resume: Annotated[bool, Opt(help="Continue from OUT/checkpoint.")] = False,
    push: Annotated[Optional[str], Opt(help="After the checks pass, upload and deploy to this deployment.")] = None,
    name: Annotated[Optional[str], Opt(help="Adapter name for --push (default: OUT's folder name).")] = None,
    url: Url = DEFAULT_URL, api_key: ApiKey = None,
) -> None:
    """Train a LoRA adapter, score it against the base, prove it servable, and optionally push it."""
    from accelerate import PartialState

    from train.config import load_config
    from train.pipeline import finish
    from train.trainer import train as run_training

    settings = load_config(config, base=base, train=train, val=val, probe=probe, out=out, mix=mix,
                           mix_ratio=mix_ratio, rank=rank, alpha=alpha,
                           dropout=dropout, lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                           grad_accum=grad_accum, max_length=max_length, seed=seed, eval_every=eval_every,
                           patience=patience, metric=metric, gradient_checkpointing=gradient_checkpointing,
                           qlora=qlora)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result = run_training(settings, resume=resume)
    if not PartialState().is_main_process:
        return
    console.print(f"trained {result.steps} steps, {result.samples_per_s:.1f} samples/s, peak memory "
                  f"{result.peak_memory_mb:.0f} MB, best validation loss {result.best_val_loss}")
    with console.status("evaluating base vs adapter and proving the adapter servable in vLLM"):
        manifest, report = finish(settings, result)
    _print_report(report)
    console.print(f"servable: digest {manifest['adapter_digest'][:12]}, changes {manifest['servability']['changed']}/"
                  f"{manifest['servability']['prompts']} check outputs, vLLM = PEFT on the first "
                  f"{settings.check_tokens} tokens; manifest at {settings.out / 'manifest.json'}")
    if push:
        client = LorafleetClient(url, api_key)
        version = client.push_adapter(name or settings.out.name, settings.out)
        client.deploy(push, f"{version['name']}@{version['version']}")
        console.print(f"pushed {version['name']}@{version['version']} and deployed it as {push}")


@app.command("eval")
def eval_command(
    base: Annotated[str, Opt(help="Base model: hub id or local path.")],
    adapter: Annotated[Path, Opt(exists=True, file_okay=False, help="Adapter folder.")],
    val: Annotated[Optional[Path], Opt(help="Validation chat JSONL.")] = None,
    probe: Annotated[Optional[Path], Opt(help="General-ability probe JSONL.")] = None,
    metric: Annotated[str, Opt(help="exact_match | anls | json_fields")] = "exact_match",
    max_tokens: int = 64,
) -> None:
    """Score the base and the adapter side by side through vLLM."""
    from train.evaluate import evaluate
    from train.metrics import METRICS

    if metric not in METRICS:
        raise typer.BadParameter(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if val is None and probe is None:
        raise typer.BadParameter("give --val and/or --probe")
    with console.status("generating with vLLM"):
        report = evaluate(base, adapter, val, probe, metric, max_tokens)
    _print_report(report)


if __name__ == "__main__":
    app()

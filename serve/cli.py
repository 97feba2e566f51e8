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
validation = typer.Typer(no_args_is_help=True, help="A deployment's fixed validation set (tenant key).")
rollout = typer.Typer(no_args_is_help=True, help="Staged canary rollouts with a validation gate (tenant key).")
ab = typer.Typer(no_args_is_help=True, help="A/B tests with fixed weights (tenant key).")
drift = typer.Typer(no_args_is_help=True, help="Drift monitoring of live adapters (tenant key).")
app.add_typer(tenants, name="tenants")
app.add_typer(adapters_cli, name="adapters")
app.add_typer(deployments, name="deployments")
app.add_typer(tiny, name="tiny-model")
app.add_typer(validation, name="validation")
app.add_typer(rollout, name="rollout")
app.add_typer(ab, name="ab")
app.add_typer(drift, name="drift")

Url = Annotated[str, typer.Option(envvar="LORAFLEET_URL", help="Gateway URL.")]
ApiKey = Annotated[Optional[str], typer.Option(envvar="LORAFLEET_API_KEY", help="Tenant API key.")]
AdminKey = Annotated[Optional[str], typer.Option(envvar="LORAFLEET_ADMIN_KEY", help="Admin key.")]
DEFAULT_URL = "http://127.0.0.1:8000"


@app.command()
def serve(
    base: Annotated[Optional[str], typer.Option(help="Base model: hub id or local path (quantized or not).")] = None,
    quantize: Annotated[Optional[str], typer.Option(
        help="auto (the checkpoint's own quantization, else int4) | none | int4 | int8 | fp8 (GPU).")] = None,
    group_size: Annotated[Optional[int], typer.Option(help="int4: weights per scale.")] = None,
    host: Annotated[Optional[str], typer.Option()] = None,
    port: Annotated[Optional[int], typer.Option()] = None,
    home: Annotated[Optional[Path], typer.Option(help="State folder (catalog, adapters, logs).")] = None,
) -> None:
    """Run the gateway and its supervised vLLM engine."""
    import uvicorn

    from .gateway import create_app
    from .settings import Settings

    overrides = {k: v for k, v in dict(base=base, quantize=quantize, quantize_group_size=group_size, host=host,
                                       port=port, home=home).items() if v is not None}
    settings = Settings(**overrides)
    try:
        settings.require_admin_key()
        application = create_app(settings)
    except (ValueError, OSError) as exc:
        raise LorafleetError(str(exc)) from exc
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the engine health checks every few seconds
    engine = application.state.gateway.engine
    console.print(f"lorafleet gateway on http://{settings.host}:{settings.port}, base {settings.base}, "
                  f"state in {settings.home}\nhardware: {engine.hardware.describe()}; "
                  f"quantization: {engine.quantization.label}", highlight=False)
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


@deployments.command("format")
def deployments_format(
    deployment: str,
    json_schema: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="JSON schema file.")] = None,
    regex: Annotated[Optional[str], typer.Option(help="Regex the whole answer must match.")] = None,
    clear: Annotated[bool, typer.Option(help="Remove the declared format.")] = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None,
) -> None:
    """Declare the answer format (rollouts and A/B tests measure format validity against it)."""
    import json

    if sum(x is not None and x is not False for x in (json_schema, regex, clear or None)) != 1:
        raise typer.BadParameter("give exactly one of --json-schema, --regex or --clear")
    try:
        spec = {"json_schema": json.loads(json_schema.read_text())} if json_schema else {"regex": regex} if regex else {}
    except ValueError as exc:
        raise typer.BadParameter(f"{json_schema} is not valid JSON: {exc}") from exc
    result = LorafleetClient(url, api_key).set_answer_format(deployment, spec)
    console.print(f"{result['name']}: answer format {json.dumps(result['answer_format'])}")


@validation.command("push")
def validation_push(deployment: str, file: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
                    metric: Annotated[str, typer.Option(help="exact_match | anls | json_fields")] = "exact_match",
                    url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Upload FILE (chat JSONL, the training format) as DEPLOYMENT's fixed validation set."""
    with console.status("checking and uploading the validation set"):
        stored = LorafleetClient(url, api_key).push_validation(deployment, file, metric)
    console.print(f"{deployment}: validation set {stored['digest'][:12]}, {stored['items']} items, "
                  f"metric {stored['metric']}")


@validation.command("show")
def validation_show(deployment: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    stored = LorafleetClient(url, api_key).get_validation(deployment)
    console.print(f"{deployment}: validation set {stored['digest']}, {stored['items']} items, metric "
                  f"{stored['metric']}, uploaded {stored['created_at'][:19]}")


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
        raise typer.BadParameter(f"{value!r}: steps are comma-separated percents, e.g. 10,25,50,100") from None


def _when(epoch: float | None) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(epoch).strftime("%H:%M:%S") if epoch else "-"


def _print_rollout(r: dict, decisions: int = 8) -> None:
    color = {"Promoted": "green", "RolledBack": "red", "GateRefused": "red", "Aborted": "yellow"}.get(r["phase"], "cyan")
    step = (f"step {r['step_index'] + 1}/{len(r['steps'])}" if r["kind"] == "canary" and r["step_index"] >= 0
            else r["kind"])
    console.print(f"[bold]{r['deployment']}[/bold] {r['kind']} #{r['id']}: [{color}]{r['phase']}[/{color}] ({step}) "
                  f"- {r['reason']}: {r['message']}", highlight=False)
    table = Table("variant", "version", "digest", "weight")
    for v in r["variants"]:
        table.add_row(v["label"], v["ref"], v["digest"][:12], f"{v['weight']:g}%")
    console.print(table)
    if r["decisions"]:
        history = Table("time", "action", "reason", "actor", "message", title="decisions")
        for d in r["decisions"][-decisions:]:
            history.add_row(_when(d["at"]), d["action"], d["reason"], d["actor"], d["message"])
        console.print(history)


@rollout.command("start")
def rollout_start(
    deployment: str,
    to: Annotated[str, typer.Option(help="Candidate: NAME, NAME@N or a digest.")],
    steps: Annotated[str, typer.Option(help="Canary weight per step, percent.")] = "10,25,50,100",
    min_requests: Annotated[int, typer.Option(min=1, help="Per variant and step before advancing.")] = 100,
    interval: Annotated[str, typer.Option(help="Minimum time per step, and between looks (60s, 5m).")] = "60s",
    margin: Annotated[float, typer.Option(min=0, max=1, help="Validation-gate non-inferiority margin.")] = 0.05,
    gate: Annotated[bool, typer.Option(help="Run the validation-set gate before any traffic.")] = True,
    wait: Annotated[bool, typer.Option(help="Wait for the gate's verdict.")] = True,
    url: Url = DEFAULT_URL, api_key: ApiKey = None,
) -> None:
    """Start a staged canary rollout of DEPLOYMENT to a new adapter version."""
    import time

    client = LorafleetClient(url, api_key)
    r = client.start_rollout(deployment, to=to, steps=_steps(steps), min_requests=min_requests,
                             interval_s=_seconds(interval), margin=margin, gate=gate)
    if wait and r["phase"] == "Gating":
        with console.status("the candidate and the stable version answer the validation set"):
            while r["phase"] == "Gating":
                time.sleep(1)
                r = client.rollout(deployment)
    _print_rollout(r)
    if r["phase"] == "GateRefused":
        raise typer.Exit(1)


@rollout.command("status")
def rollout_status(deployment: Annotated[Optional[str], typer.Argument()] = None,
                   url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """One deployment's rollout with its recent decisions, or every deployment's latest rollout."""
    client = LorafleetClient(url, api_key)
    if deployment:
        _print_rollout(client.rollout(deployment))
        return
    table = Table("deployment", "kind", "phase", "step", "variants", "reason")
    for r in client.rollouts():
        table.add_row(r["deployment"], r["kind"], r["phase"], str(r["step_index"] + 1) if r["kind"] == "canary" else "-",
                      ", ".join(f"{v['label']} {v['ref']} {v['weight']:g}%" for v in r["variants"]), r["reason"])
    console.print(table)


@rollout.command("promote")
def rollout_promote(deployment: str, full: Annotated[bool, typer.Option(help="Straight to 100%.")] = False,
                    url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Advance one step now (or all the way with --full), without waiting for the analysis."""
    _print_rollout(LorafleetClient(url, api_key).rollout_action(deployment, "promote", full=full), decisions=3)


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
    console.print(f"{d['name']} -> {d['adapter']['name']}@{d['adapter']['version']} (was {d['previous_adapter']})")


def _variant(value: str) -> tuple[str, float]:
    ref, sep, weight = value.rpartition("=")
    try:
        if not sep or not ref:
            raise ValueError
        return ref, float(weight)
    except ValueError:
        raise typer.BadParameter(f"{value!r}: use NAME@N=WEIGHT, e.g. invoice@3=50") from None


@ab.command("start")
def ab_start(deployment: str,
             variant: Annotated[list[str], typer.Option(help="NAME@N=WEIGHT (percent); repeat for each variant.")],
             url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Split DEPLOYMENT's traffic between versions with fixed weights (they must sum to 100)."""
    _print_rollout(LorafleetClient(url, api_key).start_ab(deployment, [_variant(v) for v in variant]))


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _interval(entry: dict | None, spec: str = "+.3f") -> str:
    if not entry:
        return "-"
    low, high = entry["interval"]
    return f"{entry['diff']:{spec}} [{low:{spec}}, {high:{spec}}]"


@ab.command("status")
def ab_status(deployment: str,
              validation_scores: Annotated[bool, typer.Option("--validation", help="Also replay the validation set.")] = False,
              url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Per-variant live metrics and differences from the first variant, with 95% intervals."""
    client = LorafleetClient(url, api_key)
    status = client.ab_status(deployment)
    _print_rollout(status["rollout"], decisions=3)
    table = Table("variant", "requests", "units", "error rate", "p50 ms", "p95 ms", "output tokens", "format valid")
    for v in status["variants"]:
        table.add_row(v["variant"], str(v["requests"]), str(v["units"]), _fmt(v["error_rate"]),
                      _fmt(v["latency_p50_ms"], ".0f"), _fmt(v["latency_p95_ms"], ".0f"),
                      _fmt(v["output_tokens_mean"], ".1f"), _fmt(v["format_validity"]))
    console.print(table)
    diffs = Table("variant", "vs", "error rate diff [95% CI]", "format validity diff [95% CI]",
                  "output tokens diff [95% CI]", "latency median ratio (p)", title="differences")
    for c in status["comparisons"]:
        latency = c.get("latency")
        diffs.add_row(c["variant"], c["against"], _interval(c.get("error_rate")), _interval(c.get("format_validity")),
                      _interval(c.get("output_tokens"), "+.1f"),
                      f"{latency['median_ratio']:.2f} (p={latency['p']:.2g})" if latency else "-")
    console.print(diffs)
    console.print(status["sample_ratio"]["message"], highlight=False)
    if validation_scores:
        with console.status("every variant answers the validation set"):
            result = client.ab_evaluate(deployment)
        scores = Table("variant", f"{result['metric']} (n={result['items']})", "diff vs first [95% CI]", "verdict",
                       "test", "p", title="validation set")
        first = next(iter(result["scores"]))
        scores.add_row(first, f"{result['scores'][first]:.3f}", "-", "-", "-", "-")
        for d in result["differences"]:
            low, high = d["interval"]
            scores.add_row(d["variant"], f"{result['scores'][d['variant']]:.3f}",
                           f"{d['effect']:+.3f} [{low:+.3f}, {high:+.3f}]", d["verdict"], d["test"], f"{d['p']:.2g}")
        console.print(scores)


@ab.command("stop")
def ab_stop(deployment: str, keep: Annotated[Optional[str], typer.Option(help="NAME@N that becomes stable.")] = None,
            url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """End the A/B test; --keep makes that variant the stable version."""
    _print_rollout(LorafleetClient(url, api_key).stop_ab(deployment, keep), decisions=3)


@drift.command("check")
def drift_check(deployment: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Every live version answers the validation set now (greedy) and is compared with its baseline."""
    with console.status("every live version answers the validation set"):
        runs = LorafleetClient(url, api_key).drift_check(deployment)
    table = Table("variant", "version", "kind", "score", "equal to baseline", "message")
    for run in runs:
        table.add_row(run["variant"], run["version"], run["kind"], f"{run['score']:.3f}",
                      f"{run['exact_match_rate']:.3f}", run["message"])
    console.print(table)
    if any(run["changed"] for run in runs):
        raise typer.Exit(1)


@drift.command("look")
def drift_look(deployment: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Test the requests sampled so far for input and output drift now."""
    _print_drift([LorafleetClient(url, api_key).drift_look(deployment)])


def _print_drift(statuses: list[dict]) -> None:
    table = Table("deployment", "variant", "validation score", "equal to baseline", "input drift p (q)",
                  "output drift p (q)", "samples", "status")
    for s in statuses:
        outputs = {c["variant"]: c for c in s["output"]}
        variants = [r["variant"] for r in s["runs"]] or list(outputs) or ["-"]
        for variant in variants:
            run = next((r for r in s["runs"] if r["variant"] == variant), None)
            out = outputs.get(variant)
            alarms = [name for name, bad in (("replay changed", run and run["changed"]),
                                             ("input drift", s["input"] and s["input"]["drifted"]),
                                             ("output drift", out and out["drifted"])) if bad]
            table.add_row(s["deployment"], variant, f"{run['score']:.3f}" if run else "-",
                          f"{run['exact_match_rate']:.3f}" if run else "-",
                          f"{s['input']['p']:.2g} ({s['input']['q']:.2g})" if s["input"] else "-",
                          f"{out['p']:.2g} ({out['q']:.2g})" if out else "-",
                          f"{s['samples']}{'' if s['sample_inputs'] else ' (opted out)'}",
                          "[red]" + ", ".join(alarms) + "[/red]" if alarms else "[green]ok[/green]")
    console.print(table)


@drift.command("status")
def drift_status(deployment: Annotated[Optional[str], typer.Argument()] = None,
                 url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Validation replay, input drift and output drift of every live version, one row each."""
    _print_drift(LorafleetClient(url, api_key).drift_status(deployment))


@drift.command("report")
def drift_report(deployment: str, out: Annotated[Path, typer.Option(help="HTML file to write.")] = Path("report.html"),
                 url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Write a self-contained HTML report with plots of the deployment's replays and drift looks."""
    from .drift_report import render_report

    client = LorafleetClient(url, api_key)
    page = render_report(client.drift_history(deployment), client.drift_status(deployment)[0])
    out.write_text(page, encoding="utf-8")
    console.print(f"report written to {out} ({len(page) // 1024} KiB)")


@drift.command("sampling")
def drift_sampling(state: Annotated[str, typer.Argument(help="on | off")],
                   url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Opt this tenant in or out of live-request sampling (off deletes what was kept)."""
    if state not in ("on", "off"):
        raise typer.BadParameter(f"{state!r}: use on or off")
    result = LorafleetClient(url, api_key).drift_sampling(state == "on")
    console.print(f"live-request sampling {state}; {result['deleted_samples']} stored samples deleted")


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


@app.command("quantize")
def quantize_command(
    base: Annotated[str, Opt(help="Full-precision base: hub id or local path.")],
    out: Annotated[Path, Opt(help="New folder for the quantized checkpoint.")],
    scheme: Annotated[str, Opt(help="int4 | int8 (torchao weight-only: any CPU, GPUs) | w4a16 (compressed-tensors, "
                                    "packed 4-bit: AVX-512 CPUs in bfloat16, CUDA GPUs with Marlin).")] = "int4",
    group_size: Annotated[int, Opt(help="int4, w4a16: weights per scale.")] = 32,
) -> None:
    """Write a quantized checkpoint of BASE that `lorafleet serve --base OUT` serves as it is."""
    from train.quantize import quantize

    with console.status(f"quantizing {base} to {scheme}"):
        report = quantize(base, out, scheme, group_size)
    mib = 1024 * 1024
    console.print(f"{report.quantized_layers} language-model layers quantized to {scheme} in {report.seconds:.1f} s: "
                  f"their weights {report.weights_bytes_before / mib:.1f} MiB -> {report.weights_bytes_after / mib:.1f}"
                  f" MiB; kept in full precision: {', '.join(report.kept_full_precision)}\n"
                  f"checkpoint: {report.out} ({report.checkpoint_bytes / mib:.1f} MiB); serve it with "
                  f"`lorafleet serve --base {report.out}`", highlight=False)


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

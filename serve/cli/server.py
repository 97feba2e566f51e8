"""`lorafleet serve`: the gateway and its supervised engine."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lorafleet.errors import LorafleetError
from lorafleet.serve.cli.common import DEFAULT_URL, AdminKey, Url, console

__all__ = ["serve", "engine", "engines"]


def serve(
    base: Annotated[
        Optional[str], typer.Option(help="Base model: hub id or local path (quantized or not).")
    ] = None,
    quantize: Annotated[
        Optional[str],
        typer.Option(
            help="auto (the checkpoint's own quantization, else int4) | none | int4 | int8 | "
            "fp8 (GPU)."
        ),
    ] = None,
    group_size: Annotated[Optional[int], typer.Option(help="int4: weights per scale.")] = None,
    host: Annotated[Optional[str], typer.Option()] = None,
    port: Annotated[Optional[int], typer.Option()] = None,
    home: Annotated[
        Optional[Path], typer.Option(help="State folder (catalog, adapters, logs).")
    ] = None,
    upgrade: Annotated[
        bool,
        typer.Option(
            "--upgrade",
            help="Upgrade a catalog that is behind this release first (SQLite: after a backup "
            "copy next to it; LORAFLEET_CATALOG_AUTO_UPGRADE).",
        ),
    ] = False,
    replicas: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            max=64,
            help="Engines to start and supervise here (LORAFLEET_REPLICAS; a multi-GPU box: "
            "one each).",
        ),
    ] = None,
    engine: Annotated[
        Optional[list[str]],
        typer.Option(
            "--engine",
            help="An engine node's URL (`lorafleet engine`), repeatable; a host name that "
            "resolves to several addresses (a headless Service) is every one of them "
            "(LORAFLEET_ENGINES).",
        ),
    ] = None,
    pool: Annotated[
        Optional[str],
        typer.Option(
            "--pool",
            help="An InferencePool's gateway URL (llm-d, Gateway API Inference Extension) in "
            "front of engine nodes, which places requests itself (LORAFLEET_POOL_URL).",
        ),
    ] = None,
) -> None:
    """Run the gateway and its supervised vLLM engine (or engines, or in front of engine nodes or
    an InferencePool)."""
    import os

    import uvicorn
    from pydantic import ValidationError

    from lorafleet.serve.api.app import create_app
    from lorafleet.serve.engine.command import engine_pictures, tower_lora
    from lorafleet.serve.settings import Settings

    given = dict(
        base=base,
        quantize=quantize,
        quantize_group_size=group_size,
        host=host,
        port=port,
        home=home,
        catalog_auto_upgrade=True if upgrade else None,  # no flag: the setting decides
        replicas=replicas,
        engines=engine or None,
        pool_url=pool,
    )
    overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:  # e.g. --replicas with --engine: a line each, not a traceback
        raise LorafleetError(
            "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
            )
        ) from exc
    # the state folder's files (catalog, adapters, logs) readable by their owner only
    os.umask(0o077)
    # before the app is built: a catalog upgrade at start logs where its backup copy went
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # alembic says which database dialect each of its migration contexts uses: the upgrades it
    # runs are what matters
    logging.getLogger("alembic.runtime.migration").addFilter(
        lambda record: not record.getMessage().startswith(("Context impl", "Will assume"))
    )
    try:
        settings.require_admin_key()
        application = create_app(settings)
    except (ValueError, OSError) as exc:
        raise LorafleetError(str(exc)) from exc
    # the engine health checks every few seconds
    logging.getLogger("httpx").setLevel(logging.WARNING)
    fleet = application.state.gateway.fleet
    if settings.pool_url:
        engines = f"engines: the InferencePool at {settings.pool_url} (it places every request)"
    elif settings.engines:  # found at start (DNS)
        engines = (
            f"engine nodes at {', '.join(settings.engines)} ({settings.placement_policy} placement)"
        )
    else:
        first = fleet.replicas[0].supervisor
        engines = (
            f"hardware: {first.hardware.describe()}; "
            f"quantization: {first.quantization.label}\nengine: "
            + (
                f"attached at {settings.engine_url}, as it was started"
                if settings.engine_url
                else first.sizing.describe()
                + (f"; {settings.replicas} replicas" if settings.replicas > 1 else "")
            )
        )
        budget = engine_pictures(settings)
        if not settings.engine_url and budget is not None and budget.scales_down:
            engines += f"\npictures: scaled down to at most {budget.describe()}"
        if not settings.engine_url and tower_lora(settings):
            engines += "\nadapters: the language model, the connector and the vision tower"
    console.print(
        f"lorafleet gateway on http://{settings.host}:{settings.port}, base {settings.base}, "
        f"state in {settings.home}\n{engines}",
        highlight=False,
        soft_wrap=True,
    )
    uvicorn.run(
        application,
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=settings.access_log,
    )


def engine(
    base: Annotated[
        Optional[str], typer.Option(help="Base model: hub id or local path (quantized or not).")
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on (a pod's: all of them).")
    ] = "0.0.0.0",
    port: Annotated[int, typer.Option()] = 8100,
    quantize: Annotated[Optional[str], typer.Option(help="As for `serve`.")] = None,
    print_command: Annotated[
        bool, typer.Option("--print-command", help="Print vLLM's command line and exit.")
    ] = False,
) -> None:
    """Run one engine node (a pod or host of its own): vLLM's OpenAI server with LoRA, which
    fetches adapters by digest from the store (LORAFLEET_STORE_URL) into a local cache, behind
    LORAFLEET_ENGINE_API_KEY."""
    import os
    import shlex

    from lorafleet.serve.engine.command import node_command
    from lorafleet.serve.settings import Settings

    overrides: dict[str, Any] = {
        k: v for k, v in dict(base=base, quantize=quantize).items() if v is not None
    }
    try:
        cmd, env = node_command(Settings(**overrides), host, port)
    except (ValueError, OSError) as exc:
        raise LorafleetError(str(exc)) from exc
    if print_command:
        print(shlex.join(cmd))
        return
    # vLLM in this process's place: a container's signals go to it directly
    os.execvpe(cmd[0], cmd, env)


def engines(url: Url = DEFAULT_URL, admin_key: AdminKey = None) -> None:
    """The gateway's engine replicas: address, state, queue, adapters registered, hardware (GET
    /admin/engines)."""
    from rich.table import Table

    from lorafleet.serve.gateway_client import LorafleetClient

    fleet = LorafleetClient(url, admin_key).engines()
    table = Table(
        "replica",
        "address",
        "kind",
        "state",
        "running",
        "waiting",
        "adapters",
        "in memory / GPU",
        "placed",
        "hardware",
        "quantization",
    )
    for r in fleet["replicas"]:
        table.add_row(
            r["name"],
            r["url"],
            r["kind"],
            r["state"],
            str(r["running"]),
            str(r["waiting"]),
            str(len(r["adapters"])),
            f"{len(r['resident']['cpu'])} / {len(r['resident']['gpu'])}",
            str(r["placed"]),
            r["hardware"],
            r["quantization"],
        )
    console.print(table)
    console.print(
        f"the pool places every request: {fleet['placed']} sent to it, {fleet['failovers']} sent "
        "again after it reached no engine"
        if fleet["policy"] == "pool"
        else f"placement {fleet['policy']}: {fleet['placed']} requests placed, "
        f"{fleet['spills']} spilled past their home replica, {fleet['failovers']} sent again "
        "after a replica failed",
        highlight=False,
    )

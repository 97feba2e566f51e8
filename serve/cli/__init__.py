"""`lorafleet`: one CLI, one module per command group. Each command parses, calls one library
function, and prints.

- `server`    serve, engine, engines     - `adapters`  adapters, deployments, validation
- `tenants`   tenants (keys, limits, prices, budgets), audit
- `usage`     usage (the usage report)
- `rollouts`  rollout, ab                - `drift`     drift
- `training`  train, eval, quantize, tiny-model
- `db`        db current, upgrade, backup (the catalog database itself)
- `gc`        gc
- `feedback`  feedback, requests, traffic, capture (the feedback loop)
- `batch`     batch submit, status, results, cancel (OpenAI's Batch API)
- `common`    the options every command shares (`--url`, keys) and the one error handler
- `__main__`  `python -m lorafleet.serve.cli`
"""

from __future__ import annotations

from typing import Annotated

import typer

from lorafleet import __version__
from lorafleet.serve.cli import (
    adapters,
    batch,
    db,
    drift,
    feedback,
    gc,
    rollouts,
    server,
    tenants,
    training,
    usage,
)
from lorafleet.serve.cli.common import Commands

__all__ = ["app"]

app = typer.Typer(
    cls=Commands, no_args_is_help=True, help="Serve many tenants' LoRA adapters on one base VLM."
)


def _print_version(value: bool) -> None:
    if value:
        print(f"lorafleet {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print lorafleet's version and exit.",
        ),
    ] = False,
) -> None:
    """Serve many tenants' LoRA adapters on one base VLM."""


app.command()(server.serve)
app.command()(server.engine)
app.command()(server.engines)
app.command("train")(training.train_command)
app.command("eval")(training.eval_command)
app.command("quantize")(training.quantize_command)
app.add_typer(tenants.tenants, name="tenants")
app.command("audit")(tenants.audit)
app.command("usage")(usage.usage)
app.add_typer(adapters.adapters, name="adapters")
app.add_typer(adapters.deployments, name="deployments")
app.add_typer(training.tiny, name="tiny-model")
app.add_typer(adapters.validation, name="validation")
app.add_typer(rollouts.rollout, name="rollout")
app.add_typer(rollouts.ab, name="ab")
app.add_typer(drift.drift, name="drift")
app.add_typer(db.db, name="db")
app.command("gc")(gc.gc)
app.add_typer(feedback.feedback, name="feedback")
app.command("requests")(feedback.requests)
app.command("traffic")(feedback.traffic)
app.add_typer(feedback.capture, name="capture")
app.add_typer(batch.batch, name="batch")

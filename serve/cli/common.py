"""What every command group shares: the console, the server options, and the one place errors are
printed."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Iterator
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from lorafleet.errors import LorafleetError
from lorafleet.serve.types import epoch

__all__ = [
    "console",
    "notice",
    "Commands",
    "Url",
    "ApiKey",
    "AdminKey",
    "DEFAULT_URL",
    "group",
    "when",
    "progress",
    "working",
]

console = Console()
# in a log (no terminal), a line is never broken at 80 columns: paths and messages stay whole
console.soft_wrap = not console.is_terminal
# what a command says beside its output (stderr): `KEY=$(lorafleet tenants create acme)` is the key
notice = Console(stderr=True)


class Commands(typer.core.TyperGroup):
    """Our errors are caught once, here: `ErrorType: message` in red, exit code 1."""

    def invoke(self, ctx: typer.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except LorafleetError as exc:
            # one line whatever the terminal's width (a refusal to start names its command in it)
            Console(stderr=True).print(
                f"[red]{type(exc).__name__}: {exc.message}[/red]", highlight=False, soft_wrap=True
            )
            raise typer.Exit(1) from None


def group(help: str) -> typer.Typer:
    """A command group (`lorafleet NAME ...`)."""
    return typer.Typer(no_args_is_help=True, help=help)


Url = Annotated[str, typer.Option(envvar="LORAFLEET_URL", help="Gateway URL.")]
ApiKey = Annotated[Optional[str], typer.Option(envvar="LORAFLEET_API_KEY", help="Tenant API key.")]
AdminKey = Annotated[Optional[str], typer.Option(envvar="LORAFLEET_ADMIN_KEY", help="Admin key.")]
DEFAULT_URL = "http://127.0.0.1:8000"


def when(value: str | float | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    """An API time (RFC 3339) in UTC, as the console shows it; "-" for none."""
    seconds = epoch(value)
    return "-" if seconds is None else dt.datetime.fromtimestamp(seconds, dt.UTC).strftime(fmt)


@contextlib.contextmanager
def progress(
    description: str, unit: str, on: Console = console
) -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar on a terminal; in a log (no terminal), a line at each tenth done. Yields
    `update(done, total, note)`."""
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn(f"{{task.completed}}/{{task.total}} {unit}  {{task.fields[note]}}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=on, disable=not on.is_terminal) as bar:
        task = bar.add_task(description, total=None, note="")
        said = 0  # tenths reported

        def update(done: int, total: int, note: str = "") -> None:
            nonlocal said
            bar.update(task, completed=done, total=total, note=note)
            tenth = done * 10 // max(1, total)
            if not on.is_terminal and tenth > said:
                said = tenth
                on.print(f"{description}: {done}/{total} {unit} {note}".rstrip())

        yield update


@contextlib.contextmanager
def working(what: str, on: Console = console) -> Iterator[None]:
    """A spinner with `what` on a terminal; in a log (no terminal), `what` as a line when the work
    starts."""
    if on.is_terminal:
        with on.status(what):
            yield
    else:
        on.print(f"{what} ...", highlight=False)
        yield

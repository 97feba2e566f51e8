"""What every command group shares: the console, the server options, and the one place errors are
printed."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Optional

import typer
from rich.console import Console

from lorafleet.errors import LorafleetError
from lorafleet.serve.types import epoch

__all__ = ["console", "Commands", "Url", "ApiKey", "AdminKey", "DEFAULT_URL", "group", "when"]

console = Console()


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

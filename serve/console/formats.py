"""How the console writes numbers the API returned: one place, so every page says them alike."""

from __future__ import annotations

import math
import time
from typing import Any

from jinja2 import Undefined

from lorafleet.serve.types import epoch

__all__ = ["FILTERS"]

DASH = "–"


def _missing(value: Any) -> bool:
    """Nothing to show: the API said null, a number JSON cannot hold, or a field this answer does
    not have."""
    return (
        value is None
        or isinstance(value, Undefined)
        or (isinstance(value, float) and not math.isfinite(value))
    )


def when(at: float | str | None) -> str:
    """An instant as UTC, to the second (the API gives RFC 3339), as the CLI shows it."""
    if _missing(at):
        return DASH
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch(at)))


def percent(value: Any, digits: int = 1) -> str:
    return DASH if _missing(value) else f"{100 * value:.{digits}f} %"


def number(value: Any, digits: int = 3) -> str:
    if _missing(value):
        return DASH
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}"


def millis(value: Any) -> str:
    if _missing(value):
        return DASH
    return f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def interval(bounds: list[float] | None, digits: int = 3) -> str:
    if not bounds or any(_missing(b) for b in bounds):
        return DASH
    return f"[{bounds[0]:.{digits}g}, {bounds[1]:.{digits}g}]"


def size(n: Any) -> str:
    if _missing(n):
        return DASH
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return DASH


def short(digest: str | None) -> str:
    return digest[:12] if digest else DASH


FILTERS = {
    "when": when,
    "percent": percent,
    "number": number,
    "millis": millis,
    "interval": interval,
    "size": size,
    "short": short,
}

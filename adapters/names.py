"""Names of tenants, adapters and deployments: what the catalog, the API and the CLI accept."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

__all__ = ["NAME_PATTERN", "check_name", "Name"]


NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def check_name(value: str) -> str:
    """Names of tenants, adapters and deployments: 1-63 of letters, digits, '.', '_', '-'."""
    if not NAME_PATTERN.match(value):
        raise ValueError(
            f"invalid name {value!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


Name = Annotated[str, AfterValidator(check_name)]

"""Values shared by the HTTP API (`lorafleet.serve.api`) and the domain packages of `serve/`
(feedback, drift, rollouts, fleet): both may import this module; it imports neither."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator

__all__ = ["UtcDateTime"]


def _as_utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# The catalog stores UTC; SQLite gives it back without a zone. Answers always say it (RFC 3339's
# date-time).
UtcDateTime = Annotated[datetime, AfterValidator(_as_utc)]

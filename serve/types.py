"""Values shared by the HTTP API (`lorafleet.serve.api`) and the domain packages of `serve/`
(feedback, drift, rollouts, fleet): both may import this module; it imports neither."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator

__all__ = ["UtcDateTime", "utc", "epoch", "Route", "RolloutAssignment", "Answer"]


def _as_utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# The catalog stores UTC; SQLite gives it back without a zone. Answers always say it (RFC 3339's
# date-time).
UtcDateTime = Annotated[datetime, AfterValidator(_as_utc)]


def utc(seconds: float) -> datetime:
    """The UTC time `seconds` after the epoch (how the catalog keeps times)."""
    return datetime.fromtimestamp(seconds, UTC)


def epoch(value: datetime | str | float | None) -> float | None:
    """Seconds since the epoch of a time as the API gives it (an RFC 3339 string, or the
    datetime of a schema), for the CLI's tables and the console's and the report's charts."""
    if value is None or isinstance(value, float | int):
        return value
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return _as_utc(value).timestamp()


@dataclass(frozen=True)
class RolloutAssignment:
    """A chat request that a running rollout measures: its step, the variant that served it, and
    its unit (hashed: the sticky key itself never leaves the gateway)."""

    rollout_id: int
    step_index: int
    variant: str
    unit: str


@dataclass(frozen=True)
class Route:
    """Where a chat request goes: the public name the client used, the adapter that serves it,
    and what the deployment records of it."""

    deployment: str
    digest: str
    request_id: str = ""  # the response's `id`
    deployment_id: int = 0
    variant: str = "stable"
    assignment: RolloutAssignment | None = None  # set while a rollout measures this request
    answer_format: dict | None = None
    sample_inputs: bool = False  # the drift monitor may keep this request's features
    capture: dict | None = None  # the deployment's capture policy, when it keeps requests
    tenant: str = ""  # for an InferencePool's flow control (`EngineClient.flow_headers`)
    objective: str | None = None  # the deployment's InferenceObjective (None: the default)

    @property
    def headers(self) -> dict[str, str]:
        """What every response to the request carries (the digest, never the engine's name)."""
        return {
            "x-request-id": self.request_id,
            "x-lorafleet-deployment": self.deployment,
            "x-lorafleet-adapter": self.digest,
            "x-lorafleet-variant": self.variant,
        }


@dataclass(frozen=True)
class Answer:
    """What one chat request got back, as the drift monitor and the rollouts record it."""

    status: int
    text: str | None  # the answer's text; None where nothing asked to read it
    output_tokens: int
    confidence: float | None = None  # the mean token log-probability of an answered request
    format_valid: bool | None = None  # None: no answer format, or not checked

    @property
    def answered(self) -> bool:
        return self.status == 200

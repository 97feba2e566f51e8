"""lorafleet's error tree: every error it raises on purpose, in one place.

Each error knows its HTTP status and OpenAI error `type`/`code`, and carries what a caller needs
(the field, the digest, the catalog). The gateway renders each one in exactly one place
(`lorafleet.serve.api.errors`); the CLI prints `ErrorType: message` and exits 1.

LorafleetError
 ├── Unauthorized              401  missing or wrong key
 ├── NotFound                  404  anything another tenant owns looks exactly like this
 ├── Conflict                  409  e.g. deleting a deployed version, duplicate tenant name
 ├── InvalidRequest            400  malformed input
 │    ├── InvalidAdapter       400  an upload that must not be served (names the field and reason)
 │    └── DataError            400  a bad line of a chat JSONL file (names the file and line)
 ├── PayloadTooLarge           413
 ├── NotServable               422  a trained adapter vLLM would not apply (the trainer's check)
 ├── RateLimited               429  over a rate or concurrency limit; carries Retry-After
 ├── QuotaExceeded             429  over a storage limit: waiting does not fix it
 ├── BudgetExceeded            429  over the tenant's budget of the period; Retry-After: its reset
 ├── StoreCorrupt              500  a copy fetched from the store does not match its manifest
 │                                  or digest (discarded)
 ├── UnsupportedQuantization   500  the base's quantization cannot run on this machine (at start)
 ├── VLLMFailed                500  an offline vLLM run (the trainer's checks) failed
 ├── ServiceUnavailable        503  carries Retry-After
 │    ├── StoreUnavailable     503  the object store did not answer, or does not hold the blob (now)
 │    ├── EngineUnavailable    503  the engine is starting, restarting or did not answer
 │    ├── AdapterLoadFailed    503  the engine refused to load an adapter
 │    ├── EngineBusy           503  no engine slot freed up within the fair queue's timeout
 │    └── NoReplicaUp          503  no replica of the fleet is up for this adapter
 ├── CatalogRevisionError      503  the catalog's schema is not this release's
 │    │                             (raised at start, by `open_catalog`)
 │    ├── CatalogBehind             older: `lorafleet db upgrade` brings it to this release
 │    └── CatalogUnknownRevision    made by a newer lorafleet: this release cannot serve it
 ├── ApiError                  the gateway answered a client (CLI, demo) with an error status
 └── ServerUnreachable         a client (CLI, demo) could not reach the gateway
"""

from __future__ import annotations

import math

__all__ = [
    "code_for_status",
    "LorafleetError",
    "Unauthorized",
    "NotFound",
    "Conflict",
    "InvalidRequest",
    "InvalidAdapter",
    "DataError",
    "PayloadTooLarge",
    "NotServable",
    "RateLimited",
    "QuotaExceeded",
    "BudgetExceeded",
    "StoreCorrupt",
    "UnsupportedQuantization",
    "VLLMFailed",
    "ServiceUnavailable",
    "StoreUnavailable",
    "EngineUnavailable",
    "AdapterLoadFailed",
    "EngineBusy",
    "NoReplicaUp",
    "CatalogRevisionError",
    "CatalogBehind",
    "CatalogUnknownRevision",
    "ApiError",
    "ServerUnreachable",
]


# OpenAI-style string codes of the HTTP statuses that say enough by themselves (an error of another
# status names its own code, or takes its caller's default)
_STATUS_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    422: "invalid_request",
}


def code_for_status(status: int, default: str) -> str:
    """The string `code` of an error answered with HTTP `status`."""
    return _STATUS_CODES.get(status, default)


class LorafleetError(Exception):
    """Base of every error lorafleet raises on purpose."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    headers: dict[str, str] | None = None  # sent with the error (e.g. Retry-After, x-ratelimit-*)
    param: str | None = None  # the request field at fault, where one is

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param


class Unauthorized(LorafleetError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class NotFound(LorafleetError):
    status, type, code = 404, "invalid_request_error", "not_found"


class Conflict(LorafleetError):
    status, type, code = 409, "invalid_request_error", "conflict"


class InvalidRequest(LorafleetError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class InvalidAdapter(InvalidRequest):
    """An uploaded adapter that would fail, or silently do nothing, in the engine."""

    code = "invalid_adapter"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"invalid adapter ({field}): {reason}")
        self.field = field
        self.reason = reason


class PayloadTooLarge(LorafleetError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class ServiceUnavailable(LorafleetError):
    status, type, code = 503, "server_error", "service_unavailable"
    retry_after_s: int = 5


class StoreCorrupt(LorafleetError):
    """A blob whose fetched bytes are not what was stored: never served, and not kept."""

    status, type, code = 500, "server_error", "store_corrupt"

    def __init__(self, digest: str, reason: str) -> None:
        super().__init__(f"stored blob {digest[:12]} is corrupt: {reason}")
        self.digest = digest
        self.reason = reason


class StoreUnavailable(ServiceUnavailable):
    """The store did not answer, or does not hold a blob now (it may be out of sight during a
    delete)."""

    code = "store_unavailable"

    def __init__(self, reason: str, *, digest: str | None = None) -> None:
        super().__init__(
            f"stored blob {digest[:12]} is unavailable: {reason}"
            if digest
            else f"the store is unavailable: {reason}"
        )
        self.digest = digest
        self.reason = reason


class CatalogRevisionError(LorafleetError):
    """The catalog's schema revision is not the one this release serves; names the catalog and
    both revisions."""

    status, type, code = 503, "server_error", "catalog_revision"

    def __init__(self, message: str, *, catalog: str, revision: str | None, head: str) -> None:
        super().__init__(message)
        self.catalog = catalog  # its URL without the password
        # None: a catalog made before revisions (lorafleet 0.1.0 or earlier)
        self.revision = revision
        self.head = head


class CatalogBehind(CatalogRevisionError):
    code = "catalog_behind"


class CatalogUnknownRevision(CatalogRevisionError):
    code = "catalog_unknown_revision"


class DataError(InvalidRequest):
    """A bad line in a data file; the message names the file, the line and the reason."""

    code = "invalid_data"

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")


class NotServable(LorafleetError):
    """A trained adapter that fails the post-save check (vLLM would not apply it as trained)."""

    status, type, code = 422, "invalid_request_error", "not_servable"


class RateLimited(LorafleetError):
    """429: over a rate or concurrency limit; the headers say when to retry (the openai SDK reads
    them)."""

    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"

    def __init__(
        self, message: str, retry_after_s: float, headers: dict[str, str], code: str
    ) -> None:
        super().__init__(message, code=code)
        self.headers = {
            **headers,
            "Retry-After": str(max(1, math.ceil(retry_after_s))),
            "retry-after-ms": str(max(1, math.ceil(retry_after_s * 1000))),
        }


class QuotaExceeded(LorafleetError):
    """429 that waiting does not fix (a storage limit): the SDK is told not to retry."""

    status, type, code = 429, "insufficient_quota", "quota_exceeded"
    headers = {"x-should-retry": "false"}


class BudgetExceeded(LorafleetError):
    """429 until the budget's period ends: `Retry-After` says when (seconds). The SDK is told not
    to retry unless that is within a minute (it would only fail again)."""

    status, type, code = 429, "insufficient_quota", "budget_exceeded"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        seconds = max(1, math.ceil(retry_after_s))
        self.headers = {"Retry-After": str(seconds)}
        if seconds > 60:
            self.headers["x-should-retry"] = "false"


class UnsupportedQuantization(LorafleetError):
    """The base's quantization cannot run here (or cannot take LoRA adapters); the message says what
    it needs."""


class VLLMFailed(LorafleetError):
    """An offline vLLM run (the trainer's servability check, evaluation) failed."""


class EngineUnavailable(ServiceUnavailable):
    code = "engine_unavailable"


class AdapterLoadFailed(ServiceUnavailable):
    code = "adapter_load_failed"


class EngineBusy(ServiceUnavailable):
    code = "engine_busy"


class NoReplicaUp(ServiceUnavailable):
    """No replica of the fleet is up for this request."""

    code = "no_replica_up"

    def __init__(self, digest: str) -> None:
        super().__init__(f"no replica is up to serve adapter {digest[:12]}")
        self.digest = digest


class ApiError(LorafleetError):
    """The server answered with an error; carries its status and OpenAI-shaped message."""

    def __init__(self, status: int, message: str, code: str | None) -> None:
        super().__init__(f"{message} (HTTP {status})", code=code)
        self.status = status


class ServerUnreachable(LorafleetError):
    """A client of the gateway's API could not reach it."""

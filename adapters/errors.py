"""lorafleet's error tree. Each error knows its HTTP status and OpenAI error `type`/`code`;
the gateway renders every one of them in exactly one place (`lorafleet.serve.api.errors`).

LorafleetError
 ├── Unauthorized            401  missing or wrong key
 ├── NotFound                404  anything another tenant owns looks exactly like this
 ├── Conflict                409  e.g. deleting a deployed version, duplicate tenant name
 ├── InvalidRequest          400  malformed input
 │    └── InvalidAdapter     400  an upload that must not be served (names the field and reason)
 ├── PayloadTooLarge         413
 ├── StoreCorrupt            500  a copy fetched from the store does not match its manifest
 │                                or digest (discarded)
 ├── (429s: `lorafleet.serve.limits`: RateLimited with Retry-After, QuotaExceeded)
 ├── ServiceUnavailable      503  carries Retry-After
 │    ├── StoreUnavailable   503  the object store did not answer, or does not hold the blob (now)
 │    (`lorafleet.serve.engine.client`: EngineUnavailable, AdapterLoadFailed;
 │     `lorafleet.serve.fleet`: NoReplicaUp)
 └── CatalogRevisionError    503  the catalog's schema is not this release's
      │                           (raised at start, by `open_catalog`)
      ├── CatalogBehind           older: `lorafleet db upgrade` brings it to this release's revision
      └── CatalogUnknownRevision  made by a newer lorafleet: this release cannot serve it
"""

from __future__ import annotations

__all__ = [
    "LorafleetError",
    "Unauthorized",
    "NotFound",
    "Conflict",
    "InvalidRequest",
    "InvalidAdapter",
    "PayloadTooLarge",
    "StoreCorrupt",
    "ServiceUnavailable",
    "StoreUnavailable",
    "CatalogRevisionError",
    "CatalogBehind",
    "CatalogUnknownRevision",
]


class LorafleetError(Exception):
    """Base of every error lorafleet raises on purpose."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    headers: dict[str, str] | None = None  # sent with the error (e.g. Retry-After, x-ratelimit-*)

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


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

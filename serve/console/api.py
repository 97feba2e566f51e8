"""The console reads and acts through the gateway's own HTTP API, in-process (httpx over ASGI),
with the signed-in key: the same routes, checks, tenant scoping and numbers the CLI gets, and no
second implementation of any of them. The admin sees a tenant's things by acting for it
(`X-Lorafleet-Tenant`)."""

from __future__ import annotations

from typing import Any

import httpx
from starlette.types import ASGIApp

from lorafleet.serve.console.session import ConsoleUser

__all__ = ["ConsoleAPI", "APIError"]


class APIError(Exception):
    """An API answer other than 2xx, with the API's own message (OpenAI's error shape)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class ConsoleAPI:
    """The API as `user`; `client` is the browser's address, so the audit names it as it would
    the CLI's."""

    def __init__(self, app: ASGIApp, user: ConsoleUser, client: tuple[str, int] | None) -> None:
        transport = httpx.ASGITransport(app=app, client=client or ("127.0.0.1", 0))
        self.user = user
        self._http = httpx.AsyncClient(
            transport=transport,
            base_url="http://console.internal",
            timeout=60,
            headers={"Authorization": f"Bearer {user.key}"},
        )

    async def __aenter__(self) -> ConsoleAPI:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def get(self, path: str, tenant: str | None = None, **params: Any) -> Any:
        return await self._call("GET", path, tenant, params=_present(params))

    async def post(
        self,
        path: str,
        tenant: str | None = None,
        body: dict | None = None,
        timeout: float | None = None,
    ) -> Any:
        return await self._call(
            "POST", path, tenant, json=body, timeout=timeout or self._http.timeout
        )

    async def _call(self, method: str, path: str, tenant: str | None, **kwargs: Any) -> Any:
        headers = {"X-Lorafleet-Tenant": tenant} if tenant and self.user.admin else {}
        response = await self._http.request(method, path, headers=headers, **kwargs)
        if response.is_success:
            return response.json() if response.content else None
        try:
            error = response.json()["error"]
            message, code = str(error.get("message")), error.get("code")
        except (ValueError, KeyError, TypeError, AttributeError):
            message, code = response.text[:500] or response.reason_phrase, None
        raise APIError(response.status_code, message, code)


def _present(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}

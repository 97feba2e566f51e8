"""`/console`: server-rendered pages (Jinja2) over the gateway's own API, with htmx refreshing the
live parts.

Why server-rendered: every number comes from an API call made here with the signed-in key
(`ConsoleAPI`), so the key stays in its HTTP-only cookie and never reaches script; pages work
without JavaScript (forms and links); the one script is htmx, committed as a static file (no CDN, no
build step, no lockfile to keep).

Every action is a form POST carrying the session's CSRF token, after a confirmation page; pages send
a Content-Security-Policy that allows nothing from outside the gateway.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from lorafleet.serve.console import charts, formats
from lorafleet.serve.console.api import APIError, ConsoleAPI
from lorafleet.serve.console.session import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    ConsoleUser,
    Sealer,
    same_token,
    sealer_for,
)
from lorafleet.serve.rollouts import phases

__all__ = ["install_console"]

HERE = Path(__file__).parent
router = APIRouter(prefix="/console", include_in_schema=False)
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters.update(formats.FILTERS)

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
EVALUATE_TIMEOUT_S = 600.0  # an A/B evaluation replays the validation set through every variant
# rollout phases whose weights are in effect
SERVING = frozenset(phase.value for phase in phases.SERVING)
ACTIVE = frozenset(phase.value for phase in phases.ACTIVE)
ACTIONS = {  # console action -> (API path under the deployment, what the confirmation says)
    "promote": (
        "rollout/promote",
        "Promote the canary one step now, without waiting for the analysis.",
    ),
    "pause": ("rollout/pause", "Pause the rollout: weights stay as they are, no step is taken."),
    "resume": ("rollout/resume", "Resume the rollout from the step it is at."),
    "abort": (
        "rollout/abort",
        "Abort the rollout: all traffic goes back to the stable version at once.",
    ),
    "undo": (
        "undo",
        "Undo the last change of the deployment: it goes back to the version it served before.",
    ),
}


class SignInNeeded(Exception):
    """No valid session: the browser goes to the sign-in page (htmx: a full-page redirect)."""


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def install_console(app: FastAPI) -> None:
    """The console's routes, its static files and its error pages, on the gateway app."""
    app.state.console_sealer = sealer_for(app.state.gateway.settings)
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")
    app.include_router(router)
    app.add_exception_handler(SignInNeeded, _to_sign_in)  # type: ignore[arg-type]
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(Refused, _refused)  # type: ignore[arg-type]


# sessions, pages, forms


def _sealer(request: Request) -> Sealer:
    return request.app.state.console_sealer


def _user(request: Request) -> ConsoleUser:
    user = _sealer(request).open(request.cookies.get(SESSION_COOKIE))
    if user is None:
        raise SignInNeeded
    return user


def _api(request: Request, user: ConsoleUser) -> ConsoleAPI:
    client = request.client
    return ConsoleAPI(request.app, user, (client.host, client.port) if client else None)


def _page(request: Request, template: str, code: int = 200, **context: Any) -> HTMLResponse:
    response = templates.TemplateResponse(
        request,
        template,
        {"charts": charts, "now": time.time(), "serving": SERVING, "active": ACTIVE, **context},
        status_code=code,
    )
    response.headers.update(
        {
            "Content-Security-Policy": CSP,
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "same-origin",
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        }
    )
    return response


def _see(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303)


async def _form(
    request: Request, user: ConsoleUser | None = None, token: str | None = None
) -> dict[str, str]:
    """The posted form, after the CSRF checks: a same-origin request carrying the session's
    token."""
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.url.netloc:
        raise Refused(403, "this form was posted from another site")
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    if not same_token(user.csrf if user else token, form.get("csrf")):
        raise Refused(
            403, "the form's security token is missing or stale: reload the page and try again"
        )
    return form


async def _to_sign_in(request: Request, exc: SignInNeeded) -> Response:
    target = "/console/login?next=" + quote(request.url.path)
    if request.headers.get("hx-request"):
        return Response(status_code=204, headers={"HX-Redirect": target})
    response = _see(target)
    response.delete_cookie(SESSION_COOKIE, path="/console")
    return response


async def _api_error(request: Request, exc: APIError) -> Response:
    if exc.status == 401:  # the key was revoked, or the tenant disabled, since signing in
        return await _to_sign_in(request, SignInNeeded())
    return _page(
        request,
        "error.html",
        code=exc.status,
        user=_sealer(request).open(request.cookies.get(SESSION_COOKIE)),
        title=f"{exc.status}",
        message=exc.message,
    )


async def _refused(request: Request, exc: Refused) -> Response:
    return _page(
        request,
        "error.html",
        code=exc.status,
        user=_sealer(request).open(request.cookies.get(SESSION_COOKIE)),
        title=f"{exc.status}",
        message=exc.message,
    )


def _own(user: ConsoleUser, tenant: str) -> None:
    """A tenant sees only its own pages: another tenant's are simply not found (no existence
    leak)."""
    if not user.admin and tenant != user.name:
        raise Refused(404, "not found")


async def _tenants(api: ConsoleAPI) -> list[str]:
    """Whose things this user sees: its own tenant, or (the admin) every tenant."""
    if api.user.admin:
        return await api.get("/admin/tenants")
    return [api.user.name]


async def _optional(call: Awaitable[Any]) -> Any:
    """An API answer, or None where the API says there is nothing (404)."""
    try:
        return await call
    except APIError as exc:
        if exc.status == 404:
            return None
        raise


# sign-in


@router.get("")
@router.get("/")
def console_home() -> RedirectResponse:
    return _see("/console/deployments")


@router.get("/login")
def login_page(
    request: Request, next: str = "/console/deployments", error: str = ""
) -> HTMLResponse:
    token = secrets.token_urlsafe(32)
    response = _page(
        request,
        "login.html",
        code=401 if error else 200,
        user=None,
        login_token=token,
        next=_safe_next(next),
        error=error,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        max_age=1800,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/login")
async def login(request: Request) -> Response:
    form = await _form(request, token=request.cookies.get(LOGIN_COOKIE))
    key, target = form.get("key", "").strip(), _safe_next(form.get("next", ""))
    if not key:
        return login_page(request, target, "Enter an API key.")
    settings = request.app.state.gateway.settings
    admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
    if admin_key is not None and same_token(admin_key, key):
        user = ConsoleUser.new("admin", "admin", key)
    else:
        try:
            async with _api(request, ConsoleUser.new("tenant", "?", key)) as api:
                user = ConsoleUser.new("tenant", (await api.get("/v1/tenant"))["name"], key)
        except APIError as exc:
            return login_page(request, target, f"Sign-in refused: {exc.message}.")
    response = _see(target)
    response.set_cookie(
        SESSION_COOKIE,
        _sealer(request).seal(user),
        max_age=_sealer(request).max_age_s,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    response.delete_cookie(LOGIN_COOKIE, path="/console")
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    await _form(request, _user(request))
    response = _see("/console/login")
    response.delete_cookie(SESSION_COOKIE, path="/console")
    return response


def _safe_next(target: str) -> str:
    """Only a console path: never another site (an open redirect)."""
    return (
        target
        if target.startswith("/console/") and not target.startswith("//")
        else "/console/deployments"
    )


# deployments


@router.get("/deployments")
async def deployments_page(request: Request) -> HTMLResponse:
    user = _user(request)
    async with _api(request, user) as api:
        rows = []
        for tenant in await _tenants(api):
            rollouts = {r["deployment"]: r for r in await api.get("/v1/rollouts", tenant)}
            for d in await api.get("/v1/deployments", tenant):
                traffic = await _optional(api.get(f"/v1/deployments/{d['name']}/traffic", tenant))
                rows.append(
                    {
                        "tenant": tenant,
                        "deployment": d,
                        "rollout": rollouts.get(d["name"]),
                        "traffic": traffic,
                    }
                )
    return _page(request, "deployments.html", user=user, rows=rows)


@router.get("/t/{tenant}/deployments/{name}")
async def deployment_page(request: Request, tenant: str, name: str) -> HTMLResponse:
    user = _user(request)
    _own(user, tenant)
    async with _api(request, user) as api:
        deployment = next(
            (d for d in await api.get("/v1/deployments", tenant) if d["name"] == name), None
        )
        if deployment is None:
            raise Refused(404, f"no deployment named {name!r}")
        traffic = await _optional(api.get(f"/v1/deployments/{name}/traffic", tenant))
        rollouts = [r for r in await api.get("/v1/rollouts", tenant) if r["deployment"] == name]
        capture = await _optional(api.get(f"/v1/deployments/{name}/capture", tenant))
    return _page(
        request,
        "deployment.html",
        user=user,
        tenant=tenant,
        deployment=deployment,
        traffic=traffic,
        rollout=rollouts[0] if rollouts else None,
        capture=capture,
    )


# batches


@router.get("/batches")
async def batches_page(request: Request) -> HTMLResponse:
    user = _user(request)
    async with _api(request, user) as api:
        rows = [
            {"tenant": tenant, "batch": b}
            for tenant in await _tenants(api)
            for b in (await api.get("/v1/batches", tenant))["data"]
        ]
    return _page(request, "batches.html", user=user, rows=rows)


# usage


@router.get("/usage")
async def usage_page(
    request: Request, start: str | None = None, end: str | None = None
) -> HTMLResponse:
    """What was used and what it cost, per day (a chart) and per deployment and adapter (the
    admin: per tenant), with the budgets: the usage report's own numbers."""
    user = _user(request)
    span = {"start": start or None, "end": end or None}
    async with _api(request, user) as api:
        daily = await api.get("/v1/usage", group_by="day", **span)
        if user.admin:
            table = await api.get("/v1/usage", group_by="tenant", **span)
            budgets = [
                {"tenant": tenant, **b}
                for tenant in sorted({row["tenant"] for row in table["rows"]})
                for b in (await api.get(f"/admin/tenants/{quote(tenant)}/budgets"))["budgets"]
            ]
        else:
            table = await api.get("/v1/usage", group_by="deployment,adapter", **span)
            budgets = [{"tenant": user.name, **b} for b in table["budgets"]]
    return _page(request, "usage.html", user=user, daily=daily, table=table, budgets=budgets)


# rollouts


@router.get("/rollouts")
async def rollouts_page(request: Request) -> HTMLResponse:
    user = _user(request)
    async with _api(request, user) as api:
        rows = [
            {"tenant": tenant, "rollout": r}
            for tenant in await _tenants(api)
            for r in await api.get("/v1/rollouts", tenant)
        ]
    return _page(request, "rollouts.html", user=user, rows=rows)


async def _rollout_context(api: ConsoleAPI, tenant: str, name: str) -> dict[str, Any]:
    rollout = await _optional(api.get(f"/v1/deployments/{name}/rollout", tenant))
    series = (
        await _optional(api.get(f"/v1/deployments/{name}/rollout/series", tenant))
        if rollout
        else None
    )
    return {"tenant": tenant, "name": name, "rollout": rollout, "series": series}


@router.get("/t/{tenant}/deployments/{name}/rollout")
async def rollout_page(request: Request, tenant: str, name: str, done: str = "") -> HTMLResponse:
    user = _user(request)
    _own(user, tenant)
    async with _api(request, user) as api:
        context = await _rollout_context(api, tenant, name)
    return _page(
        request,
        "rollout.html",
        user=user,
        done=done if done in ACTIONS else "",
        actions=ACTIONS,
        **context,
    )


@router.get("/t/{tenant}/deployments/{name}/rollout/live")
async def rollout_live(request: Request, tenant: str, name: str) -> HTMLResponse:
    """The rollout's live part (phase, weights, per-variant charts, decisions), which htmx swaps
    in every few seconds."""
    user = _user(request)
    _own(user, tenant)
    async with _api(request, user) as api:
        context = await _rollout_context(api, tenant, name)
    return _page(request, "rollout_live.html", user=user, actions=ACTIONS, **context)


@router.get("/t/{tenant}/deployments/{name}/confirm/{action}")
async def confirm_page(request: Request, tenant: str, name: str, action: str) -> HTMLResponse:
    user = _user(request)
    _own(user, tenant)
    if action not in ACTIONS:
        raise Refused(404, "not found")
    async with _api(request, user) as api:
        rollout = await _optional(api.get(f"/v1/deployments/{name}/rollout", tenant))
        if rollout is None and action != "undo":
            raise Refused(404, f"deployment {name!r} has no rollout")
    return _page(
        request,
        "confirm.html",
        user=user,
        tenant=tenant,
        name=name,
        action=action,
        explanation=ACTIONS[action][1],
        rollout=rollout,
    )


@router.post("/t/{tenant}/deployments/{name}/actions/{action}")
async def act(request: Request, tenant: str, name: str, action: str) -> Response:
    user = _user(request)
    _own(user, tenant)
    form = await _form(request, user)
    if action not in ACTIONS:
        raise Refused(404, "not found")
    body = {"full": True} if action == "promote" and form.get("full") == "on" else None
    async with _api(request, user) as api:
        await api.post(f"/v1/deployments/{name}/{ACTIONS[action][0]}", tenant, body)
    return _see(f"/console/t/{quote(tenant)}/deployments/{quote(name)}/rollout?done={action}")


# A/B tests, drift


@router.get("/t/{tenant}/deployments/{name}/ab")
async def ab_page(request: Request, tenant: str, name: str) -> HTMLResponse:
    return await _ab_page(request, tenant, name, evaluate=False)


@router.post("/t/{tenant}/deployments/{name}/ab/evaluate")
async def ab_evaluate(request: Request, tenant: str, name: str) -> HTMLResponse:
    """The A/B variants replayed on the deployment's validation set, compared (the API's paired
    test)."""
    return await _ab_page(request, tenant, name, evaluate=True)


async def _ab_page(request: Request, tenant: str, name: str, evaluate: bool) -> HTMLResponse:
    user = _user(request)
    _own(user, tenant)
    if evaluate:
        await _form(request, user)
    async with _api(request, user) as api:
        evaluation = (
            await api.post(
                f"/v1/deployments/{name}/ab/evaluate", tenant, timeout=EVALUATE_TIMEOUT_S
            )
            if evaluate
            else None
        )
        ab = await _optional(api.get(f"/v1/deployments/{name}/ab", tenant))
    return _page(
        request, "ab.html", user=user, tenant=tenant, name=name, ab=ab, evaluation=evaluation
    )


@router.get("/t/{tenant}/deployments/{name}/drift")
async def drift_page(request: Request, tenant: str, name: str) -> HTMLResponse:
    from lorafleet.serve.drift.report import NOT_ENOUGH, figures

    user = _user(request)
    _own(user, tenant)
    async with _api(request, user) as api:
        status = await api.get(f"/v1/deployments/{name}/drift", tenant)
        history = await api.get(f"/v1/deployments/{name}/drift/history", tenant)
    # the report's own figures (matplotlib)
    plots = await run_in_threadpool(figures, history, status)
    return _page(
        request,
        "drift.html",
        user=user,
        tenant=tenant,
        name=name,
        status=status,
        history=history,
        plots=plots,
        not_enough=NOT_ENOUGH,
    )


# adapters


@router.get("/adapters")
async def adapters_page(request: Request) -> HTMLResponse:
    user = _user(request)
    async with _api(request, user) as api:
        rows = [
            {"tenant": tenant, "adapter": a}
            for tenant in await _tenants(api)
            for a in await api.get("/v1/adapters", tenant)
        ]
    return _page(request, "adapters.html", user=user, rows=rows)


@router.get("/t/{tenant}/adapters/{name}")
async def adapter_page(request: Request, tenant: str, name: str) -> HTMLResponse:
    user = _user(request)
    _own(user, tenant)
    async with _api(request, user) as api:
        adapter = await api.get(f"/v1/adapters/{name}", tenant)
    return _page(request, "adapter.html", user=user, tenant=tenant, adapter=adapter)


# the admin's pages


def _admin(request: Request) -> ConsoleUser:
    user = _user(request)
    if not user.admin:
        raise Refused(404, "not found")
    return user


@router.get("/engines")
async def engines_page(request: Request) -> HTMLResponse:
    user = _admin(request)
    async with _api(request, user) as api:
        engines = await api.get("/admin/engines")
    return _page(request, "engines.html", user=user, engines=engines)


@router.get("/tenants")
async def tenants_page(request: Request) -> HTMLResponse:
    user = _admin(request)
    async with _api(request, user) as api:
        tenants = [
            await api.get(f"/admin/tenants/{quote(name)}")
            for name in await api.get("/admin/tenants")
        ]
    return _page(request, "tenants.html", user=user, tenants=tenants)

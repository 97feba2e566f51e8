"""The gateway's OpenAPI document: FastAPI's, completed with what the route signatures cannot tell
it.

FastAPI describes the routes it declares. This module post-processes that document so that it says
what the server really accepts and answers, for clients and for the fuzzer
(`tests/serve/api/test_fuzz.py`):

- the chat route (a plain Starlette route, so absent) in OpenAI's request shape, extra fields
  allowed;
- bearer security schemes (tenant key, admin key) instead of a free-form `authorization` header
  parameter;
- errors in OpenAI's shape: 400 (the handler turns FastAPI's 422 into it) and a default for
  401/404/409/413/503;
- the constraints that handlers check by hand (names, metrics, steps, weights, answer formats), with
  example names that the fuzz test seeds;
- links from the calls that create adapters, deployments, rollouts and A/B tests to the calls that
  use them.

It works on paths, parameter and property names rather than on route functions, so routes added
later get the same treatment.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from lorafleet.adapters.names import NAME_PATTERN
from lorafleet.scoring import METRICS
from lorafleet.serve.api.openapi_chat import (
    CHAT_PATH,
    RESPONSES_PATH,
    chat_operation,
    chat_schemas,
    responses_operation,
    responses_schemas,
)

__all__ = ["EXAMPLE_DEPLOYMENT", "EXAMPLE_ADAPTER", "EXAMPLE_REFS", "gateway_openapi"]

EXAMPLE_DEPLOYMENT = "invoice-extractor"
EXAMPLE_ADAPTER = "invoice-lora"
# NAME@N, as rollouts and A/B tests name versions
EXAMPLE_REFS = (f"{EXAMPLE_ADAPTER}@1", f"{EXAMPLE_ADAPTER}@2")

Spec = dict[str, Any]
METHODS = ("get", "put", "post", "delete", "patch")
ERROR = {"$ref": "#/components/schemas/Error"}
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "integer", "null"]},
            },
        }
    },
}
SECURITY_SCHEMES = {
    "tenantKey": {"type": "http", "scheme": "bearer", "description": "a tenant's API key"},
    "adminKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "the operator's LORAFLEET_ADMIN_KEY",
    },
    "metricsToken": {"type": "http", "scheme": "bearer", "description": "LORAFLEET_METRICS_TOKEN"},
}
PATH_EXAMPLES = {
    "deployment": EXAMPLE_DEPLOYMENT,
    "model": EXAMPLE_DEPLOYMENT,
    "name": EXAMPLE_ADAPTER,
}
NAME_PARAMETERS = {"deployment", "model", "name", "tenant"}
# Request-body properties that name an adapter version: NAME (latest), NAME@N or a digest.
ADAPTER_REF_PROPERTIES = {"adapter", "to", "keep"}
ANSWER_FORMAT = {
    "type": "object",
    "maxProperties": 1,
    "additionalProperties": False,
    "description": "exactly one of `json_schema` or `regex`; `{}` clears the format",
    "properties": {
        "json_schema": {"type": ["object", "null"]},
        "regex": {"type": ["string", "null"]},
    },
    "examples": [{"regex": "^a (red|blue) (circle|square)$"}, {}],
}
# (path, method) of a call that creates something -> the path parameters it fills, and from where
_DEPLOYMENT = {"deployment": "$response.body#/name", "model": "$response.body#/name"}
_ROLLOUT = {"deployment": "$response.body#/deployment", "model": "$response.body#/deployment"}
LINK_SOURCES = {
    ("/v1/adapters", "post"): {"name": "$response.body#/name", "number": "$response.body#/version"},
    ("/v1/deployments/{deployment}", "put"): _DEPLOYMENT,
    ("/v1/deployments/{deployment}/validation", "put"): {"deployment": "$request.path.deployment"},
    ("/v1/deployments/{deployment}/rollout", "post"): _ROLLOUT,
    ("/v1/deployments/{deployment}/ab", "post"): _ROLLOUT,
}


def gateway_openapi(app: FastAPI) -> Spec:
    """The app's OpenAPI document, built once: FastAPI's, then completed by the steps below."""
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for step in (
            _add_chat,
            _declare_security,
            _declare_errors,
            _declare_parameters,
            _declare_bodies,
            _declare_responses,
            _declare_links,
        ):
            step(spec)
        app.openapi_schema = spec
    return app.openapi_schema


def _operations(spec: Spec) -> Iterator[tuple[str, str, Spec]]:
    for path, item in spec["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def _schemas(spec: Spec) -> Spec:
    return spec.setdefault("components", {}).setdefault("schemas", {})


def _add_chat(spec: Spec) -> None:
    _schemas(spec).update(chat_schemas(EXAMPLE_DEPLOYMENT))
    spec["paths"].setdefault(CHAT_PATH, {})["post"] = chat_operation(EXAMPLE_DEPLOYMENT)
    _schemas(spec).update(responses_schemas(EXAMPLE_DEPLOYMENT))
    spec["paths"].setdefault(RESPONSES_PATH, {})["post"] = responses_operation(EXAMPLE_DEPLOYMENT)


def _security(path: str) -> list[Spec] | None:
    """The keys a path takes, as `lorafleet.serve.api.guard.Authenticate` checks them."""
    if path.startswith("/v1/"):
        return [{"tenantKey": []}]
    if path == "/admin" or path.startswith("/admin/"):
        return [{"adminKey": []}]
    if path == "/metrics":
        return [{"adminKey": []}, {"metricsToken": []}]
    return None


def _declare_security(spec: Spec) -> None:
    """The bearer key is the operation's security, not a parameter for clients (or fuzzers) to
    invent."""
    spec["components"]["securitySchemes"] = SECURITY_SCHEMES
    for path, _, operation in _operations(spec):
        parameters = [
            p
            for p in operation.get("parameters", [])
            if not (p["in"] == "header" and p["name"].lower() == "authorization")
        ]
        operation.pop("parameters", None)
        if parameters:
            operation["parameters"] = parameters
        if (security := _security(path)) is not None:
            operation["security"] = security


def _declare_errors(spec: Spec) -> None:
    """Every error of an authenticated route is OpenAI's shape; request validation answers 400,
    not 422."""
    _schemas(spec)["Error"] = ERROR_SCHEMA
    error = {"content": {"application/json": {"schema": ERROR}}}
    for _, _, operation in _operations(spec):
        responses = operation["responses"]
        responses.pop("422", None)
        if "requestBody" in operation or operation.get("parameters"):
            responses["400"] = {"description": "Invalid request", **error}
        if "security" in operation:
            responses.setdefault("default", {"description": "401, 404, 409, 413 or 503", **error})
    if "#/components/schemas/HTTPValidationError" not in json.dumps(spec["paths"]):
        for unused in ("HTTPValidationError", "ValidationError"):
            _schemas(spec).pop(unused, None)


def _declare_parameters(spec: Spec) -> None:
    """Names follow NAME_PATTERN (nothing else can exist); tenant routes get the example names."""
    for path, _, operation in _operations(spec):
        for parameter in operation.get("parameters", []):
            name, schema = parameter["name"], parameter.setdefault("schema", {})
            if parameter["in"] != "path":
                continue
            if name in NAME_PARAMETERS:
                schema["pattern"] = NAME_PATTERN.pattern
            if name == "number":
                schema["minimum"] = 1
                parameter["example"] = 1
            elif path.startswith("/v1") and name in PATH_EXAMPLES:
                parameter["example"] = PATH_EXAMPLES[name]


def _request_schemas(spec: Spec) -> set[str]:
    """The component schemas that request bodies use, directly or nested."""
    found: set[str] = set()
    pending = [json.dumps(op.get("requestBody", {})) for _, _, op in _operations(spec)]
    while pending:
        for name in _refs(pending.pop()):
            if name not in found and name in _schemas(spec):
                found.add(name)
                pending.append(json.dumps(_schemas(spec)[name]))
    return found


def _refs(text: str) -> list[str]:
    marker = '"$ref": "#/components/schemas/'
    return [part.split('"', 1)[0] for part in text.split(marker)[1:]]


def _declare_bodies(spec: Spec) -> None:
    """The checks handlers make by hand, written into the request schemas (and their example
    names)."""
    schemas = _schemas(spec)
    for name in _request_schemas(spec) - set(chat_schemas(EXAMPLE_DEPLOYMENT)):
        for field, schema in schemas[name].get("properties", {}).items():
            _constrain_property(field, schema)
    for path, method, operation in _operations(spec):
        if path.endswith("/answer-format") and method == "put":
            operation["requestBody"]["content"]["application/json"]["schema"] = ANSWER_FORMAT


def _constrain_property(field: str, schema: Spec) -> None:
    match field:
        case "name":
            schema["pattern"] = NAME_PATTERN.pattern
        case "metric":
            schema["enum"] = sorted(METRICS)
        case "steps":  # increasing percents in (0, 100]; the order itself the handler checks
            schema.update(
                minItems=1, items={"type": "number", "exclusiveMinimum": 0, "maximum": 100}
            )
        case "variants":
            schema["minItems"] = 2
        case "weight":  # percents that sum to 100
            schema.update(exclusiveMinimum=0, maximum=100)
        case _ if field in ADAPTER_REF_PROPERTIES:
            schema["examples"] = list(EXAMPLE_REFS)


def _declare_responses(spec: Spec) -> None:
    """What handlers answer beyond their signature: a re-upload is 200, metrics are Prometheus
    text."""
    paths = spec["paths"]
    if upload := paths.get("/v1/adapters", {}).get("post"):
        version = {
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/AdapterVersionPublic"}
                }
            }
        }
        upload["responses"]["201"] = {"description": "A new version", **version}
        upload["responses"]["200"] = {
            "description": "The same content was uploaded before: its version",
            **version,
        }
    if metrics := paths.get("/metrics", {}).get("get"):
        metrics["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}


def _declare_links(spec: Spec) -> None:
    """From each call that creates something to every call that takes its name (OpenAPI links)."""
    targets = [
        op for path, _, op in _operations(spec) if "operationId" in op and path.startswith("/v1")
    ]
    for (path, method), fills in LINK_SOURCES.items():
        source = spec["paths"].get(path, {}).get(method)
        if source is None:
            continue
        links = {}
        for target in targets:
            filled = {
                p["name"]: fills[p["name"]]
                for p in target.get("parameters", [])
                if p["in"] == "path" and p["name"] in fills
            }
            if filled and target is not source:
                links[target["operationId"]] = {
                    "operationId": target["operationId"],
                    "parameters": filled,
                }
        for status, response in source["responses"].items():
            if status.startswith("2"):
                response["links"] = links

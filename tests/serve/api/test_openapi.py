"""The gateway's OpenAPI document says what the handlers really take and answer (no engine
needed)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import APIRouter, FastAPI

from lorafleet.scoring import METRICS
from lorafleet.serve.api import adapters, admin, chat, drift, models, rollouts
from lorafleet.serve.api.dependencies import CurrentTenant
from lorafleet.serve.api.openapi import EXAMPLE_DEPLOYMENT, EXAMPLE_REFS, gateway_openapi

Spec = dict[str, Any]


def _app(*extra: APIRouter) -> FastAPI:
    """The gateway's routers (as `create_app` includes them) without a gateway behind them."""
    app = FastAPI(title="lorafleet")
    for router in (
        chat.router,
        models.router,
        adapters.router,
        rollouts.router,
        drift.router,
        admin.router,
        *extra,
    ):
        app.include_router(router)
    app.openapi = lambda: gateway_openapi(app)  # type: ignore[method-assign]
    return app


def _operations(spec: Spec) -> list[tuple[str, str, Spec]]:
    return [
        (path, method, op) for path, item in spec["paths"].items() for method, op in item.items()
    ]


def _body(spec: Spec, path: str, method: str, media_type: str = "application/json") -> Spec:
    schema = spec["paths"][path][method]["requestBody"]["content"][media_type]["schema"]
    return (
        spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
        if "$ref" in schema
        else schema
    )


def test_chat_completions_is_declared_in_openai_shape_with_extra_fields_allowed():
    spec = _app().openapi()
    body = _body(spec, "/v1/chat/completions", "post")
    assert body["required"] == ["model", "messages"] and body["additionalProperties"] is True
    assert body["properties"]["model"]["examples"] == [EXAMPLE_DEPLOYMENT]
    assert {"stream", "max_tokens", "temperature"} <= set(body["properties"])
    parts = spec["components"]["schemas"]["ContentPart"]["oneOf"]
    assert [p["$ref"].rsplit("/", 1)[-1] for p in parts] == ["TextPart", "ImageUrlPart"]
    answers = spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(answers) == {"application/json", "text/event-stream"}


def test_bodies_that_handlers_check_by_hand_carry_those_checks():
    spec = _app().openapi()
    upload = _body(spec, "/v1/adapters", "post", "multipart/form-data")
    assert set(upload["required"]) == {"name", "file"} and "pattern" in upload["properties"]["name"]
    validation = _body(
        spec, "/v1/deployments/{deployment}/validation", "put", "multipart/form-data"
    )
    assert validation["properties"]["metric"]["enum"] == sorted(METRICS)
    rollout = _body(spec, "/v1/deployments/{deployment}/rollout", "post")
    assert rollout["required"] == ["to"] and rollout["properties"]["to"]["examples"] == list(
        EXAMPLE_REFS
    )
    assert rollout["properties"]["steps"]["items"] == {
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": 100,
    }
    assert (
        _body(spec, "/v1/deployments/{deployment}/ab", "post")["properties"]["variants"]["minItems"]
        == 2
    )
    answer_format = _body(spec, "/v1/deployments/{deployment}/answer-format", "put")
    assert (
        set(answer_format["properties"]) == {"json_schema", "regex"}
        and answer_format["maxProperties"] == 1
    )
    # reads none
    assert "requestBody" not in spec["paths"]["/v1/deployments/{deployment}/drift/check"]["post"]


def test_a_re_upload_is_declared_as_200_beside_the_201_of_a_new_version():
    responses = _app().openapi()["paths"]["/v1/adapters"]["post"]["responses"]
    assert responses["200"]["content"] == responses["201"]["content"]


def test_the_key_is_a_security_scheme_not_a_header_parameter():
    for path, _, operation in _operations(_app().openapi()):
        assert all(p["name"].lower() != "authorization" for p in operation.get("parameters", [])), (
            path
        )
        assert operation["security"] == [
            {"adminKey": []} if path.startswith("/admin") else {"tenantKey": []}
        ]


def test_errors_are_openai_shaped_and_request_validation_is_400_not_422():
    spec = _app().openapi()
    for path, _, operation in _operations(spec):
        responses = operation["responses"]
        assert "422" not in responses and responses["default"]["content"]["application/json"][
            "schema"
        ] == {"$ref": "#/components/schemas/Error"}
        assert ("400" in responses) == bool(
            operation.get("parameters") or operation.get("requestBody")
        ), path
    assert "HTTPValidationError" not in spec["components"]["schemas"]


@pytest.mark.heavy_imports
def test_links_name_existing_operations_and_their_path_parameters():
    spec = _app().openapi()
    by_id = {op["operationId"]: op for _, _, op in _operations(spec)}
    links = [
        link
        for _, _, op in _operations(spec)
        for r in op["responses"].values()
        for link in r.get("links", {}).values()
    ]
    assert len(links) > 40
    for link in links:
        parameters = {
            p["name"] for p in by_id[link["operationId"]].get("parameters", []) if p["in"] == "path"
        }
        assert set(link["parameters"]) <= parameters
    put = spec["paths"]["/v1/deployments/{deployment}"]["put"]["responses"]["200"]["links"]
    assert put["get_model_v1_models__model__get"]["parameters"] == {"model": "$response.body#/name"}
    # schemathesis can follow them
    import schemathesis

    assert schemathesis.openapi.from_dict(spec).as_state_machine() is not None


def test_a_route_added_later_gets_security_errors_names_and_links():
    extra = APIRouter(prefix="/v1")

    @extra.post("/deployments/{deployment}/freeze")
    def freeze(deployment: str, tenant: CurrentTenant) -> dict:
        return {}

    spec = _app(extra).openapi()
    operation = spec["paths"]["/v1/deployments/{deployment}/freeze"]["post"]
    assert operation["security"] == [{"tenantKey": []}] and "default" in operation["responses"]
    assert [p["name"] for p in operation["parameters"]] == ["deployment"]
    assert operation["parameters"][0]["example"] == EXAMPLE_DEPLOYMENT
    put = spec["paths"]["/v1/deployments/{deployment}"]["put"]["responses"]["200"]["links"]
    assert operation["operationId"] in put


def test_the_document_is_built_once():
    app = _app()
    assert app.openapi() is app.openapi() is gateway_openapi(app)

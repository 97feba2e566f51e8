"""Property-based fuzzing of the live gateway through its own OpenAPI document (schemathesis).

Every operation is fuzzed with a tenant key and again with the admin key, against the session's real
gateway and engine. The test seeds a tenant of its own with the names the document gives as examples
(a deployment, two versions of an adapter, a validation set) and confines generated names to those
and one unknown name, so requests reach the handlers instead of stopping at 404. No answer may be a
5xx, and every answer must match the document.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from lorafleet.serve.api.guard import FLEET_READS
from lorafleet.serve.api.openapi import EXAMPLE_ADAPTER, EXAMPLE_DEPLOYMENT, EXAMPLE_REFS
from lorafleet.serve.gateway_client import inline_images
from tests.conftest import NEAR_BASE_STD
from tests.helpers import upload_folder

MAX_EXAMPLES = 10  # generated cases per operation and key (examples from the document come on top)
MAX_SPEC_EXAMPLES = 3  # cases per operation built from the document's examples
MAX_TOKENS = 8  # what fuzzed chats, gates and replays may ask of the CPU engine
UNKNOWN = "no-such-name"
Spec = dict[str, Any]


# schemathesis and hypothesis are imported by the fuzzing itself, not when the tests are collected


def _checks() -> list[Callable]:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    return [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]


def _hypothesis(examples: int):
    from hypothesis import HealthCheck, Phase, settings

    return settings(
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        max_examples=examples,
    )


@dataclass
class Seeded:
    """The fuzzer's own tenant, holding the example names, and a second tenant that only admin
    calls may name."""

    tenant: str
    api_key: str
    admin_target: str
    admin_target_key: int


@dataclass
class Outcome:
    """Per operation, how often each answer came (`404 adapter_not_found`: status and error
    code)."""

    answers: dict[str, Counter[str]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def table(self) -> str:
        return "\n".join(
            f"{label:60} {dict(sorted(counts.items()))}" for label, counts in self.answers.items()
        )


def _create_tenant(server, name_prefix: str) -> dict:
    """The admin API's answer: name, api_key, key_id."""
    name = f"{name_prefix}-{uuid.uuid4().hex[:8]}"
    with server.admin() as admin:
        response = admin.post("/admin/tenants", json={"name": name})
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="module")
def seeded(server, make_adapter, general_val) -> Seeded:
    """Two versions of EXAMPLE_ADAPTER (near-no-op adapters: answers stay the base's),
    EXAMPLE_DEPLOYMENT serving its first, and a four-item validation set, so replays and gates
    stay short on the CPU engine."""
    tenant = _create_tenant(server, "fuzz")
    auth = {"Authorization": f"Bearer {tenant['api_key']}"}
    with httpx.Client(base_url=server.url, headers=auth, timeout=120) as http:
        for rank in (8, 4):
            upload_folder(http, EXAMPLE_ADAPTER, make_adapter(0, rank, std=NEAR_BASE_STD))
        http.put(
            f"/v1/deployments/{EXAMPLE_DEPLOYMENT}", json={"adapter": EXAMPLE_REFS[0]}
        ).raise_for_status()
        items = b"\n".join(inline_images(general_val).splitlines()[:4]) + b"\n"
        http.put(
            f"/v1/deployments/{EXAMPLE_DEPLOYMENT}/validation", files={"file": ("v.jsonl", items)}
        ).raise_for_status()
    target = _create_tenant(server, "fuzz-admin-target")
    return Seeded(
        tenant=tenant["name"],
        api_key=tenant["api_key"],
        admin_target=target["name"],
        admin_target_key=target["key_id"],
    )


def _operations(spec: Spec) -> Iterator[tuple[str, str, Spec]]:
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method in ("get", "put", "post", "delete", "patch"):
                yield path, method, operation


def _component(spec: Spec, schema: Spec) -> Spec:
    ref = schema.get("$ref", "")
    return spec["components"]["schemas"][ref.rsplit("/", 1)[-1]] if ref else schema


def _confine(document: Spec, seeded: Seeded) -> Spec:
    """The document with names narrowed to what the test seeded (and one unknown name), and with
    the engine's token budgets small. Admin calls name only the admin-target tenant, so fuzzing
    never touches another test's tenant."""
    spec = copy.deepcopy(document)
    path_names = {
        "deployment": [EXAMPLE_DEPLOYMENT, UNKNOWN],
        "model": [EXAMPLE_DEPLOYMENT, UNKNOWN],
        "name": [EXAMPLE_ADAPTER, UNKNOWN],
        "number": [1, 2, 3],
    }
    admin_names = {
        "name": [seeded.admin_target],
        "tenant": [seeded.admin_target],
        "key_id": [seeded.admin_target_key, 10**6],
    }
    refs = [*EXAMPLE_REFS, EXAMPLE_ADAPTER, f"{UNKNOWN}@1"]
    for path, _, operation in _operations(spec):
        names = admin_names if path.startswith("/admin") else path_names
        for parameter in operation.get("parameters", []):
            name, schema = parameter["name"], parameter["schema"]
            if name in names and (parameter["in"] == "path" or names is admin_names):
                parameter["schema"] = {"enum": names[name]}
                parameter.pop("example", None)
            elif name == "max_tokens":
                schema["maximum"] = MAX_TOKENS
    schemas = spec["components"]["schemas"]
    for name in ("DeploymentPut", "RolloutStart", "AbVariant", "StopBody"):
        for ref_field in ("adapter", "to", "keep"):
            if ref_field in schemas[name]["properties"]:
                schemas[name]["properties"][ref_field] = {"enum": refs}
    schemas["TenantCreate"]["properties"]["name"] = {
        "enum": [seeded.admin_target, f"{seeded.admin_target}-new"]
    }
    schemas["RolloutStart"]["properties"]["gate_max_tokens"]["maximum"] = MAX_TOKENS
    chat = schemas["ChatCompletionRequest"]["properties"]
    chat["model"] = {"enum": [EXAMPLE_DEPLOYMENT, UNKNOWN]}
    chat["messages"]["maxItems"] = 3
    for budget in ("max_tokens", "max_completion_tokens"):
        chat[budget] = {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS}
    schemas["ChatCompletionRequest"]["required"] = [
        *schemas["ChatCompletionRequest"]["required"],
        "max_tokens",
    ]
    return spec


def _ordered(schema) -> list:
    """Every operation, the deleting ones last (a deleted version would turn what follows into
    404s), the deepest of those first (a key before its tenant)."""
    operations = [result.ok() for result in schema.get_all_operations()]
    return sorted(operations, key=lambda op: (op.method.upper() == "DELETE", -op.path.count("/")))


def _answer(response) -> str:
    label = str(response.status_code)
    if response.status_code >= 400:
        try:
            label += f" {response.json()['error']['code']}"
        except (ValueError, KeyError, TypeError):
            pass
    return label


def _run(strategy, examples: int, outcome: Outcome, label: str, call: Callable) -> None:
    from hypothesis import given

    @given(case=strategy)
    @_hypothesis(examples)
    def fuzz(case) -> None:
        call(case, outcome.answers.setdefault(label, Counter()))

    fuzz()


def _fuzz(document: Spec, base_url: str, key: str, include: Callable[[str, str], bool]) -> Outcome:
    """Fuzz every included operation with `key`: the document's examples first, then generated
    cases."""
    import schemathesis
    from schemathesis.core.failures import FailureGroup

    schema = schemathesis.openapi.from_dict(document)
    headers = {"Authorization": f"Bearer {key}"}
    outcome = Outcome()
    checks = _checks()

    def call(case, answers: Counter[str]) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=180)
        answers[_answer(response)] += 1
        try:
            case.validate_response(response, checks=checks, headers=headers)
        except FailureGroup as failures:
            outcome.failures.append(f"{case.operation.label}: {failures}")

    for operation in _ordered(schema):
        if not include(operation.path, operation.method.lower()):
            continue
        examples = list(operation.get_strategies_from_examples())[:MAX_SPEC_EXAMPLES]
        for strategy in examples:
            _run(strategy, 1, outcome, operation.label, call)
        _run(operation.as_strategy(), MAX_EXAMPLES, outcome, operation.label, call)
    return outcome


def _document(server) -> Spec:
    return httpx.get(server.url + "/openapi.json", timeout=30).json()


def _routes(outcome: Outcome, prefix: str) -> dict[str, Counter[str]]:
    """The answers of the operations whose path starts with `prefix`."""
    return {
        label: counts
        for label, counts in outcome.answers.items()
        if label.split(" ", 1)[1].startswith(prefix)
    }


def _refused(counts: Counter[str]) -> bool:
    return set(counts) == {"401 invalid_api_key"}


def _reached(counts: Counter[str]) -> bool:
    """Some answer came from the handler's own work: not a missing key, not a name that does not
    exist."""
    return any(not label.startswith(("401", "404 not_found")) for label in counts)


def test_tenant_key_fuzzing_reaches_every_handler_without_a_server_error(server, seeded, capsys):
    document = _document(server)
    outcome = _fuzz(_confine(document, seeded), server.url, seeded.api_key, lambda path, _: True)
    with capsys.disabled():
        print(f"\ntenant-key fuzzing, answers per operation:\n{outcome.table()}")
    assert len(outcome.answers) == sum(1 for _ in _operations(document))
    assert not outcome.failures, "\n\n".join(outcome.failures)
    assert [
        label for label, counts in _routes(outcome, "/v1/").items() if not _reached(counts)
    ] == []
    operator_routes = {**_routes(outcome, "/admin"), **_routes(outcome, "/metrics")}
    assert operator_routes and all(_refused(counts) for counts in operator_routes.values()), (
        operator_routes
    )
    assert any(label.startswith("200") for label in outcome.answers["POST /v1/chat/completions"])


def _admin_may_call(path: str, method: str) -> bool:
    """Reads anywhere; writes only on tenants (confined to the admin target), never on the shared
    engine."""
    return method == "get" or not path.startswith("/admin") or path.startswith("/admin/tenants")


def test_admin_key_fuzzing_finds_no_server_error_and_opens_no_tenant_route(server, seeded, capsys):
    document = _document(server)
    outcome = _fuzz(_confine(document, seeded), server.url, server.admin_key, _admin_may_call)
    with capsys.disabled():
        print(f"\nadmin-key fuzzing, answers per operation:\n{outcome.table()}")
    assert not outcome.failures, "\n\n".join(outcome.failures)
    tenant_routes = _routes(outcome, "/v1/")
    # the fleet's reads (every tenant's usage) are the admin key's own; no other tenant route
    fleet_reads = {
        label: tenant_routes.pop(label)
        for label in list(tenant_routes)
        if label.split(" ", 1)[1] in FLEET_READS
    }
    assert tenant_routes and all(_refused(counts) for counts in tenant_routes.values()), (
        tenant_routes
    )
    assert set(fleet_reads) == {f"GET {path}" for path in FLEET_READS}
    assert all(_reached(counts) for counts in fleet_reads.values()), fleet_reads
    admin_routes = _routes(outcome, "/admin")
    assert admin_routes and all(_reached(counts) for counts in admin_routes.values()), json.dumps(
        admin_routes
    )

    # the shared engine is still up
    assert httpx.get(server.url + "/readyz", timeout=30).status_code == 200

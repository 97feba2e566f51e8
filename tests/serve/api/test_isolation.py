"""A tenant can never see or touch another tenant's adapters or deployments: 404, never 403."""

from __future__ import annotations

import pytest

from tests.helpers import assert_openai_error, image_messages, upload_folder


@pytest.fixture
def owner_and_intruder(new_tenant, make_adapter):
    owner, intruder = new_tenant(), new_tenant()
    with owner.http() as http:
        version = upload_folder(http, "secret", make_adapter(1))
        http.put("/v1/deployments/private", json={"adapter": "secret@1"}).raise_for_status()
    return owner, intruder, version


def test_intruder_cannot_read_list_deploy_delete_or_call(owner_and_intruder):
    owner, intruder, version = owner_and_intruder
    with intruder.http() as http:
        assert http.get("/v1/adapters").json() == []
        assert http.get("/v1/deployments").json() == []
        assert http.get("/v1/models").json()["data"] == []
        assert_openai_error(http.get("/v1/adapters/secret"), 404)
        assert_openai_error(http.get("/v1/models/private"), 404)
        for ref in ("secret", "secret@1", version["digest"]):
            assert_openai_error(http.put("/v1/deployments/mine", json={"adapter": ref}), 404)
        assert_openai_error(http.delete("/v1/adapters/secret/versions/1"), 404)
        assert_openai_error(
            http.post(
                "/v1/chat/completions", json={"model": "private", "messages": image_messages()}
            ),
            404,
        )
    with owner.http() as http:  # and the owner's things are untouched
        assert [v["version"] for v in http.get("/v1/adapters/secret").json()["versions"]] == [1]


def test_tenant_key_is_not_an_admin_key(owner_and_intruder):
    owner, _, _ = owner_and_intruder
    with owner.http() as http:
        assert_openai_error(http.post("/admin/tenants", json={"name": "x"}), 401)


def test_same_deployment_name_in_two_tenants_serves_each_its_own(new_tenant, make_adapter):
    a, b = new_tenant(), new_tenant()
    for tenant, seed in ((a, 1), (b, 2)):
        with tenant.http() as http:
            upload_folder(http, "ext", make_adapter(seed))
            http.put("/v1/deployments/shared-name", json={"adapter": "ext"}).raise_for_status()
    digests = set()
    for tenant in (a, b):
        raw = tenant.openai().chat.completions.with_raw_response.create(
            model="shared-name", max_tokens=2, messages=image_messages()
        )
        digests.add(raw.headers["x-lorafleet-adapter"])
    assert len(digests) == 2

"""The adapter upload API: every refusal is a clear 4xx in OpenAI's shape and stores nothing."""

from __future__ import annotations

import pytest

from tests.factories import HOSTILE, REJECTIONS, bad_archive, hostile_archive
from tests.helpers import assert_openai_error, upload_archive, upload_folder


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_bad_upload_is_refused_and_nothing_is_stored(case, server, new_tenant, make_adapter, vision_adapter,
                                                     tmp_path):
    status, phrase = REJECTIONS[case]
    tenant = new_tenant()
    before = server.stored_digests()
    archive = bad_archive(case, make_adapter(1), tmp_path, vision_adapter, make_adapter(3, rank=32))
    with tenant.http() as http:
        response = upload_archive(http, "ext", archive)
        assert_openai_error(response, status, phrase)
        assert http.get("/v1/adapters").json() == []
    assert server.stored_digests() == before
    assert not list((server.home / "tmp").iterdir())  # scratch space is cleaned up too


@pytest.mark.parametrize("case", ["gzip_bomb", "zip_bomb", "hard_link", "catastrophic_target_regex", "zero_lora_B"])
def test_hostile_upload_is_refused_and_nothing_is_stored(case, server, new_tenant, make_adapter, tmp_path):
    status, _, phrase = HOSTILE[case]
    before = server.stored_digests()
    with new_tenant().http() as http:
        assert_openai_error(upload_archive(http, "ext", hostile_archive(case, make_adapter(1), tmp_path)), status,
                            phrase)
        assert http.get("/v1/adapters").json() == []
    assert server.stored_digests() == before
    assert not list((server.home / "tmp").iterdir())


def test_same_content_returns_the_existing_version(new_tenant, make_adapter):
    tenant = new_tenant()
    with tenant.http() as http:
        first = upload_folder(http, "ext", make_adapter(1))
        again = upload_folder(http, "ext", make_adapter(1))
        listing = http.get("/v1/adapters/ext").json()
    assert again["digest"] == first["digest"] and again["version"] == first["version"] == 1
    assert len(listing["versions"]) == 1


def test_upload_reports_the_version(new_tenant, make_adapter):
    tenant = new_tenant()
    with tenant.http() as http:
        version = upload_folder(http, "ext", make_adapter(2))
    assert version["name"] == "ext" and version["version"] == 1 and version["rank"] == 8
    assert "q_proj" in version["target_modules"] and version["size_bytes"] > 0


def test_upload_without_file_is_400(new_tenant):
    with new_tenant().http() as http:
        assert_openai_error(http.post("/v1/adapters", data={"name": "ext"}), 400, "file")


def test_invalid_adapter_name_is_400(new_tenant, make_adapter):
    from lorafleet.serve.client import pack_adapter

    archive = pack_adapter(make_adapter(1))
    with new_tenant().http() as http:
        assert_openai_error(upload_archive(http, "bad/name", archive), 400, "invalid name")
    archive.unlink()


def test_deployed_version_cannot_be_deleted_and_its_blob_goes_with_the_last_user(server, new_tenant, make_adapter):
    tenant = new_tenant()
    with tenant.http() as http:
        v1 = upload_folder(http, "ext", make_adapter(8))
        upload_folder(http, "ext", make_adapter(9))
        http.put("/v1/deployments/d", json={"adapter": "ext@1"}).raise_for_status()
        assert_openai_error(http.delete("/v1/adapters/ext/versions/1"), 409, "deployed by d")
        http.put("/v1/deployments/d", json={"adapter": "ext@2"}).raise_for_status()
        assert http.delete("/v1/adapters/ext/versions/1").json()["digest"] == v1["digest"]
        assert [v["version"] for v in http.get("/v1/adapters/ext").json()["versions"]] == [2]
        assert_openai_error(http.put("/v1/deployments/d", json={"adapter": "ext@1"}), 404)
    assert v1["digest"] not in server.stored_digests()


def test_unknown_version_reference_is_404(new_tenant, make_adapter):
    with new_tenant().http() as http:
        upload_folder(http, "ext", make_adapter(1))
        assert_openai_error(http.put("/v1/deployments/d", json={"adapter": "ext@7"}), 404, "no version 7")
        assert_openai_error(http.put("/v1/deployments/d", json={"adapter": "ext@x"}), 400, "invalid adapter reference")

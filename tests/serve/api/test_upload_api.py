"""The adapter upload API: every refusal is a clear 4xx in OpenAI's shape and stores nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from lorafleet.adapters.base_model import BaseModelSpec
from lorafleet.adapters.catalog import open_catalog
from lorafleet.adapters.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES
from lorafleet.adapters.registry import create_tenant
from lorafleet.adapters.store import LocalStore
from lorafleet.adapters.validate import ValidatedAdapter, upload_limit
from lorafleet.serve.api import adapters, models
from lorafleet.serve.api.errors import install_error_handlers
from lorafleet.serve.api.guard import Authenticate
from lorafleet.serve.gateway_client import pack_adapter
from lorafleet.serve.route_cache import RouteCache
from lorafleet.serve.settings import Settings
from tests.adapters.test_manifest import trainer_manifest
from tests.factories import (
    CONFIG,
    HOSTILE,
    REJECTIONS,
    SMALL_LORA,
    WEIGHTS,
    bad_archive,
    hostile_archive,
    small_adapter,
)
from tests.helpers import assert_openai_error, upload_archive, upload_folder


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_bad_upload_is_refused_and_nothing_is_stored(
    case, server, new_tenant, make_adapter, tmp_path
):
    status, phrase = REJECTIONS[case]
    tenant = new_tenant()
    before = server.stored_digests()
    archive = bad_archive(case, make_adapter(1), tmp_path, make_adapter(3, rank=32))
    with tenant.http() as http:
        response = upload_archive(http, "ext", archive)
        assert_openai_error(response, status, phrase)
        assert http.get("/v1/adapters").json() == []
    assert server.stored_digests() == before
    assert not list((server.home / "tmp").iterdir())  # scratch space is cleaned up too


@pytest.mark.parametrize(
    "case", ["gzip_bomb", "zip_bomb", "hard_link", "catastrophic_target_regex", "zero_lora_B"]
)
def test_hostile_upload_is_refused_and_nothing_is_stored(
    case, server, new_tenant, make_adapter, tmp_path
):
    status, _, phrase = HOSTILE[case]
    before = server.stored_digests()
    with new_tenant().http() as http:
        assert_openai_error(
            upload_archive(http, "ext", hostile_archive(case, make_adapter(1), tmp_path)),
            status,
            phrase,
        )
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
    archive = pack_adapter(make_adapter(1))
    with new_tenant().http() as http:
        assert_openai_error(upload_archive(http, "bad/name", archive), 400, "invalid name")
    archive.unlink()


def test_deployed_version_cannot_be_deleted_and_its_blob_goes_with_the_last_user(
    server, new_tenant, make_adapter
):
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
        assert_openai_error(
            http.put("/v1/deployments/d", json={"adapter": "ext@7"}), 404, "no version 7"
        )
        assert_openai_error(
            http.put("/v1/deployments/d", json={"adapter": "ext@x"}),
            400,
            "invalid adapter reference",
        )


# --- the trainer's manifest.json, through the real routes, catalog and store, without an engine ---

SMALL_BASE = BaseModelSpec(
    name="small",
    language_model_prefix="model.language_model",
    lora_modules={SMALL_LORA.removeprefix("base_model.model."): (16, 16)},
    other_linear={},
)


def manifest_app(tmp_path: Path, catalog: str, **settings: Any) -> tuple[FastAPI, str]:
    """The registry routes over a real catalog (at URL `catalog`, with no rows) and local store,
    validating uploads against a base whose one LoRA-able layer is `small_adapter`'s; returns the
    app and a tenant key."""
    _, sessions = open_catalog(catalog)
    with sessions() as session:
        _, key = create_tenant(session, "acme")
    (tmp_path / "tmp").mkdir()
    app = FastAPI()
    app.state.gateway = SimpleNamespace(
        settings=Settings(base="small", home=tmp_path, **settings),
        sessions=sessions,
        route_cache=RouteCache(sessions, 0.0),
        store=LocalStore(tmp_path / "adapters"),
        spec=SMALL_BASE,
        tmp_dir=tmp_path / "tmp",
        max_upload_bytes=upload_limit(SMALL_BASE, Settings.UPLOAD_RANK_LIMIT),
        tower_lora=False,
    )
    app.add_middleware(Authenticate, gateway=app.state.gateway)
    install_error_handlers(app)
    app.include_router(adapters.router)
    app.include_router(models.router)  # /v1/tenant, which the CLI asks before an upload
    return app, key


def adapter_with_manifest(
    folder: Path, seed: int, manifest: dict | bytes | None
) -> ValidatedAdapter:
    """`small_adapter` with `manifest` as its manifest.json (JSON-encoded unless given as bytes)."""
    adapter = small_adapter(folder, seed)
    if manifest is not None:
        content = (
            manifest if isinstance(manifest, bytes) else json.dumps(manifest, indent=2).encode()
        )
        (folder / MANIFEST_FILE).write_bytes(content)
    return adapter


def _client(app: FastAPI, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://gateway",
        headers={"Authorization": f"Bearer {key}"},
    )


async def _upload(http: httpx.AsyncClient, name: str, folder: Path) -> httpx.Response:
    archive = pack_adapter(folder)  # what `lorafleet adapters push` sends: every file of the folder
    try:
        return await http.post(
            "/v1/adapters",
            data={"name": name},
            files={"file": ("a.tar.gz", archive.read_bytes(), "application/gzip")},
        )
    finally:
        archive.unlink()


async def test_an_upload_keeps_the_trainers_manifest_on_its_version_outside_its_digest(
    tmp_path, sqlite_catalog
):
    app, key = manifest_app(tmp_path, sqlite_catalog(tmp_path / "catalog.db"))
    adapter = adapter_with_manifest(tmp_path / "a", 1, None)
    manifest = trainer_manifest(adapter.digest)
    (tmp_path / "a" / MANIFEST_FILE).write_text(json.dumps(manifest))
    async with _client(app, key) as http:
        uploaded = await _upload(http, "ext", tmp_path / "a")
        assert uploaded.status_code == 201, uploaded.text
        # the digest of the adapter without its manifest
        assert uploaded.json()["digest"] == adapter.digest
        assert "manifest" not in uploaded.json()
        [version] = (await http.get("/v1/adapters/ext")).json()["versions"]
        listed = (await http.get("/v1/adapters")).json()
    assert version["manifest"] == manifest and version["manifest_matches"] is True
    # the list's shape
    assert set(listed[0]["versions"][0]) == set(version) - {"manifest", "manifest_matches"}
    stored = app.state.gateway.store.local_path(adapter.digest)
    # the blob is the adapter alone
    assert sorted(p.name for p in stored.iterdir()) == [CONFIG, WEIGHTS]


@pytest.mark.parametrize(
    ("recorded", "matches"), [("other", False), ("nothing", None), ("no manifest", None)]
)
async def test_manifest_matches_says_whether_the_recorded_digest_is_the_versions(
    tmp_path, sqlite_catalog, recorded, matches
):
    app, key = manifest_app(tmp_path, sqlite_catalog(tmp_path / "catalog.db"))
    manifest = {
        "other": trainer_manifest("0" * 64),
        "nothing": {"training": {"steps": 3}},
        "no manifest": None,
    }[recorded]
    adapter_with_manifest(tmp_path / "a", 1, manifest)
    async with _client(app, key) as http:
        assert (await _upload(http, "ext", tmp_path / "a")).status_code == 201
        [version] = (await http.get("/v1/adapters/ext")).json()["versions"]
    assert version["manifest"] == manifest and version["manifest_matches"] is matches


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (
            json.dumps({"pad": os.urandom(MAX_MANIFEST_BYTES // 2 + 1).hex()}).encode(),
            "over the limit of 1048576 bytes",
        ),
        (b'["a", "list"]', "must be a JSON object"),
        (b"{broken", "not valid JSON"),
    ],
    ids=["too-large", "not-an-object", "not-json"],
)
async def test_a_bad_manifest_refuses_the_upload_and_nothing_is_stored(
    tmp_path, sqlite_catalog, content, phrase
):
    app, key = manifest_app(tmp_path, sqlite_catalog(tmp_path / "catalog.db"))
    adapter_with_manifest(tmp_path / "a", 1, content)
    async with _client(app, key) as http:
        error = assert_openai_error(await _upload(http, "ext", tmp_path / "a"), 400, phrase)
        assert error["code"] == "invalid_adapter" and error["message"].startswith(
            "invalid adapter (manifest)"
        )
        assert (await http.get("/v1/adapters")).json() == []
    assert not any((tmp_path / "adapters").iterdir()) and not any((tmp_path / "tmp").iterdir())


async def test_content_stored_under_another_name_gets_a_version_of_the_name_asked_for(
    tmp_path, sqlite_catalog
):
    adapter = adapter_with_manifest(tmp_path / "a", 1, None)
    # room for two versions, and for the bytes of one adapter only
    app, key = manifest_app(
        tmp_path,
        sqlite_catalog(tmp_path / "catalog.db"),
        tenant_max_adapters=2,
        tenant_max_adapter_bytes=adapter.size_bytes,
    )
    async with _client(app, key) as http:
        first = await _upload(http, "extractor", tmp_path / "a")
        again = await _upload(http, "extractor", tmp_path / "a")
        other = await _upload(http, "jsonx", tmp_path / "a")
        listed = {a["name"]: a["versions"] for a in (await http.get("/v1/adapters")).json()}
        third = await _upload(http, "third", tmp_path / "a")
    assert (first.status_code, again.status_code, other.status_code) == (201, 200, 201)
    assert (first.json()["name"], first.json()["version"]) == ("extractor", 1)
    assert again.json() == first.json()  # the same content under the same name: that version
    # under another name: a version of that name (the response names it), the same digest
    assert (other.json()["name"], other.json()["version"]) == ("jsonx", 1)
    assert other.json()["digest"] == first.json()["digest"] == adapter.digest
    assert [v["version"] for v in listed["jsonx"]] == [1]
    # one blob for both names: the bytes limit (one adapter's) was not passed by the second name
    assert [p.name for p in (tmp_path / "adapters").iterdir() if p.name[0] != "."] == [
        adapter.digest
    ]
    # a third version passes the limit of two versions, shared blob or not
    assert third.status_code == 429 and "its limit of 2" in third.json()["error"]["message"]

"""Tenants' keys, disabling and deletion, the audit trail, and what is private (metrics, the
state folder), on the real server."""

from __future__ import annotations

import os
import stat
import time

import httpx
from typer.testing import CliRunner

from lorafleet.serve.cli import app as cli
from lorafleet.serve.cli.common import console
from lorafleet.serve.types import epoch
from tests.helpers import assert_openai_error, upload_folder

runner = CliRunner()


def _until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def _models(url: str, key: str) -> httpx.Response:
    return httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_keys_are_created_listed_rotated_with_grace_and_revoked(server, new_tenant):
    tenant = new_tenant()
    with server.admin() as admin:
        first_id = admin.get(f"/admin/tenants/{tenant.name}/keys").json()[0]["id"]
        created = admin.post(
            f"/admin/tenants/{tenant.name}/keys", json={"label": "ci", "expires_in_s": 3600}
        )
        assert created.status_code == 201, created.text
        ci = created.json()
        assert (
            ci["api_key"].startswith(ci["prefix"])
            and ci["live"]
            and epoch(ci["expires_at"]) > time.time() + 3500
        )
        assert _models(server.url, ci["api_key"]).status_code == 200

        rotated = admin.post(
            f"/admin/tenants/{tenant.name}/keys/{first_id}/rotate", json={"grace_s": 2}
        )
        assert rotated.status_code == 201, rotated.text
        new_key = rotated.json()["new"]["api_key"]
        # the old key, within its grace period
        assert _models(server.url, tenant.api_key).status_code == 200
        _until(lambda: _models(server.url, tenant.api_key).status_code == 401)
        assert_openai_error(_models(server.url, tenant.api_key), 401, "expired")
        assert _models(server.url, new_key).status_code == 200

        assert admin.delete(f"/admin/tenants/{tenant.name}/keys/{ci['id']}").json()["revoked_at"]
        error = assert_openai_error(_models(server.url, ci["api_key"]), 401, "revoked")  # at once
        assert error["code"] == "api_key_revoked"
        listed = {k["id"]: k for k in admin.get(f"/admin/tenants/{tenant.name}/keys").json()}
        assert [k["live"] for k in listed.values()] == [False, False, True]
        assert all("api_key" not in k and "key_hash" not in k for k in listed.values())
        assert_openai_error(admin.delete(f"/admin/tenants/{tenant.name}/keys/999999"), 404)
        assert_openai_error(
            admin.post(f"/admin/tenants/{tenant.name}/keys", json={"expires_in_s": -5}), 400
        )


def test_a_disabled_tenant_is_refused_with_the_reason_until_enabled(server, new_tenant):
    tenant = new_tenant()
    with server.admin() as admin:
        admin.post(
            f"/admin/tenants/{tenant.name}/disable", json={"reason": "abuse report 42"}
        ).raise_for_status()
        error = assert_openai_error(_models(server.url, tenant.api_key), 401, "abuse report 42")
        assert error["code"] == "tenant_disabled"
        with tenant.http() as http:  # every tenant route, uploads included
            assert_openai_error(
                http.post("/v1/adapters", data={"name": "x"}, files={"file": ("a", b"x")}), 401
            )
        assert admin.get(f"/admin/tenants/{tenant.name}").json()["disabled"] is True
        admin.post(f"/admin/tenants/{tenant.name}/enable").raise_for_status()
    assert _models(server.url, tenant.api_key).status_code == 200


def test_deleting_a_tenant_removes_its_things_and_files_refused_during_a_rollout(
    server, new_tenant, make_adapter
):
    tenant, other = new_tenant(), new_tenant()
    with tenant.http() as http:
        mine = upload_folder(http, "ext", make_adapter(41))
        upload_folder(http, "ext", make_adapter(42))
        http.put("/v1/deployments/prod", json={"adapter": "ext@1"}).raise_for_status()
        started = http.post(
            "/v1/deployments/prod/rollout", json={"to": "ext@2", "gate": False, "steps": [10, 100]}
        )
        assert started.status_code == 202, started.text
    with other.http() as http:
        # the same content: its file is shared
        theirs = upload_folder(http, "same", make_adapter(41))
    assert mine["digest"] == theirs["digest"]
    with server.admin() as admin:
        refused = assert_openai_error(admin.delete(f"/admin/tenants/{tenant.name}"), 409, "rollout")
        assert refused["code"] == "rollout_running"
        assert _models(server.url, tenant.api_key).status_code == 200  # refused: nothing changed
        deleted = admin.delete(f"/admin/tenants/{tenant.name}", params={"force": "true"})
        assert deleted.status_code == 200, deleted.text
        assert (
            deleted.json()["deleted"]["adapter_versions"] == 2
            and deleted.json()["deleted"]["rollouts"] == 1
        )
        assert tenant.name not in admin.get("/admin/tenants").json()
        assert_openai_error(admin.get(f"/admin/tenants/{tenant.name}"), 404)
    assert_openai_error(_models(server.url, tenant.api_key), 401)
    assert mine["digest"] in server.stored_digests()  # still the other tenant's
    assert deleted.json()["blobs_deleted"] == 1  # ext@2's file, which no one else had
    with other.http() as http:
        assert [v["digest"] for v in http.get("/v1/adapters/same").json()["versions"]] == [
            theirs["digest"]
        ]


def test_admin_operations_are_audited_and_listed_by_the_cli(server, new_tenant, monkeypatch):
    monkeypatch.setattr(console, "_width", 200)  # the tables' cells unwrapped
    tenant = new_tenant()
    with server.admin() as admin:
        admin.put(f"/admin/tenants/{tenant.name}/limits", json={"rpm": 77}).raise_for_status()
        admin.post(
            f"/admin/tenants/{tenant.name}/disable", json={"reason": "audit me"}
        ).raise_for_status()
        events = admin.get("/admin/audit", params={"tenant": tenant.name}).json()
    assert [e["action"] for e in events] == ["tenant.disable", "tenant.limits", "tenant.create"]
    assert events[1]["details"] == {"changes": {"rpm": 77}}
    assert all(e["actor"] == "admin@127.0.0.1" for e in events)
    shown = runner.invoke(
        cli,
        ["audit", "--tenant", tenant.name, "--url", server.url, "--admin-key", server.admin_key],
    )
    assert shown.exit_code == 0, shown.output
    assert "tenant.disable" in shown.output and "audit me" in shown.output
    limits = runner.invoke(
        cli,
        [
            "tenants",
            "limits",
            tenant.name,
            "--tpm",
            "0",
            "--rpm",
            "default",
            "--url",
            server.url,
            "--admin-key",
            server.admin_key,
        ],
    )
    assert limits.exit_code == 0, limits.output
    assert "unlimited" in limits.output  # tpm 0
    with server.admin() as admin:
        assert admin.get(f"/admin/tenants/{tenant.name}/limits").json()["overrides"] == {"tpm": 0}
    bad = runner.invoke(
        cli,
        [
            "tenants",
            "limits",
            tenant.name,
            "--rpm",
            "lots",
            "--url",
            server.url,
            "--admin-key",
            server.admin_key,
        ],
    )
    assert bad.exit_code != 0 and "whole number" in bad.output


def test_metrics_need_a_token_on_the_api_port_and_are_open_on_their_loopback_listener(
    server, new_tenant
):
    tenant = new_tenant()
    assert_openai_error(httpx.get(server.url + "/metrics"), 401)
    assert_openai_error(
        httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {tenant.api_key}"}),
        401,
    )
    with server.admin() as admin:
        assert "lorafleet_requests" in admin.get("/metrics").text
    own = httpx.get(server.metrics_url)
    assert own.status_code == 200 and "lorafleet_catalog_connections_in_use" in own.text


def test_the_state_folder_and_its_files_are_the_owners_alone(server):
    assert stat.S_IMODE(server.home.stat().st_mode) == 0o700
    # (its catalog is in PostgreSQL)
    for path in (server.home / "logs" / "engine.log", server.home / "adapters"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, oct(path.stat().st_mode)


def test_the_engine_token_is_not_on_any_command_line(server):
    token = server.env["LORAFLEET_ENGINE_API_KEY"]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        assert token.encode() not in cmdline, f"pid {pid}"

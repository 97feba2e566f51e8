"""Capture through the real gateway and engine: a deployment opts in, its requests are kept with
their images in the capture store, exported as sent, hidden from other tenants, and deleted on
opt-out."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from pathlib import Path

import httpx
import pytest

from lorafleet.chat_jsonl import load_jsonl
from tests.helpers import assert_openai_error, image_messages, poll_until, upload_folder

MAX_TOKENS = 6
POLICY = {"sample_rate": 1.0, "max_per_day": 100, "retention_days": 1.0}


@pytest.fixture(scope="module")
def tenants(server, make_adapter):
    """Two tenants; the first serves an adapter as deployments it names per test, the second as
    `assistant`."""
    from tests.conftest import TenantHandle

    handles = []
    with server.admin() as admin:
        for seed in (5, 6):
            created = admin.post(
                "/admin/tenants", json={"name": f"cap-{seed}-{uuid.uuid4().hex[:6]}"}
            ).json()
            handle = TenantHandle(name=created["name"], api_key=created["api_key"], url=server.url)
            with handle.http() as http:
                upload_folder(http, "ext", make_adapter(seed))
            handles.append(handle)
    return handles


def _deploy(http: httpx.Client) -> str:
    name = f"cap-{uuid.uuid4().hex[:6]}"
    response = http.put(f"/v1/deployments/{name}", json={"adapter": "ext@1"})
    assert response.status_code == 200, response.text
    return name


def _chat(http: httpx.Client, deployment: str, messages: list[dict], stream: bool = False) -> str:
    body = {
        "model": deployment,
        "messages": messages,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": stream,
    }
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.headers["x-request-id"]


def _captures(http: httpx.Client, deployment: str, n: int) -> list[dict]:
    """The deployment's captures once there are `n` (each is written after its response)."""

    def listed():
        rows = http.get("/v1/captures", params={"deployment": deployment}).json()["data"]
        return rows if len(rows) >= n else None

    return poll_until(listed, 30, f"{n} captures of {deployment}")


def _sha(messages: list[dict]) -> str:
    return hashlib.sha256(
        base64.b64decode(messages[0]["content"][0]["image_url"]["url"].partition(",")[2])
    ).hexdigest()


def test_captured_requests_are_kept_with_their_images_and_exported_as_sent(
    server, tenants, tmp_path: Path
):
    with tenants[0].http() as http:
        name = _deploy(http)
        put = http.put(f"/v1/deployments/{name}/capture", json=POLICY)
        assert put.status_code == 200 and put.json()["capture"] == POLICY, put.text
        red, blue = image_messages(color=(200, 30, 30)), image_messages(color=(30, 30, 200))
        sent = {
            _chat(http, name, red): red,
            _chat(http, name, blue): blue,
            _chat(http, name, red, stream=True): red,
        }
        rows = _captures(http, name, 3)
        assert {row["id"] for row in rows} == set(sent)
        for row in rows:
            assert (
                row["images"] == [_sha(sent[row["id"]])]
                and row["answer"]
                and row["variant"] == "stable"
            )
            assert (server.home / "captures" / row["images"][0]).is_file()
        assert len({row["images"][0] for row in rows}) == 2  # the red picture is stored once
        status = http.get(f"/v1/deployments/{name}/capture").json()
        assert (status["policy"], status["captures"], status["today"], status["images"]) == (
            POLICY,
            3,
            3,
            2,
        )

        corrected = rows[-1]["id"]  # the oldest
        assert (
            http.post(
                "/v1/feedback", json={"id": corrected, "score": -1, "correction": "fixed"}
            ).status_code
            == 201
        )
        export = http.get(f"/v1/deployments/{name}/captures/export")
        assert export.status_code == 200 and export.headers["content-type"].startswith(
            "application/x-ndjson"
        )
        assert export.headers["x-lorafleet-examples"] == "3"
        lines = [json.loads(line) for line in export.text.splitlines()]
        assert [line["metadata"]["request_id"] for line in lines] == [
            row["id"] for row in reversed(rows)
        ]
        for line in lines:
            # the images, byte for byte
            assert line["messages"][:-1] == sent[line["metadata"]["request_id"]]
        assert lines[0]["messages"][-1] == {"role": "assistant", "content": "fixed"}
        assert lines[0]["metadata"]["answer"] == "correction"
        path = tmp_path / "data.jsonl"
        path.write_text(export.text)
        assert len(load_jsonl(path)) == 3

        def logged_as_captured() -> bool:
            rows = http.get("/v1/requests", params={"deployment": name}).json()["data"]
            return {row["id"] for row in rows if row["captured"]} == set(sent)

        poll_until(logged_as_captured, 15, "the request log marking the captured requests")


def test_another_tenant_can_neither_see_nor_delete_the_captures(tenants):
    mine, theirs = tenants
    with mine.http() as http:
        name = _deploy(http)
        http.put(f"/v1/deployments/{name}/capture", json=POLICY).raise_for_status()
        request_id = _chat(http, name, image_messages())
        _captures(http, name, 1)
    with theirs.http() as http:
        for method in ("GET", "DELETE"):
            assert_openai_error(http.request(method, f"/v1/deployments/{name}/capture"), 404)
        assert_openai_error(http.put(f"/v1/deployments/{name}/capture", json=POLICY), 404)
        assert_openai_error(http.get(f"/v1/deployments/{name}/captures/export"), 404)
        assert (
            assert_openai_error(http.delete(f"/v1/captures/{request_id}"), 404)["code"]
            == "capture_not_found"
        )
        assert http.delete("/v1/captures").json()["captures"] == 0
        assert http.get("/v1/captures", params={"limit": 1000}).json()["data"] == []
    with mine.http() as http:
        assert [row["id"] for row in _captures(http, name, 1)] == [request_id]


def test_opting_out_deletes_the_captures_and_their_image_files(server, tenants):
    with tenants[0].http() as http:
        name = _deploy(http)
        http.put(f"/v1/deployments/{name}/capture", json=POLICY).raise_for_status()
        pictures = [image_messages(color=(i * 40, 90, 10)) for i in range(2)]
        for messages in pictures:
            _chat(http, name, messages)
        digests = {row["images"][0] for row in _captures(http, name, 2)}
        deleted = http.delete(f"/v1/deployments/{name}/capture")
        assert deleted.status_code == 200 and deleted.json() == {"captures": 2, "images": 2}, (
            deleted.text
        )
        assert not any((server.home / "captures" / digest).exists() for digest in digests)
        assert http.get("/v1/captures", params={"deployment": name}).json()["data"] == []
        assert http.get(f"/v1/deployments/{name}/capture").json()["policy"] is None
        assert http.get(f"/v1/deployments/{name}/captures/export").text == ""
        request_id = _chat(http, name, pictures[0])
        poll_until(
            lambda: any(row["id"] == request_id for row in http.get("/v1/requests").json()["data"]),
            15,
            "the request after the opt-out in the log",
        )
        assert http.get("/v1/captures", params={"deployment": name}).json()["data"] == []

"""OpenAI's Files and Batch APIs on the real gateway and engine, through the unmodified `openai`
SDK: a 200-line batch answers every `custom_id` once; another tenant sees none of it; a bad line is
refused naming it; cancel stops a batch and keeps what finished; a gateway killed mid-batch and
started again finishes it without running a finished line again."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import NEAR_BASE_STD, Server
from tests.helpers import assert_openai_error, image_messages, poll_until, upload_folder

pytestmark = pytest.mark.engine

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 30)]


def _requests(n: int, deployment: str, max_tokens: int = 6) -> bytes:
    lines = []
    for i in range(n):
        messages = (
            image_messages(color=COLORS[i % len(COLORS)])
            if i % 2
            else [{"role": "user", "content": f"Say something about the number {i}."}]
        )
        body = {
            "model": deployment,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        lines.append(
            json.dumps(
                {
                    "custom_id": f"req-{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": body,
                }
            )
        )
    return ("\n".join(lines) + "\n").encode()


def _deployed(tenant, make_adapter, name: str = "reader") -> None:
    with tenant.http() as http:
        upload_folder(http, "ext", make_adapter(3, 8, std=NEAR_BASE_STD))
        http.put(f"/v1/deployments/{name}", json={"adapter": "ext@1"}).raise_for_status()


def _finished(client, batch_id: str, timeout: float = 600):
    return poll_until(
        lambda: (
            (b := client.batches.retrieve(batch_id)).status
            in ("completed", "failed", "cancelled", "expired")
            and b
        ),
        timeout,
        f"batch {batch_id} finished",
    )


def _lines(data: bytes | str) -> list[dict]:
    text = data.decode() if isinstance(data, bytes) else data
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_a_200_line_batch_answers_every_request_once_and_is_its_tenants_alone(
    new_tenant, make_adapter
):
    tenant = new_tenant()
    _deployed(tenant, make_adapter)
    client = tenant.openai()
    uploaded = client.files.create(
        file=("requests.jsonl", _requests(200, "reader")), purpose="batch"
    )
    assert (uploaded.purpose, uploaded.object) == ("batch", "file")
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert batch.status == "validating" and batch.request_counts.total == 200
    done = _finished(client, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (200, 0)
    assert done.metadata == {"job": "nightly"} and done.completed_at >= done.in_progress_at
    assert done.error_file_id is None
    output = _lines(client.files.content(done.output_file_id).text)
    assert sorted(line["custom_id"] for line in output) == sorted(f"req-{i}" for i in range(200))
    for line in output:
        response = line["response"]
        assert response["status_code"] == 200 and line["error"] is None
        assert response["body"]["model"] == "reader"  # the deployment, never the digest
        assert response["body"]["choices"][0]["finish_reason"] in ("stop", "length")
        assert response["request_id"].startswith("chatcmpl-")
    # each the answer a live request gets (greedy)
    requested = {
        json.loads(line)["custom_id"]: json.loads(line)["body"]
        for line in _requests(200, "reader").decode().splitlines()
    }
    by_id = {line["custom_id"]: line["response"]["body"] for line in output}
    for custom_id in ("req-0", "req-1", "req-2", "req-3"):
        live = client.chat.completions.create(**requested[custom_id])
        answered = by_id[custom_id]["choices"][0]["message"]["content"]
        assert live.choices[0].message.content == answered, custom_id
        assert live.usage.completion_tokens == by_id[custom_id]["usage"]["completion_tokens"]
    assert [b.id for b in client.batches.list()][:1] == [batch.id]
    files = {f.id for f in client.files.list()}
    assert {uploaded.id, done.output_file_id} <= files
    # the request log keeps the lines as the batch's (written every request_log_flush_s)
    with tenant.http() as http:

        def logged() -> list[dict] | None:
            rows = http.get("/v1/requests", params={"limit": 500}).json()["data"]
            mine = [r for r in rows if r.get("batch_id") == batch.id]
            return mine if len(mine) >= 200 else None

        rows = poll_until(logged, 30, "the batch's lines in the request log")
    assert sorted(r["id"] for r in rows) == sorted(
        line["response"]["request_id"] for line in output
    )

    other = new_tenant()
    with other.http() as http:
        for path in (
            f"/v1/batches/{batch.id}",
            f"/v1/files/{uploaded.id}",
            f"/v1/files/{done.output_file_id}/content",
        ):
            assert_openai_error(http.get(path), 404)
        assert_openai_error(http.post(f"/v1/batches/{batch.id}/cancel"), 404)
        assert_openai_error(http.delete(f"/v1/files/{uploaded.id}"), 404)
        assert http.get("/v1/batches").json()["data"] == []
    # the tenant deletes its files
    assert client.files.delete(uploaded.id).deleted
    with tenant.http() as http:
        assert_openai_error(http.get(f"/v1/files/{uploaded.id}"), 404)


def test_a_bad_file_is_refused_naming_its_line_and_nothing_is_stored(
    server: Server, new_tenant, make_adapter
):
    tenant = new_tenant()
    _deployed(tenant, make_adapter)
    good = _requests(3, "reader").decode().splitlines()
    unknown = json.loads(good[1])
    unknown["body"]["model"] = "nobody"
    with tenant.http() as http:
        for lines, said in (
            ([good[0], "{oops", good[2]], "line 2: not valid JSON"),
            ([good[0], json.dumps(unknown)], "line 2: deployment 'nobody' does not exist"),
            ([good[0], good[0]], "line 2: custom_id 'req-0' is not unique"),
        ):
            refused = http.post(
                "/v1/files",
                data={"purpose": "batch"},
                files={"file": ("r.jsonl", "\n".join(lines).encode())},
            )
            assert_openai_error(refused, 400, said)
        assert_openai_error(
            http.post(
                "/v1/files", data={"purpose": "fine-tune"}, files={"file": ("r.jsonl", b"{}")}
            ),
            400,
            "purpose",
        )
        # more lines than the tenant's limit of lines in a batch
        with server.admin() as admin:
            admin.put(f"/admin/tenants/{tenant.name}/limits", json={"batch_lines": 2})
        over = http.post(
            "/v1/files",
            data={"purpose": "batch"},
            files={"file": ("r.jsonl", "\n".join(good).encode())},
        )
        assert_openai_error(over, 400, "line 3: the file has more than 2 requests")
        assert http.get("/v1/files").json()["data"] == []  # nothing stored


def test_cancel_stops_a_batch_and_keeps_what_finished(new_tenant, make_adapter):
    tenant = new_tenant()
    _deployed(tenant, make_adapter)
    client = tenant.openai()
    uploaded = client.files.create(
        file=("long.jsonl", _requests(400, "reader", max_tokens=24)), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    poll_until(
        lambda: client.batches.retrieve(batch.id).request_counts.completed >= 10,
        300,
        "some lines answered",
    )
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = _finished(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at >= done.cancelling_at
    answered = _lines(client.files.content(done.output_file_id).text)
    not_run = _lines(client.files.content(done.error_file_id).text)
    assert 10 <= len(answered) < 400 and len(answered) == done.request_counts.completed
    assert len(answered) + len(not_run) == 400
    assert {line["error"]["code"] for line in not_run} == {"batch_cancelled"}
    assert not {a["custom_id"] for a in answered} & {n["custom_id"] for n in not_run}
    with tenant.http() as http:  # a finished batch cannot be cancelled again
        assert http.post(f"/v1/batches/{batch.id}/cancel").json()["status"] == "cancelled"


def _engine_requests(server: Server) -> float:
    """Requests the engine has finished since it started (every reason)."""
    text = httpx.get(f"{server.engine_url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "vllm:request_success"
        for sample in family.samples
        if sample.name == "vllm:request_success_total"
    )


def test_a_gateway_killed_mid_batch_is_started_again_and_runs_no_finished_line_twice(
    server: Server, make_adapter, tmp_path: Path
):
    concurrency = 4
    gateway = server.attach(
        tmp_path / "home",
        batch_lease_s="3",
        batch_tick_s="0.5",
        batch_concurrency=str(concurrency),
        request_log_flush_s="0.5",
    )
    digest = None
    try:
        gateway.wait_ready()
        admin = httpx.Client(
            base_url=gateway.url,
            headers={"Authorization": f"Bearer {gateway.admin_key}"},
            timeout=60,
        )
        key = admin.post("/admin/tenants", json={"name": "nightly"}).json()["api_key"]
        http = httpx.Client(
            base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=120
        )
        digest = upload_folder(http, "ext", make_adapter(4, 8, std=NEAR_BASE_STD))["digest"]
        http.put("/v1/deployments/reader", json={"adapter": "ext@1"}).raise_for_status()
        uploaded = http.post(
            "/v1/files",
            data={"purpose": "batch"},
            files={"file": ("r.jsonl", _requests(120, "reader", max_tokens=16))},
        ).json()
        before = _engine_requests(server)
        batch = http.post(
            "/v1/batches",
            json={
                "input_file_id": uploaded["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        ).json()
        poll_until(
            lambda: (
                http.get(f"/v1/batches/{batch['id']}").json()["request_counts"]["completed"] >= 30
            ),
            300,
            "a quarter of the lines answered",
        )
        gateway.process.kill()  # kill -9: nothing is flushed, no lease given back
        gateway.process.wait(30)
        gateway.restart()
        gateway.wait_ready()
        state = poll_until(
            lambda: (
                (b := http.get(f"/v1/batches/{batch['id']}").json())["status"] == "completed" and b
            ),
            600,
            "the batch finished after the restart",
        )
        assert state["request_counts"] == {"total": 120, "completed": 120, "failed": 0}
        output = _lines(http.get(f"/v1/files/{state['output_file_id']}/content").content)
        custom_ids = [line["custom_id"] for line in output]
        assert sorted(custom_ids) == sorted(f"req-{i}" for i in range(120))  # each once
        # the engine ran each line once, but those in flight at the kill (never recorded)
        ran = _engine_requests(server) - before
        assert 120 <= ran <= 120 + concurrency, ran
    finally:
        gateway.stop()
        if digest is not None:
            server.unload(digest)


def test_a_batch_is_the_unit_of_an_ab_tests_assignment_unless_a_line_names_a_user(
    new_tenant, make_adapter
):
    tenant = new_tenant()
    _deployed(tenant, make_adapter)
    with tenant.http() as http:
        upload_folder(http, "ext", make_adapter(5, 8, std=NEAR_BASE_STD))
        started = http.post(
            "/v1/deployments/reader/ab",
            json={
                "variants": [{"adapter": "ext@1", "weight": 50}, {"adapter": "ext@2", "weight": 50}]
            },
        )
        assert started.status_code == 201, started.text
        digests = {v["ref"]: v["digest"] for v in started.json()["variants"]}
    client = tenant.openai()

    def adapters_of(lines: list[dict]) -> set[str]:
        data = ("\n".join(json.dumps(line) for line in lines) + "\n").encode()
        uploaded = client.files.create(file=("ab.jsonl", data), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = _finished(client, batch.id)
        assert done.status == "completed" and done.request_counts.completed == len(lines)
        ids = [
            json.loads(line)["response"]["request_id"]
            for line in client.files.content(done.output_file_id).text.splitlines()
        ]
        with tenant.http() as http:

            def served() -> dict[str, str] | None:
                rows = http.get("/v1/requests", params={"limit": 500}).json()["data"]
                found = {r["id"]: r["adapter"] for r in rows if r["id"] in ids}
                return found if len(found) == len(ids) else None

            logged = poll_until(served, 30, "every line in the request log")
        return set(logged.values())

    body = {"model": "reader", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    plain = [
        {"custom_id": f"p{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        for i in range(24)
    ]
    assert len(adapters_of(plain)) == 1  # the whole batch on one variant
    users = [
        {**line, "custom_id": f"u{i}", "body": {**body, "user": f"user-{i}"}}
        for i, line in enumerate(plain)
    ]
    assert adapters_of(users) == set(digests.values())  # each user on their own

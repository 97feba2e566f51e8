"""The engine dies: requests get 503 + Retry-After, the supervisor restarts it warm, adapters serve
again."""

from __future__ import annotations

import os
import signal
import statistics
import time

import httpx
import psutil
import pytest

from tests.helpers import assert_openai_error, image_messages, poll_until, upload_folder


@pytest.mark.engine_restart
def test_killed_engine_gives_503_then_recovers_with_adapters(server, new_tenant, make_adapter):
    tenant = new_tenant()
    body = {"model": "survivor", "messages": image_messages(), "max_tokens": 6, "temperature": 0}
    with tenant.http() as http:
        upload_folder(http, "ext", make_adapter(11))
        http.put("/v1/deployments/survivor", json={"adapter": "ext"}).raise_for_status()
        before = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"][
            "content"
        ]

        with server.admin() as admin:
            engine = admin.get("/admin/engine").json()
        children = psutil.Process(engine["pid"]).children(recursive=True)
        os.kill(engine["pid"], signal.SIGKILL)
        time.sleep(0.5)
        down = http.post("/v1/chat/completions", json=body)
        assert_openai_error(down, 503)
        assert down.headers["retry-after"] == "3"
        assert httpx.get(server.url + "/readyz").status_code == 503

        server.wait_ready(timeout=600)
        digest = http.get("/v1/deployments").json()[0]["adapter"]["digest"]
        with server.admin() as admin:  # the deployed adapter is registered again (on its own)
            poll_until(
                lambda: digest in admin.get("/admin/engines").json()["replicas"][0]["adapters"],
                60,
                "the adapter registered on the new engine",
            )
        # the engine was warmed up before it was ready: its first answer is as fast as its answers
        # to the next ten pictures (each new to it: no cache of the engine's helps them)
        first, after = _timed(lambda: http.post("/v1/chat/completions", json=body))
        following = [
            _timed(
                lambda i=i: http.post(
                    "/v1/chat/completions",
                    json=body | {"messages": image_messages(color=(30, 60 + 10 * i, 200))},
                ).raise_for_status()
            )[0]
            for i in range(10)
        ]
    assert after.status_code == 200, after.text
    assert after.json()["choices"][0]["message"]["content"] == before
    assert first <= 2 * statistics.median(following), (first, following)
    with server.admin() as admin:
        assert admin.get("/admin/engine").json()["last_warm_up_s"] > 0
    with server.admin() as admin:
        assert admin.get("/admin/engine").json()["starts"] == engine["starts"] + 1
    # vLLM's engine-core and worker processes of the killed server went with it (their memory is
    # freed)
    assert children and not [
        c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE
    ]


def _timed(call):
    t0 = time.perf_counter()
    result = call()
    return time.perf_counter() - t0, result

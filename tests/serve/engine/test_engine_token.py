"""The engine's bearer token is in its environment (readable by its owner only), never on a
command line that every local user can read, and vLLM enforces it from there."""

from __future__ import annotations

import httpx
import psutil


def test_the_engine_takes_its_token_from_the_environment_and_refuses_requests_without_it(server):
    with server.admin() as admin:
        pid = admin.get("/admin/engine").json()["pid"]
    engine = psutil.Process(pid)
    token = engine.environ()["VLLM_API_KEY"]
    assert token
    for process in [engine, *engine.children(recursive=True)]:  # vLLM's engine core and workers too
        assert not any(token in arg or "api-key" in arg for arg in process.cmdline())
    cmdline = engine.cmdline()
    models = f"http://127.0.0.1:{cmdline[cmdline.index('--port') + 1]}/v1/models"
    assert httpx.get(models).status_code == 401
    assert httpx.get(models, headers={"Authorization": f"Bearer {token}"}).status_code == 200

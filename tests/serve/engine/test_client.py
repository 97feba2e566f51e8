"""What the engine says reaches tenants without the server's paths (messages shaped as vLLM 0.32
writes them)."""

from __future__ import annotations

import json

import httpx
import pytest

from lorafleet.adapters.store import LocalStore
from lorafleet.errors import AdapterLoadFailed
from lorafleet.serve.engine.client import EngineClient, public_engine_message
from lorafleet.serve.metrics import Metrics

DIGEST = "3f2a9c" * 10 + "abcd"
STORE = f"/data/lorafleet/adapters/{DIGEST}"


@pytest.mark.parametrize(
    "message, public",
    [
        # vllm/exceptions.py LoRAAdapterNotFoundError
        (
            f"Loading lora {DIGEST} failed: No adapter found for {STORE}",
            f"Loading lora {DIGEST} failed: No adapter found for <path>",
        ),
        # vllm/lora/lora_model.py, wrapped by the engine core's utility call
        # (vllm/v1/engine/core.py)
        (
            f"Call to add_lora method failed: While loading {STORE}, expected target modules in "
            "['q_proj', 'v_proj'] but received ['model.visual.blocks.0.mlp.up_proj']. "
            "Please verify that the loaded LoRA module is correct",
            "Call to add_lora method failed: While loading <path>, expected target modules in "
            "['q_proj', 'v_proj'] but received ['model.visual.blocks.0.mlp.up_proj']. "
            "Please verify that the loaded LoRA module is correct",
        ),
        (f"{STORE}/ doesn't contain tensors", "<path> doesn't contain tensors"),
        (
            'Traceback (most recent call last):\n  File "/opt/venv/lib/python3.11/'
            'site-packages/vllm/lora/worker_manager.py", line 168, in _load_adapter',
            'Traceback (most recent call last):\n  File "<path>", line 168, in _load_adapter',
        ),
        (
            "The model `/models/Qwen2.5-VL-3B-Instruct` does not exist.",
            "The model `<path>` does not exist.",
        ),
        (
            r"No adapter found for C:\lorafleet\adapters\abc, or file:///etc/passwd",
            "No adapter found for <path>, or <path>",
        ),
    ],
)
def test_engine_messages_lose_their_absolute_paths(message, public):
    assert public_engine_message(message) == public


@pytest.mark.parametrize(
    "message",
    [
        "This model's maximum context length is 512 tokens. However, you requested 600 tokens "
        "(88 in the messages, 512 in the completion). Please reduce the length of the messages "
        "or completion.",
        "Failed to fetch https://example.com/images/cat.png from http://127.0.0.1:8000/v1/models",
        "temperature must be in [0, 2], got 3/4 and/or -1",
    ],
)
def test_messages_without_filesystem_paths_are_unchanged(message):
    assert public_engine_message(message) == message


def test_paths_under_a_private_folder_go_whole_even_with_a_space():
    home = "/srv/lora fleet/home"
    message = f"No adapter found for {home}/adapters/{DIGEST}, retry"
    assert public_engine_message(message, [home]) == "No adapter found for <path>, retry"
    assert "fleet/home" in public_engine_message(message)  # why the gateway names its folders


def test_an_engine_error_is_openai_shaped_with_a_string_code_and_no_paths(tmp_path):
    client = EngineClient(LocalStore(tmp_path / "adapters"), Metrics())
    body = {
        "error": {
            "message": f"While loading {tmp_path}/adapters/x, expected target modules",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    }
    public = json.loads(client.public_error(json.dumps(body).encode(), 400))
    assert public == {
        "error": {
            "message": "While loading <path>, expected target modules",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_request",
        }
    }
    named = {"error": {"message": "m", "type": "NotFoundError", "param": "model", "code": "x"}}
    assert json.loads(client.public_error(json.dumps(named).encode(), 404))["error"] == {
        "message": "m",
        "type": "invalid_request_error",
        "param": "model",
        "code": "x",
    }
    assert json.loads(client.public_error(b"Internal Server Error at /opt/vllm/x.py", 500)) == {
        "error": {
            "message": "Internal Server Error at <path>",
            "type": "server_error",
            "param": None,
            "code": "engine_error",
        }
    }


async def test_a_failed_load_tells_the_tenant_why_without_the_store_path(tmp_path):
    home = tmp_path / "lora fleet"
    store = LocalStore(home / "adapters")
    client = EngineClient(store, Metrics(), private_paths=(home,))
    lora_path = str(store.local_path(DIGEST))

    def vllm(request: httpx.Request) -> httpx.Response:
        """vLLM's answer for an adapter folder that is gone (its `load_lora_adapter` route)."""
        assert json.loads(request.content)["lora_path"] == lora_path
        message = f"Loading lora {DIGEST} failed: No adapter found for {lora_path}"
        return httpx.Response(
            404,
            json={
                "error": {"message": message, "type": "NotFoundError", "param": None, "code": 404}
            },
        )

    client.http = httpx.AsyncClient(base_url=client.url, transport=httpx.MockTransport(vllm))
    client.mark_up()
    with pytest.raises(AdapterLoadFailed) as failed:
        await client.ensure_loaded(DIGEST)
    assert failed.value.status == 503
    assert failed.value.message.endswith("failed: No adapter found for <path>")
    assert str(tmp_path) not in failed.value.message and "lora fleet" not in failed.value.message
    await client.aclose()


async def test_an_evicted_adapter_is_forgotten_unloaded_and_fetched_again(s3_url, tmp_path):
    """An S3 store's cache holds one adapter here: loading the second evicts the first, so the
    engine drops it and the next request fetches and loads it again (the engine never reads a
    folder that is gone)."""
    import asyncio
    import time
    import uuid
    from pathlib import Path

    from lorafleet.adapters.adapter_cache import AdapterCache
    from lorafleet.adapters.s3_store import S3AdapterStore, parse_s3_url
    from tests.factories import WEIGHTS, small_adapter

    a, b = small_adapter(tmp_path / "a", seed=1), small_adapter(tmp_path / "b", seed=2)
    store = S3AdapterStore(
        parse_s3_url(f"{s3_url}/{uuid.uuid4().hex[:8]}"),
        AdapterCache(tmp_path / "cache", max_bytes=a.size_bytes),
    )
    store.put(a), store.put(b)
    calls: list[tuple[str, str]] = []

    def vllm(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        calls.append((request.url.path.rsplit("/", 1)[-1], body["lora_name"]))
        if "lora_path" in body:
            # fetched before the engine reads it
            assert (Path(body["lora_path"]) / WEIGHTS).is_file()
        return httpx.Response(200, text="ok")

    client = EngineClient(store, Metrics())
    client.http = httpx.AsyncClient(base_url=client.url, transport=httpx.MockTransport(vllm))
    client.mark_up()
    await client.ensure_loaded(a.digest)
    await client.ensure_loaded(b.digest)
    deadline = time.monotonic() + 10
    while ("unload_lora_adapter", a.digest) not in calls and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert ("unload_lora_adapter", a.digest) in calls and a.digest not in store.cache
    await client.ensure_loaded(a.digest)
    assert [c for c in calls if c[0] == "load_lora_adapter"] == [
        ("load_lora_adapter", d) for d in (a.digest, b.digest, a.digest)
    ]
    assert a.digest in store.cache and b.digest not in store.cache
    await client.aclose()

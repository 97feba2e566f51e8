"""`lorafleet engine`: an engine node finds adapters by digest in the store itself (the vLLM LoRA
resolver plugin), on the real engine and a real S3 server: nothing is loaded into it by path
beforehand."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lorafleet.adapters.store import open_store
from lorafleet.adapters.validate import ValidatedAdapter, content_digest
from lorafleet.serve.engine.command import free_port

pytestmark = pytest.mark.engine


def _stored(folder: Path, store_url: str, cache: Path) -> str:
    """Put an adapter into the store as an upload does, from another host (its own cache)."""
    digest = content_digest(folder)
    store = open_store(store_url, cache)
    store.put(
        ValidatedAdapter(
            path=folder,
            digest=digest,
            rank=8,
            alpha=16.0,
            target_modules=("q_proj",),
            size_bytes=sum(p.stat().st_size for p in folder.iterdir()),
        )
    )
    return digest


def test_an_engine_node_fetches_an_adapter_by_digest_from_the_store(
    tiny_model, make_adapter, s3_url, tmp_path
):
    store_url = f"{s3_url}/node"
    digest = _stored(make_adapter(3), store_url, tmp_path / "uploader-cache")
    node = tmp_path / "node"
    node.mkdir()
    token, port = secrets.token_urlsafe(12), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    env |= {
        "LORAFLEET_ENGINE_API_KEY": token,
        "LORAFLEET_STORE_URL": store_url,
        "LORAFLEET_HOME": str(node),
        "LORAFLEET_STORE_CACHE_DIR": str(node / "cache"),
        "LORAFLEET_MAX_MODEL_LEN": "512",
        "LORAFLEET_DTYPE": "float32",
        "LORAFLEET_MAX_NUM_SEQS": "4",
        "LORAFLEET_CPU_KVCACHE_GIB": "1",
    }
    # `lorafleet engine` becomes vLLM (exec): one process to stop
    with open(node / "engine.log", "wb") as log:
        engine = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lorafleet.serve.cli",
                "engine",
                "--base",
                str(tiny_model),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    http = httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=120,
    )
    try:
        deadline = time.monotonic() + 600
        while True:
            assert engine.poll() is None, (node / "engine.log").read_text()[-3000:]
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the engine did not start"
            time.sleep(0.5)

        def chat(model: str) -> httpx.Response:
            return http.post(
                "/v1/chat/completions",
                json={
                    "model": model,
                    "max_tokens": 2,
                    "messages": [{"role": "user", "content": "What is it?"}],
                },
            )

        assert digest not in {m["id"] for m in http.get("/v1/models").json()["data"]}
        answered = chat(digest)
        assert answered.status_code == 200, answered.text
        # the node's own verified copy
        assert (node / "cache" / digest / "adapter_model.safetensors").is_file()
        assert digest in {m["id"] for m in http.get("/v1/models").json()["data"]}
        assert chat("0" * 64).status_code == 404  # a digest the store does not have
        assert chat("not-a-digest").status_code == 404  # names are never looked up in the store
        unguarded = httpx.post(
            f"http://127.0.0.1:{port}/v1/load_lora_adapter",
            json={"lora_name": "x", "lora_path": "/etc"},
        )
        assert unguarded.status_code == 401  # the node's admin surface needs the gateways' secret
    finally:
        http.close()
        os.killpg(engine.pid, signal.SIGTERM)
        engine.wait(60)

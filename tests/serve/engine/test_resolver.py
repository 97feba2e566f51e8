"""An engine node finds adapters by digest in the store itself (the vLLM LoRA resolver plugin), on the real engine
and a real S3 server: nothing is loaded into it by path beforehand."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from lorafleet.adapters.store import open_store
from lorafleet.adapters.validate import ValidatedAdapter, content_digest
from lorafleet.serve.engine.command import engine_command, free_port
from lorafleet.serve.engine.hardware import quantization_for
from lorafleet.serve.settings import Settings

pytestmark = pytest.mark.engine


def _stored(folder: Path, store_url: str, cache: Path) -> str:
    """Put an adapter into the store as an upload does, from another host (its own cache)."""
    digest = content_digest(folder)
    store = open_store(store_url, cache)
    store.put(ValidatedAdapter(path=folder, digest=digest, rank=8, alpha=16.0, target_modules=("q_proj",),
                               size_bytes=sum(p.stat().st_size for p in folder.iterdir())))
    return digest


def test_an_engine_node_fetches_an_adapter_by_digest_from_the_store(tiny_model, make_adapter, s3_url, tmp_path):
    store_url = f"{s3_url}/node"
    digest = _stored(make_adapter(3), store_url, tmp_path / "uploader-cache")
    node = tmp_path / "node"
    settings = Settings(base=str(tiny_model), max_model_len=512, dtype="float32", max_lora_rank=16,
                        max_num_seqs=4, cpu_kvcache_gib=1, home=node)
    token, port = secrets.token_urlsafe(12), free_port()
    cmd, env = engine_command(settings, port, token, False, quantization_for(settings)[1])
    env |= {"LORAFLEET_ENGINE_RESOLVER": "1", "LORAFLEET_STORE_URL": store_url, "LORAFLEET_HOME": str(node),
            "LORAFLEET_STORE_CACHE_DIR": str(node / "cache")}
    node.mkdir()
    with open(node / "engine.log", "wb") as log:
        engine = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"},
                        timeout=120)
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
            return http.post("/v1/chat/completions", json={
                "model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "What is it?"}]})

        assert digest not in {m["id"] for m in http.get("/v1/models").json()["data"]}
        answered = chat(digest)
        assert answered.status_code == 200, answered.text
        assert (node / "cache" / digest / "adapter_model.safetensors").is_file()  # the node's own verified copy
        assert digest in {m["id"] for m in http.get("/v1/models").json()["data"]}
        assert chat("0" * 64).status_code == 404  # a digest the store does not have
        assert chat("not-a-digest").status_code == 404  # names are never looked up in the store
    finally:
        http.close()
        os.killpg(engine.pid, signal.SIGTERM)
        engine.wait(60)

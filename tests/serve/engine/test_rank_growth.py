"""A derived max LoRA rank on the real engine: it starts at what the catalog needs and grows, by
a restart, when a deployment brings a higher-rank adapter; both deployments then answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.serve.dev.local_server import LocalServer
from lorafleet.serve.gateway_client import LorafleetClient
from tests.helpers import image_messages


def _engine_cmdline(server: LocalServer) -> list[str]:
    import psutil

    for child in psutil.Process(server.process.pid).children():
        if "vllm.entrypoints.openai.api_server" in " ".join(child.cmdline()):
            return child.cmdline()
    raise AssertionError("the gateway runs no engine")


@pytest.mark.engine
@pytest.mark.training  # builds an untrained tiny model and two random adapters (seconds)
def test_a_higher_rank_deployment_restarts_the_engine_with_that_rank(
    untrained_base: Path, tmp_path: Path
):
    from openai import OpenAI

    from lorafleet.train.random_adapter import make_random_adapter

    base = untrained_base
    low, high = (
        make_random_adapter(base, tmp_path / f"r{rank}", seed=rank, rank=rank) for rank in (8, 32)
    )
    server = LocalServer.start(
        base, tmp_path / "home", max_model_len="512", dtype="float32", drift_replay_s="0"
    )
    try:
        server.wait_ready()
        admin = LorafleetClient(server.url, server.admin_key)
        # nothing deployed
        assert admin.http.get("/admin/engine").json()["sizing"]["max_lora_rank"] == 16
        key = admin.create_tenant("grow")["api_key"]
        tenant = LorafleetClient(server.url, key)
        tenant.push_adapter("low", low)
        tenant.deploy("small", "low")  # rank 8 fits: no restart
        tenant.push_adapter("high", high)
        tenant.deploy("big", "high")
        assert admin.http.get("/admin/engine").json()["sizing"]["max_lora_rank"] == 32
        server.wait_ready()
        engine = admin.http.get("/admin/engine").json()
        cmdline = _engine_cmdline(server)
        chat = OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0).chat.completions
        replies = [
            chat.create(model=name, messages=image_messages(), max_tokens=4, temperature=0)
            for name in ("small", "big")
        ]
    finally:
        server.stop()
    assert engine["starts"] == 2
    assert cmdline[cmdline.index("--max-lora-rank") + 1] == "32"
    assert all(reply.choices[0].message.content is not None for reply in replies)
    log = (tmp_path / "home" / "gateway.log").read_text()
    assert "engine: max_lora_rank 16 (no adapter deployed yet" in log  # printed at start
    assert "engine restarting with a new sizing: max_lora_rank 32 (largest deployed rank 32" in log

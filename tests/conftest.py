"""Session fixtures: the tiny model, real adapters, and one real gateway + vLLM engine for the session."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_RANK = 16
MAX_UPLOAD = 2_000_000


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's LORAFLEET_* settings."""
    for name in list(os.environ):
        if name.startswith("LORAFLEET_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from train.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def make_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory of real PEFT adapters (seeded random LoRA weights), cached per arguments."""
    from train.random_adapter import make_random_adapter

    cache: dict[tuple, Path] = {}

    def make(seed: int, rank: int = 8) -> Path:
        if (seed, rank) not in cache:
            out = tmp_path_factory.mktemp(f"adapter-s{seed}-r{rank}")
            cache[(seed, rank)] = make_random_adapter(tiny_model, out, seed=seed, rank=rank)
        return cache[(seed, rank)]

    return make


@pytest.fixture(scope="session")
def vision_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The common mistake: a plain name list that also hits the vision tower's MLP."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model, dtype=torch.float32)
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    out = tmp_path_factory.mktemp("vision-adapter")
    get_peft_model(model, LoraConfig(r=4, target_modules=names)).save_pretrained(out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    admin_key: str
    home: Path
    process: subprocess.Popen

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=60)

    def stored_digests(self) -> set[str]:
        return {p.name for p in (self.home / "adapters").iterdir() if not p.name.startswith(".")}

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}; see {self.home}/gateway.log")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"gateway not ready after {timeout} s; see {self.home}/gateway.log")


@pytest.fixture(scope="session")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`lorafleet serve` as a real subprocess: gateway + supervised vLLM engine, SQLite, local store."""
    home = tmp_path_factory.mktemp("lorafleet-home")
    port, admin_key = _free_port(), secrets.token_urlsafe(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    env.update(LORAFLEET_HOME=str(home), LORAFLEET_ADMIN_KEY=admin_key, LORAFLEET_PORT=str(port),
               LORAFLEET_MAX_MODEL_LEN="512", LORAFLEET_MAX_NUM_SEQS="16", LORAFLEET_MAX_LORA_RANK=str(MAX_RANK),
               LORAFLEET_MAX_UPLOAD_BYTES=str(MAX_UPLOAD), LORAFLEET_RETRY_AFTER_S="3",
               LORAFLEET_DTYPE="float32")  # as tests/direct_vllm.py: vLLM would downcast "auto" to bf16 on CPU
    log = open(home / "gateway.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "serve.cli", "serve", "--base", str(tiny_model)],
                               env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    srv = Server(url=f"http://127.0.0.1:{port}", admin_key=admin_key, home=home, process=process)
    try:
        srv.wait_ready()
        yield srv
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@dataclass
class TenantHandle:
    name: str
    api_key: str
    url: str

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=120)

    def openai(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=self.api_key, max_retries=0)


@pytest.fixture
def new_tenant(server: Server) -> Callable[[], TenantHandle]:
    """Factory: a fresh tenant with its API key, created through the admin API."""
    def create() -> TenantHandle:
        name = f"t-{uuid.uuid4().hex[:8]}"
        with server.admin() as admin:
            response = admin.post("/admin/tenants", json={"name": name})
        assert response.status_code == 201, response.text
        return TenantHandle(name=name, api_key=response.json()["api_key"], url=server.url)

    return create


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that kill the engine run last, so the rest share one warm engine."""
    items.sort(key=lambda item: item.get_closest_marker("engine_restart") is not None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "engine_restart: kills the shared engine; runs at the end")

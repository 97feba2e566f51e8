"""`lorafleet engine` nodes for the tests that put a gateway, or a pool, in front of real ones:
each a process of its own (it becomes vLLM), killable and restartable on its port, fetching adapters
from an S3 store by digest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from lorafleet.serve.engine.command import free_port

__all__ = ["ENGINE", "EngineNode", "Nodes", "start_nodes", "with_group"]

ENGINE = dict(
    max_model_len="512",
    dtype="float32",
    max_num_seqs="4",
    max_lora_rank="8",
    cpu_kvcache_gib="1",
    max_loras="2",
    quantize="none",
)


class EngineNode:
    """`lorafleet engine` as a process of its own (it becomes vLLM), restartable on its port."""

    def __init__(self, base: Path, home: Path, port: int, env: dict[str, str]) -> None:
        self.base, self.home, self.port, self.env = base, home, port, env
        self.process = self._spawn()

    def _spawn(self) -> subprocess.Popen:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / "engine.log", "ab") as log:
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "lorafleet.serve.cli",
                    "engine",
                    "--base",
                    str(self.base),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        with_group(self.process.pid, signal.SIGKILL)
        self.process.wait(60)

    def restart(self) -> None:
        self.process = self._spawn()

    def stop(self) -> None:
        if self.process.poll() is None:
            with_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                with_group(self.process.pid, signal.SIGKILL)


def with_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


@dataclass(frozen=True)
class Nodes:
    """Engine nodes on one store, by address (`127.0.0.1:PORT`), and the token they take."""

    store_url: str
    token: str
    nodes: dict[str, EngineNode]


def start_nodes(
    base: Path, tmp: pytest.TempPathFactory, store_url: str, token: str, count: int = 2
) -> Nodes:
    """`count` engine nodes on the store at `store_url`, starting."""
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    nodes: dict[str, EngineNode] = {}
    for i in range(count):
        home = tmp.mktemp(f"node-{i}")
        env = (
            base_env
            | {f"LORAFLEET_{k.upper()}": v for k, v in ENGINE.items()}
            | {
                "LORAFLEET_ENGINE_API_KEY": token,
                "LORAFLEET_STORE_URL": store_url,
                "LORAFLEET_HOME": str(home),
                "LORAFLEET_STORE_CACHE_DIR": str(home / "cache"),
            }
        )
        port = free_port()
        nodes[f"127.0.0.1:{port}"] = EngineNode(base, home, port, env)
    return Nodes(store_url, token, nodes)

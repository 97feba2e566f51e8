"""A gateway whose engine fails on every start: it keeps answering, backs off further each time,
and says "crash_loop" in /readyz, /admin/engine and its metrics. No vLLM: `lorafleet serve` runs
for real with an engine python that exits at once, or that does not exist."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from lorafleet.serve.dev.local_server import LocalServer
from tests.helpers import assert_openai_error, image_messages, upload_folder

pytestmark = pytest.mark.training  # builds an (untrained) tiny model for the base and an adapter

T = TypeVar("T")


@pytest.fixture(scope="module")
def base_and_adapter(
    untrained_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """A tiny base with random weights and an adapter for it: the engine never reads them here."""
    from lorafleet.train.random_adapter import make_random_adapter

    return untrained_base, make_random_adapter(
        untrained_base, tmp_path_factory.mktemp("adapter"), seed=3
    )


def _until(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `probe` until it returns something other than None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := probe()) is not None:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _answers(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None


def _failed_start_times(admin: httpx.Client, count: int) -> list[float]:
    """When /admin/engine first showed 1, 2, ... `count` failed starts in a row."""
    seen: dict[int, float] = {}

    def probe() -> bool | None:
        failed = admin.get("/admin/engine").json()["failed_starts"]
        seen.setdefault(failed, time.monotonic())
        return True if failed >= count else None

    _until(probe, 60, f"{count} failed starts")
    return [seen[n] for n in range(1, count + 1)]


def _metric(admin: httpx.Client, line_start: str) -> float:
    text = admin.get("/metrics").text
    return float(
        next(line for line in text.splitlines() if line.startswith(line_start)).split()[-1]
    )


@pytest.mark.parametrize("engine", ["exits at once", "does not exist"])
def test_an_engine_failing_every_start_is_a_visible_crash_loop_and_the_gateway_keeps_answering(
    engine, base_and_adapter, tmp_path
):
    base, adapter = base_and_adapter
    python = tmp_path / "engine-python"
    if engine == "exits at once":
        python.write_text("#!/bin/sh\necho 'no engine here' >&2\nexit 1\n")
        python.chmod(0o755)
    server = LocalServer.start(
        base,
        tmp_path / "home",
        engine_python=str(python),
        quantize="none",
        dtype="float32",
        max_model_len="512",
        retry_after_s="3",
        drift_replay_s="0",
    )
    admin = httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {server.admin_key}"}, timeout=30
    )
    try:
        _until(lambda: _answers(server.url + "/healthz"), 180, "the gateway")
        # 1, 2 then 5 s of back-off between starts
        first, second, third, fourth = _failed_start_times(admin, 4)
        assert 0.8 < second - first < third - second < fourth - third

        ready = httpx.get(server.url + "/readyz")
        assert ready.status_code == 503
        assert ready.json() == {
            "status": "engine starting",
            "engine_up": False,
            "engine_state": "crash_loop",
        }
        status = admin.get("/admin/engine").json()
        assert status["engine_state"] == "crash_loop" and status["up"] is False
        if engine == "exits at once":
            assert status["last_exit_code"] == 1 and status["starts"] >= 4
            assert "exited with 1 during start" in status["last_error"]
            assert "no engine here" in (server.home / "logs" / "engine.log").read_text()
        else:
            assert status["last_exit_code"] is None and status["starts"] == 0
            assert str(python) in status["last_error"]
        assert _metric(admin, 'lorafleet_engine_state{state="crash_loop"}') == 1
        assert _metric(admin, 'lorafleet_engine_state{state="up"}') == 0
        assert _metric(admin, "lorafleet_engine_failed_starts") >= 4
        assert _metric(admin, "lorafleet_engine_up") == 0

        tenant = admin.post("/admin/tenants", json={"name": "patient"}).json()
        with httpx.Client(
            base_url=server.url,
            headers={"Authorization": f"Bearer {tenant['api_key']}"},
            timeout=60,
        ) as http:
            upload_folder(http, "ext", adapter)
            # registered later
            http.put("/v1/deployments/waiting", json={"adapter": "ext"}).raise_for_status()
            chat = http.post(
                "/v1/chat/completions", json={"model": "waiting", "messages": image_messages()}
            )
        assert_openai_error(chat, 503)
        assert (
            chat.json()["error"]["code"] == "engine_unavailable"
            and chat.headers["retry-after"] == "3"
        )
        assert (
            httpx.get(server.url + "/healthz").status_code == 200 and server.process.poll() is None
        )
    finally:
        admin.close()
        server.stop()

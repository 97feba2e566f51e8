"""Drift monitoring on the real engine: validation replay against baselines, input and output drift, sampling."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from lorafleet.chat import image_data_url, load_jsonl
from lorafleet.serve.cli import app
from lorafleet.serve.client import inline_images
from tests.conftest import NEAR_BASE_STD
from tests.helpers import assert_openai_error, upload_folder


@pytest.fixture
def watched(new_tenant, make_adapter, general_val) -> Callable[..., httpx.Client]:
    """A tenant whose deployment `watch` serves a no-op adapter (answers like the base), with a validation set."""
    def create(rank: int = 8) -> httpx.Client:
        http = new_tenant().http()
        upload_folder(http, "m", make_adapter(0, rank, std=NEAR_BASE_STD))
        http.put("/v1/deployments/watch", json={"adapter": "m@1"}).raise_for_status()
        pushed = http.put("/v1/deployments/watch/validation", files={"file": ("v.jsonl", inline_images(general_val))})
        assert pushed.status_code == 200, pushed.text
        return http

    return create


def _traffic(tmp: Path, n: int, seed: int, shift: Callable[[Image.Image], Image.Image] | None = None,
             prompt: str | None = None) -> list[list[dict]]:
    """General-task requests about fresh pictures, optionally shifted (as a drifted client would send them)."""
    from lorafleet.train.shapes import write_task

    requests = []
    for example in load_jsonl(write_task("general", n, tmp / f"traffic-{seed}.jsonl", seed=seed)):
        image = example.images[0].convert("RGB")
        image = shift(image) if shift else image
        text = prompt or example.messages[0]["content"][-1]["text"]
        image_part = {"type": "image_url", "image_url": {"url": image_data_url(image)}}
        requests.append([{"role": "user", "content": [image_part, {"type": "text", "text": text}]}])
    return requests


def _send(http: httpx.Client, requests: list[list[dict]]) -> None:
    def one(messages: list[dict]) -> None:
        response = http.post("/v1/chat/completions", json={"model": "watch", "messages": messages, "max_tokens": 8,
                                                           "temperature": 0})
        assert response.status_code == 200, response.text

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, requests))


def _check(http: httpx.Client) -> list[dict]:
    response = http.post("/v1/deployments/watch/drift/check")
    assert response.status_code == 200, response.text
    return response.json()


def test_replay_records_a_baseline_then_sees_no_change(watched, server):
    http = watched()
    [baseline] = _check(http)
    assert (baseline["kind"], baseline["variant"], baseline["version"]) == ("baseline", "stable", "m@1")
    assert baseline["score"] >= 0.9 and "base=" in baseline["engine"]

    [check] = _check(http)
    assert (check["kind"], check["exact_match_rate"], check["changed"]) == ("check", 1.0, False)
    assert check["numbers"]["test"] == "McNemar exact" and "unchanged" in check["message"]
    metrics = httpx.get(server.metrics_url).text
    assert re.search(r'lorafleet_validation_exact_match_rate\{deployment="watch",tenant="t-\w+",'
                     r'variant="stable"\} 1\.0', metrics)

    env = {"LORAFLEET_URL": server.url, "LORAFLEET_API_KEY": http.headers["authorization"].removeprefix("Bearer ")}
    status = CliRunner().invoke(app, ["drift", "status"], env=env)
    assert status.exit_code == 0 and "watch" in status.output and "1.000" in status.output, status.output


def test_shifted_inputs_trip_input_drift_and_unshifted_ones_do_not(watched, server, tmp_path):
    http = watched()
    _check(http)  # the output baseline
    _send(http, _traffic(tmp_path, 40, seed=11))
    calm = http.post("/v1/deployments/watch/drift/look").json()
    assert calm["input"]["numbers"]["n_window"] == 40 and not calm["input"]["drifted"], calm["input"]["message"]
    assert [o["drifted"] for o in calm["output"]] == [False], calm["output"]

    darker = lambda image: ImageOps.autocontrast(image).point(lambda v: v // 3).resize((96, 64))  # noqa: E731
    _send(http, _traffic(tmp_path, 40, seed=12, shift=darker,
                         prompt="Please look carefully at the picture and tell me: what is in the image?"))
    shifted = http.post("/v1/deployments/watch/drift/look").json()
    assert shifted["input"]["drifted"] and shifted["input"]["q"] < 0.05, shifted["input"]["message"]
    p_values = shifted["input"]["numbers"]["p_values"]
    assert p_values["ks:brightness"] < 1e-6 and p_values["ks:prompt_chars"] < 1e-6

    env = {"LORAFLEET_URL": server.url, "LORAFLEET_API_KEY": http.headers["authorization"].removeprefix("Bearer ")}
    out = tmp_path / "report.html"
    report = CliRunner().invoke(app, ["drift", "report", "watch", "--out", str(out)], env=env)
    assert report.exit_code == 0, report.output
    page = out.read_text()
    assert page.count("data:image/png;base64,") == 3 and "ALARM" in page and "<script" not in page


def test_sampling_keeps_at_most_the_configured_number_and_honours_the_opt_out(watched, server, tmp_path):
    http = watched()
    _send(http, _traffic(tmp_path, 80, seed=13))
    status = http.post("/v1/deployments/watch/drift/look").json()
    assert status["samples"] == 60  # LORAFLEET_DRIFT_MAX_SAMPLES of the test server
    opted = http.put("/v1/drift/sampling", json={"sample_inputs": False}).json()
    assert opted == {"sample_inputs": False, "deleted_samples": 60}
    _send(http, _traffic(tmp_path, 10, seed=14))
    status = http.post("/v1/deployments/watch/drift/look").json()
    assert (status["samples"], status["sample_inputs"]) == (0, False)
    assert_openai_error(http.put("/v1/drift/sampling", json={"sample_inputs": "maybe"}), 400)


def test_drift_commands_need_a_validation_set_and_are_scoped_to_the_tenant(watched, new_tenant, make_adapter):
    http = watched()
    upload_folder(http, "m", make_adapter(0, 4, std=NEAR_BASE_STD))
    http.put("/v1/deployments/bare", json={"adapter": "m@2"}).raise_for_status()
    assert_openai_error(http.post("/v1/deployments/bare/drift/check"), 400, "no validation set")
    with new_tenant().http() as other:
        for method, path in (("POST", "/check"), ("POST", "/look"), ("GET", ""), ("GET", "/history")):
            assert_openai_error(other.request(method, f"/v1/deployments/watch/drift{path}"), 404)
        assert other.get("/v1/drift").json() == []


@pytest.mark.engine_restart
def test_a_changed_adapter_and_a_replaced_base_trip_the_replay(server, watched, make_adapter, tmp_path):
    from lorafleet.train.tiny_model import build_tiny_model

    tampered, steady = watched(8), watched(2)  # two versions, two blobs in the content-addressed store
    for http in (tampered, steady):
        [baseline] = _check(http)
        assert baseline["kind"] == "baseline"

    # the stored weights of tampered's version are overwritten; the engine reloads them after a crash
    digest = tampered.get("/v1/deployments").json()[0]["adapter"]["digest"]
    weights = server.home / "adapters" / digest / "adapter_model.safetensors"
    genuine = weights.read_bytes()
    weights.write_bytes((make_adapter(21) / "adapter_model.safetensors").read_bytes())
    with server.admin() as admin:
        os.kill(admin.get("/admin/engine").json()["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/readyz").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)  # until the supervisor has seen the engine die
    server.wait_ready(timeout=600)
    [changed] = _check(tampered)
    assert changed["changed"] and changed["exact_match_rate"] < 0.5
    assert "adapter or base weights changed on disk" in changed["message"]
    [same] = _check(steady)
    assert not same["changed"]

    original = server.base
    server.base = str(build_tiny_model(tmp_path / "other-base", seed=1))
    try:
        server.restart()
        server.wait_ready(timeout=600)
        [moved] = _check(steady)
        assert moved["changed"] and "the engine changed" in moved["message"] and "other-base" in moved["message"]
        metrics = httpx.get(server.metrics_url).text
        assert re.search(r'lorafleet_validation_exact_match_rate\{deployment="watch",tenant="t-\w+",'
                         r'variant="stable"\} 0\.\d+', metrics)
    finally:  # the store is shared by the session's tests
        weights.write_bytes(genuine)
        server.base = original
        server.restart()
        server.wait_ready(timeout=600)

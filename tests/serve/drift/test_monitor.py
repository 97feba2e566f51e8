"""Drift monitoring on the real engine: validation replay against baselines, input, output and
confidence drift, sampling; and the confidence looks on a real catalog (no engine needed)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageOps
from sqlalchemy import select
from typer.testing import CliRunner

from lorafleet.chat_jsonl import image_data_url, load_jsonl
from lorafleet.serve.cli import app
from lorafleet.serve.drift.report import NOT_ENOUGH
from lorafleet.serve.gateway_client import inline_images
from tests.conftest import NEAR_BASE_STD
from tests.helpers import assert_openai_error, poll_until, upload_folder


@pytest.fixture
def watched(new_tenant, make_adapter, general_val) -> Callable[..., httpx.Client]:
    """A tenant whose deployment `watch` serves a no-op adapter (answers like the base), with a
    validation set."""

    def create(rank: int = 8) -> httpx.Client:
        http = new_tenant().http()
        upload_folder(http, "m", make_adapter(0, rank, std=NEAR_BASE_STD))
        http.put("/v1/deployments/watch", json={"adapter": "m@1"}).raise_for_status()
        pushed = http.put(
            "/v1/deployments/watch/validation",
            files={"file": ("v.jsonl", inline_images(general_val))},
        )
        assert pushed.status_code == 200, pushed.text
        return http

    return create


def _traffic(
    tmp: Path,
    n: int,
    seed: int,
    shift: Callable[[Image.Image], Image.Image] | None = None,
    prompt: str | None = None,
) -> list[list[dict]]:
    """General-task requests about fresh pictures, optionally shifted (as a drifted client would
    send them)."""
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
        response = http.post(
            "/v1/chat/completions",
            json={"model": "watch", "messages": messages, "max_tokens": 8, "temperature": 0},
        )
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
    assert (baseline["kind"], baseline["variant"], baseline["version"]) == (
        "baseline",
        "stable",
        "m@1",
    )
    assert baseline["score"] >= 0.9 and "base=" in baseline["engine"]

    [check] = _check(http)
    assert (check["kind"], check["exact_match_rate"], check["changed"]) == ("check", 1.0, False)
    assert check["numbers"]["test"] == "McNemar exact" and "unchanged" in check["message"]
    metrics = httpx.get(server.metrics_url).text
    assert re.search(
        r'lorafleet_validation_exact_match_rate\{deployment="watch",tenant="t-\w+",'
        r'variant="stable"\} 1\.0',
        metrics,
    )

    env = {
        "LORAFLEET_URL": server.url,
        "LORAFLEET_API_KEY": http.headers["authorization"].removeprefix("Bearer "),
    }
    status = CliRunner().invoke(app, ["drift", "status"], env=env)
    assert status.exit_code == 0 and "watch" in status.output and "1.000" in status.output, (
        status.output
    )


def test_shifted_inputs_trip_input_drift_and_unshifted_ones_do_not(watched, server, tmp_path):
    http = watched()
    _check(http)  # the output baseline
    _send(http, _traffic(tmp_path, 40, seed=11))
    calm = http.post("/v1/deployments/watch/drift/look").json()
    assert calm["input"]["numbers"]["n_window"] == 40 and not calm["input"]["drifted"], calm[
        "input"
    ]["message"]
    assert [o["drifted"] for o in calm["output"]] == [False], calm["output"]
    # the replay and the live answers both recorded their log-probabilities
    [confidence] = calm["confidence"]
    assert not confidence["drifted"] and confidence["numbers"]["n"] == 40, confidence["message"]
    assert (
        confidence["numbers"]["n_baseline"] == 40
        and confidence["numbers"]["baseline_confidence_mean"] <= 0
    )

    def answered() -> list[dict] | None:  # the request log is written about once a second
        [timeline] = http.get("/v1/deployments/watch/drift", params={"buckets": 2}).json()[
            "feedback"
        ]
        return (
            timeline["periods"] if sum(p["requests"] for p in timeline["periods"]) == 40 else None
        )

    periods = poll_until(answered, 15, "the 40 answered requests in the feedback timeline")
    assert len(periods) == 2 and all(p["feedback"] == 0 and p["mean"] is None for p in periods)
    assert_openai_error(http.get("/v1/deployments/watch/drift", params={"bucket_s": 1}), 400)

    darker = lambda image: ImageOps.autocontrast(image).point(lambda v: v // 3).resize((96, 64))  # noqa: E731
    _send(
        http,
        _traffic(
            tmp_path,
            40,
            seed=12,
            shift=darker,
            prompt="Please look carefully at the picture and tell me: what is in the image?",
        ),
    )
    shifted = http.post("/v1/deployments/watch/drift/look").json()
    assert shifted["input"]["drifted"] and shifted["input"]["q"] < 0.05, shifted["input"]["message"]
    p_values = shifted["input"]["numbers"]["p_values"]
    assert p_values["ks:brightness"] < 1e-6 and p_values["ks:prompt_chars"] < 1e-6

    env = {
        "LORAFLEET_URL": server.url,
        "LORAFLEET_API_KEY": http.headers["authorization"].removeprefix("Bearer "),
    }
    out = tmp_path / "report.html"
    report = CliRunner().invoke(app, ["drift", "report", "watch", "--out", str(out)], env=env)
    assert report.exit_code == 0, report.output
    page = out.read_text()
    assert "ALARM" in page and "<script" not in page
    # input, output and confidence have two looks each: charts; the replay ran once: a sentence
    assert page.count("data:image/png;base64,") == 3 and page.count(NOT_ENOUGH) == 1
    assert "Output confidence" in page  # no feedback yet: no feedback plot


def test_sampling_keeps_at_most_the_configured_number_and_honours_the_opt_out(
    watched, server, tmp_path
):
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


def test_drift_commands_need_a_validation_set_and_are_scoped_to_the_tenant(
    watched, new_tenant, make_adapter
):
    http = watched()
    upload_folder(http, "m", make_adapter(0, 4, std=NEAR_BASE_STD))
    http.put("/v1/deployments/bare", json={"adapter": "m@2"}).raise_for_status()
    assert_openai_error(http.post("/v1/deployments/bare/drift/check"), 400, "no validation set")
    with new_tenant().http() as other:
        for method, path in (
            ("POST", "/check"),
            ("POST", "/look"),
            ("GET", ""),
            ("GET", "/history"),
        ):
            assert_openai_error(other.request(method, f"/v1/deployments/watch/drift{path}"), 404)
        assert other.get("/v1/drift").json() == []


@pytest.mark.engine_restart
def test_a_changed_adapter_and_a_replaced_base_trip_the_replay(
    server, watched, make_adapter, tmp_path
):
    from lorafleet.train.tiny_model import build_tiny_model

    # two versions, two blobs in the content-addressed store
    tampered, steady = watched(8), watched(2)
    for http in (tampered, steady):
        [baseline] = _check(http)
        assert baseline["kind"] == "baseline"

    # the stored weights of tampered's version are overwritten; the engine reloads them after a
    # crash
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
        assert (
            moved["changed"]
            and "the engine changed" in moved["message"]
            and "other-base" in moved["message"]
        )
        metrics = httpx.get(server.metrics_url).text
        assert re.search(
            r'lorafleet_validation_exact_match_rate\{deployment="watch",tenant="t-\w+",'
            r'variant="stable"\} 0\.\d+',
            metrics,
        )
    finally:  # the store is shared by the session's tests
        weights.write_bytes(genuine)
        server.base = original
        server.restart()
        server.wait_ready(timeout=600)


# --- confidence looks on a real catalog: the monitor's own looks over hand-made samples, no engine
# ---

ITEMS = 30  # validation items, and so baseline confidences


def _world(catalog_url: str, baseline_confidences: list[float | None] | None):
    """A deployment `d` of tenant `acme` serving m@1, a validation set of ITEMS text questions,
    and its baseline replay with `baseline_confidences`; the monitor over it, with its real
    collaborators."""
    from lorafleet.adapters.catalog import (
        Adapter,
        AdapterVersion,
        Deployment,
        Tenant,
        ValidationRun,
        ValidationSet,
        open_catalog,
    )
    from lorafleet.adapters.store import BlobStore, LocalStore
    from lorafleet.serve.drift.monitor import DriftMonitor
    from lorafleet.serve.engine.client import EngineClient
    from lorafleet.serve.metrics import Metrics
    from lorafleet.serve.settings import Settings

    _, sessions = open_catalog(catalog_url)
    store, metrics = LocalStore(Path(tempfile.mkdtemp())), Metrics()
    validation_store = BlobStore(store.root / "validation", ".jsonl")
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"What is {i} plus {i}?"},
                    {"role": "assistant", "content": str(2 * i)},
                ]
            }
        )
        for i in range(ITEMS)
    ]
    digest = validation_store.put(("\n".join(lines) + "\n").encode())
    with sessions() as session:
        tenant = Tenant(name="acme", key_hash="k")
        session.add(tenant)
        session.flush()
        version = AdapterVersion(
            adapter=Adapter(tenant_id=tenant.id, name="m"),
            version=1,
            digest="1" * 64,
            rank=8,
            alpha=16,
            target_modules=["q_proj"],
            size_bytes=1,
        )
        validation = ValidationSet(
            tenant_id=tenant.id, digest=digest, metric="exact_match", items=ITEMS, size_bytes=1
        )
        deployment = Deployment(
            tenant_id=tenant.id, name="d", stable=version, validation_set=validation
        )
        session.add(deployment)
        session.flush()
        session.add(
            ValidationRun(
                deployment_id=deployment.id,
                version_id=version.id,
                validation_set_id=validation.id,
                variant="stable",
                kind="baseline",
                at=time.time(),
                engine="e",
                score=1.0,
                scores=[1.0] * ITEMS,
                outputs=[str(2 * i) for i in range(ITEMS)],
                output_tokens=[2] * ITEMS,
                confidences=baseline_confidences,
                exact_match_rate=1.0,
            )
        )
        session.commit()
        ids = deployment.id, version.id
    monitor = DriftMonitor(
        sessions,
        EngineClient(store, metrics),
        validation_store,
        metrics,
        Settings(base="x"),
        "none",
    )
    return monitor, sessions, ids


def _sampled(sessions, deployment_id: int, confidences: list[float]) -> None:
    """Answered live requests like the validation set's, one per confidence (as
    `DriftMonitor.keep` stores them)."""
    from lorafleet.adapters.catalog import InputSample
    from lorafleet.serve.drift.statistics import request_features

    with sessions() as session:
        session.add_all(
            InputSample(
                deployment_id=deployment_id,
                variant="stable",
                at=time.time(),
                ok=True,
                features=request_features([{"role": "user", "content": f"What is {i} plus {i}?"}]),
                output_tokens=2,
                empty=False,
                format_valid=None,
                confidence=c,
            )
            for i, c in enumerate(confidences)
        )
        session.commit()


def _logprobs(seed: int, n: int, mean: float, sd: float = 0.1) -> list[float]:
    rng = random.Random(seed)
    return [min(0.0, rng.gauss(mean, sd)) for _ in range(n)]


def _gauge(monitor, name: str) -> float | None:
    return monitor.metrics.registry.get_sample_value(
        name, {"tenant": "acme", "deployment": "d", "variant": "stable"}
    )


def test_answers_clearly_less_sure_than_the_baseline_trip_the_confidence_look(catalog_url):
    from lorafleet.adapters.catalog import DriftCheck

    monitor, sessions, (deployment_id, version_id) = _world(catalog_url, _logprobs(1, ITEMS, -0.3))
    # an older series of another kind: the confidence looks are numbered apart
    with sessions() as session:
        session.add(
            DriftCheck(
                deployment_id=deployment_id,
                version_id=version_id,
                variant="stable",
                kind="output",
                at=time.time(),
                look=7,
                p=0.5,
                q=0.5,
                drifted=False,
            )
        )
        session.commit()
    _sampled(sessions, deployment_id, _logprobs(2, 40, -1.2, 0.2))
    checks = {c.kind: c for c in monitor.look(only=deployment_id)}
    assert set(checks) == {"input", "output", "confidence"}
    low = checks["confidence"]
    assert (low.drifted, low.look, low.variant, low.version_id) == (True, 1, "stable", version_id)
    assert (
        low.p < 1e-10
        and low.q < 0.05
        and not checks["output"].drifted
        and checks["output"].look == 8
    )
    n = low.numbers
    assert (n["n"], n["n_baseline"]) == (40, ITEMS)
    assert (
        n["shift"] == pytest.approx(n["confidence_mean"] - n["baseline_confidence_mean"])
        and n["shift"] < -0.7
    )
    assert (
        low.message.startswith("DRIFT confidence of stable") and "lower (less sure)" in low.message
    )
    assert _gauge(monitor, "lorafleet_confidence_drift_alarm") == 1.0
    assert _gauge(monitor, "lorafleet_confidence_drift_pvalue") == pytest.approx(low.p)
    assert _gauge(monitor, "lorafleet_output_confidence_mean") == pytest.approx(
        low.numbers["confidence_mean"]
    )

    _sampled(sessions, deployment_id, _logprobs(3, 40, -1.2, 0.2))
    [again] = [c for c in monitor.look(only=deployment_id) if c.kind == "confidence"]
    assert again.look == 2 and again.drifted  # its own series: the second look spends less alpha


def test_answers_as_sure_as_the_baseline_keep_the_confidence_look_quiet(catalog_url):
    monitor, sessions, (deployment_id, _) = _world(catalog_url, _logprobs(1, ITEMS, -0.3))
    _sampled(sessions, deployment_id, _logprobs(4, 40, -0.3))
    [calm] = [c for c in monitor.look(only=deployment_id) if c.kind == "confidence"]
    assert (
        not calm.drifted
        and calm.p > 0.05
        and calm.message.startswith("no drift: confidence of stable")
    )
    assert abs(calm.numbers["shift"]) < 0.1
    assert _gauge(monitor, "lorafleet_confidence_drift_alarm") == 0.0


@pytest.mark.parametrize(
    "recorded", [None, [None] * ITEMS], ids=["before-confidences", "engine-gave-none"]
)
def test_a_baseline_without_confidences_gives_no_confidence_look(catalog_url, recorded):
    monitor, sessions, (deployment_id, _) = _world(catalog_url, recorded)
    _sampled(sessions, deployment_id, _logprobs(2, 40, -1.2))
    assert {c.kind for c in monitor.look(only=deployment_id)} == {"input", "output"}
    assert _gauge(monitor, "lorafleet_confidence_drift_pvalue") is None


def test_too_few_live_confidences_give_no_confidence_look(catalog_url):
    from lorafleet.serve.drift.monitor import MIN_OUTPUT_SAMPLES

    monitor, sessions, (deployment_id, _) = _world(catalog_url, _logprobs(1, ITEMS, -0.3))
    _sampled(sessions, deployment_id, _logprobs(2, MIN_OUTPUT_SAMPLES - 1, -1.2))
    _sampled(sessions, deployment_id, [None] * 10)  # answered, the engine gave no log-probabilities
    assert "confidence" not in {c.kind for c in monitor.look(only=deployment_id)}


def test_a_replay_records_each_items_confidence_on_its_run(catalog_url):
    from lorafleet.adapters.catalog import ValidationRun
    from lorafleet.serve.drift.monitor import _Replayed
    from lorafleet.serve.validation import Replay

    monitor, sessions, (deployment_id, version_id) = _world(catalog_url, None)
    replay = Replay("1" * 64, ["2", "4"], [2, 2], [1.0, 0.0], [-0.25, None])
    replayed = _Replayed(
        deployment_id, "stable", version_id, replay, None, None, "e", time.time() - 3
    )
    run = monitor._record_run(replayed)
    with sessions() as session:
        assert session.get_one(ValidationRun, run.id).confidences == [-0.25, None]


async def test_a_replay_records_when_it_started_and_when_it_ended(catalog_url, monkeypatch):
    """`started_at` is taken before the replay (what the schedule claims by), `at` once it is
    scored."""
    import asyncio

    from lorafleet.adapters.catalog import ValidationRun
    from lorafleet.serve.drift import monitor as monitor_module
    from lorafleet.serve.validation import Replay

    monitor, sessions, (deployment_id, _) = _world(catalog_url, None)
    replay_s = 0.3

    # the engine's part, timed
    async def slow_replay(
        engines, digest, items, metric, max_tokens, answer_format, tenant
    ) -> Replay:
        await asyncio.sleep(replay_s)
        return Replay(
            digest,
            [str(2 * i) for i in range(len(items))],
            [2] * len(items),
            [1.0] * len(items),
            [None] * len(items),
        )

    async def identity() -> str:
        return "e"

    monkeypatch.setattr(monitor_module, "replay_and_score", slow_replay)
    monkeypatch.setattr(monitor, "identity", identity)
    before = time.time()
    [run] = await monitor.replay_deployment(deployment_id)
    assert run.kind == "check" and before <= run.started_at <= run.at - replay_s
    with sessions() as session:
        assert session.get_one(ValidationRun, run.id).started_at == run.started_at
        baseline = session.scalar(select(ValidationRun).where(ValidationRun.kind == "baseline"))
        assert baseline.started_at is None  # written without one, as before revision 0004

"""Canary rollouts and A/B tests on the real engine: gate, live analysis, routing, commands,
restart."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lorafleet.serve.cli import app
from lorafleet.serve.gateway_client import inline_images
from tests.conftest import NEAR_BASE_STD
from tests.helpers import assert_openai_error, upload_folder

FORMAT = {"regex": "a (red|green|blue|yellow) (circle|square|triangle)"}


@pytest.fixture
def shapes(new_tenant, make_adapter, general_val) -> Callable[..., httpx.Client]:
    """A tenant whose deployment `shapes` serves m@1 (= the base); m@2 answers the same (another
    rank of a no-op adapter: equal quality, different digest); m@3 is a random adapter that
    breaks every answer."""

    def create(validation: bool = True, answer_format: bool = True) -> httpx.Client:
        http = new_tenant().http()
        for folder in (
            make_adapter(0, 8, std=NEAR_BASE_STD),
            make_adapter(0, 4, std=NEAR_BASE_STD),
            make_adapter(21),
        ):
            upload_folder(http, "m", folder)
        http.put("/v1/deployments/shapes", json={"adapter": "m@1"}).raise_for_status()
        if validation:
            pushed = http.put(
                "/v1/deployments/shapes/validation",
                files={"file": ("v.jsonl", inline_images(general_val))},
            )
            assert pushed.status_code == 200, pushed.text
        if answer_format:
            http.put("/v1/deployments/shapes/answer-format", json=FORMAT).raise_for_status()
        return http

    return create


def _chat(
    http: httpx.Client, messages: list[dict], user: str | None = None, max_tokens: int = 8
) -> httpx.Response:
    body = {"model": "shapes", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    if user:
        body["user"] = user
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response


def _variants(
    http: httpx.Client, requests: list[list[dict]], users: list[str], max_tokens: int = 1
) -> dict[str, str]:
    """user -> the variant that served them, 8 requests at a time."""
    with ThreadPoolExecutor(8) as pool:
        responses = pool.map(
            lambda i: _chat(http, requests[i % len(requests)], users[i], max_tokens),
            range(len(users)),
        )
        return {user: r.headers["x-lorafleet-variant"] for user, r in zip(users, responses)}


def _wait(
    http: httpx.Client,
    done: Callable[[dict], bool],
    timeout: float = 120,
    traffic: Callable[[], None] | None = None,
) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        rollout = http.get("/v1/deployments/shapes/rollout").json()
        if done(rollout):
            return rollout
        if traffic:
            traffic()
        else:
            time.sleep(0.5)
    raise AssertionError(
        f"rollout did not get there in {timeout} s: {rollout['phase']} {rollout['message']}"
    )


def _command(http: httpx.Client, action: str, body: dict | None = None) -> dict:
    """pause/resume/abort/promote; a refusal shows the rollout's phase and its last decisions."""
    response = http.post(f"/v1/deployments/shapes/rollout/{action}", json=body)
    if response.status_code != 200:
        rollout = http.get("/v1/deployments/shapes/rollout").json()
        raise AssertionError(
            f"{action}: {response.status_code} {response.text}; rollout {rollout['phase']}, "
            f"decisions {[(d['action'], d['reason'], d['message']) for d in rollout['decisions']]}"
        )
    return response.json()


def _start(http: httpx.Client, **params) -> dict:
    response = http.post(
        "/v1/deployments/shapes/rollout", json={"to": "m@2", "gate": False, **params}
    )
    assert response.status_code == 202, response.text
    return response.json()


def test_gate_refuses_a_worse_adapter_and_admits_an_equal_one(shapes):
    http = shapes()
    _start(http, to="m@3", gate=True)
    seen: list[dict | None] = []
    refused = _wait(http, lambda r: seen.append(r["gate_progress"]) or r["phase"] != "Gating")
    # while it ran, the gate said how far it was: each version answers each of the 40 items
    progress = [p for p in seen if p is not None]
    assert progress and all(0 <= p["answered"] <= p["total"] == 80 for p in progress), seen
    assert refused["gate_progress"] is None
    assert refused["phase"] == "GateRefused" and refused["reason"] == "ValidationRegressed", (
        refused["message"]
    )
    gate = refused["gate"]
    assert gate["items"] == 40 and len(gate["candidate_scores"]) == 40
    assert gate["measurement"]["test"] == "McNemar exact" and gate["measurement"]["p"] < 0.001
    # the base knows this task
    assert sum(gate["stable_scores"]) >= 30 > sum(gate["candidate_scores"])
    assert http.get("/v1/deployments").json()[0]["adapter"]["version"] == 1  # nothing changed

    _start(http, to="m@2", gate=True, interval_s=3600)
    admitted = _wait(http, lambda r: r["phase"] != "Gating")
    assert admitted["phase"] == "Progressing" and admitted["reason"] == "ValidationNonInferior"
    # the same answers on every item
    assert admitted["gate"]["measurement"]["interval"] == [0.0, 0.0]
    assert [v["weight"] for v in admitted["variants"]] == [10, 90]
    assert _command(http, "abort")["phase"] == "Aborted"


def test_bad_canary_is_rolled_back_automatically(shapes, general_requests, server):
    http = shapes(validation=False)
    _start(http, to="m@3", steps=[10, 50], min_requests=100, interval_s=3600)
    sent = iter(range(10**6))

    def traffic() -> None:
        _variants(http, general_requests, [f"u{next(sent)}" for _ in range(40)], max_tokens=8)

    rolled_back = _wait(http, lambda r: r["phase"] == "RolledBack", timeout=180, traffic=traffic)
    decision = rolled_back["decisions"][-1]
    assert (decision["action"], decision["reason"]) == ("rollback", "FormatValidityRegressed")
    assert decision["actor"].startswith("controller:")
    test = next(n for n in decision["numbers"] if n["metric"] == "format_validity")
    assert test["status"] == "failed" and test["p"] < test["alpha"] and test["effect"] > 0.5
    assert test["n_candidate"] <= 200
    # traffic is back on stable at once
    assert set(_variants(http, general_requests, [f"after{i}" for i in range(16)]).values()) == {
        "stable"
    }
    time.sleep(1.5)  # the next controller tick exports the decision
    metrics = httpx.get(server.metrics_url).text
    assert re.search(
        r'lorafleet_rollout_phase\{deployment="shapes",phase="RolledBack",tenant="t-\w+"\} 1\.0',
        metrics,
    )
    assert re.search(
        r'lorafleet_rollout_decisions_total\{action="rollback",deployment="shapes",'
        r'reason="FormatValidityRegressed",tenant="t-\w+"\} 1\.0',
        metrics,
    )


def test_weights_are_sticky_monotone_and_observed(shapes, general_requests, server):
    http = shapes(validation=False, answer_format=False)
    _start(http, steps=[25, 50], min_requests=10**6, interval_s=3600)
    users = [f"user-{i}" for i in range(300)]
    first = _variants(http, general_requests, users)
    canary = {u for u, v in first.items() if v == "canary"}
    assert abs(len(canary) - 75) <= 30  # 25 % of 300, +-4 standard deviations
    # sticky
    assert _variants(http, general_requests, users[:60]) == {u: first[u] for u in users[:60]}

    promoted = _command(http, "promote", {})
    assert [v["weight"] for v in promoted["variants"]] == [50, 50]
    second = _variants(http, general_requests, users)
    assert all(second[u] == "canary" for u in canary)  # nobody goes back to stable
    assert abs(sum(v == "canary" for v in second.values()) - 150) <= 35

    response = _chat(http, general_requests[0], "user-0")
    assert response.headers["x-lorafleet-adapter"] in {v["digest"] for v in promoted["variants"]}
    metrics = httpx.get(server.metrics_url).text
    assert 'variant="canary"' in metrics

    _command(http, "abort")
    assert set(_variants(http, general_requests, users[:40]).values()) == {"stable"}


def test_promote_full_then_undo_and_redo(shapes, general_requests):
    http = shapes(validation=False)
    _start(http, interval_s=3600)
    promoted = _command(http, "promote", {"full": True})
    assert (
        promoted["phase"] == "Promoted" and promoted["decisions"][-1]["reason"] == "ManualPromote"
    )
    deployment = http.get("/v1/deployments").json()[0]
    assert (deployment["adapter"]["version"], deployment["previous_adapter"]) == (2, "m@1")
    assert _chat(http, general_requests[0]).headers["x-lorafleet-variant"] == "stable"

    undone = http.post("/v1/deployments/shapes/undo").json()
    assert (undone["adapter"]["version"], undone["previous_adapter"]) == (1, "m@2")
    assert (
        http.get("/v1/deployments/shapes/rollout").json()["decisions"][-1]["reason"]
        == "UndoToPreviousStable"
    )
    redone = http.post("/v1/deployments/shapes/undo").json()
    assert redone["adapter"]["version"] == 2


def test_pause_holds_and_resume_continues(shapes):
    http = shapes(validation=False)
    _start(http, interval_s=3600)
    paused = _command(http, "pause")
    assert paused["phase"] == "Paused"
    assert_openai_error(http.post("/v1/deployments/shapes/rollout/pause"), 409, "Paused")
    assert _command(http, "resume")["phase"] == "Progressing"
    assert _command(http, "abort")["phase"] == "Aborted"
    assert [
        d["action"] for d in http.get("/v1/deployments/shapes/rollout").json()["decisions"]
    ] == ["start", "gate", "pause", "resume", "abort"]


def test_bad_rollout_commands_get_clear_errors(shapes):
    http = shapes(validation=False)
    assert_openai_error(
        http.post("/v1/deployments/shapes/rollout", json={"to": "m@99"}), 404, "no version 99"
    )
    assert_openai_error(
        http.post("/v1/deployments/shapes/rollout", json={"to": "m@2"}), 400, "no validation set"
    )
    assert_openai_error(
        http.post("/v1/deployments/shapes/rollout", json={"to": "m@1", "gate": False}),
        400,
        "already the stable",
    )
    assert_openai_error(
        http.post("/v1/deployments/shapes/rollout", json={"to": "m@2", "steps": [50, 10]}),
        400,
        "increasing",
    )
    assert_openai_error(http.post("/v1/deployments/shapes/rollout/pause"), 409, "no canary rollout")
    assert_openai_error(http.post("/v1/deployments/shapes/undo"), 409, "no previous stable")
    ab = {"variants": [{"adapter": "m@1", "weight": 50}, {"adapter": "m@2", "weight": 40}]}
    assert_openai_error(http.post("/v1/deployments/shapes/ab", json=ab), 400, "sum to 100")
    assert_openai_error(
        http.put("/v1/deployments/shapes/answer-format", json={"regex": "("}), 400, "invalid regex"
    )
    assert_openai_error(
        http.put("/v1/deployments/shapes/answer-format", json={"json_schema": {"type": 5}}),
        400,
        "invalid JSON schema",
    )

    _start(http, interval_s=3600)
    assert_openai_error(
        http.post("/v1/deployments/shapes/rollout", json={"to": "m@3", "gate": False}),
        409,
        "already running",
    )
    assert_openai_error(
        http.post(
            "/v1/deployments/shapes/ab",
            json={"variants": [{"adapter": "m@1", "weight": 50}, {"adapter": "m@2", "weight": 50}]},
        ),
        409,
        "already running",
    )
    assert_openai_error(
        http.put("/v1/deployments/shapes", json={"adapter": "m@3"}), 409, "abort or stop it first"
    )
    assert_openai_error(http.delete("/v1/adapters/m/versions/2"), 409, "deployed by shapes")


def test_bad_validation_file_is_refused_and_nothing_stored(shapes, server):
    http = shapes(validation=False)
    before = set((server.home / "validation").glob("*"))
    bad = b'{"messages": [{"role": "user", "content": "hi"}]}\n'
    error = assert_openai_error(
        http.put("/v1/deployments/shapes/validation", files={"file": ("v.jsonl", bad)}),
        400,
        "v.jsonl:1: the last message must be the assistant's answer",
    )
    assert error["code"] == "invalid_data"
    assert_openai_error(
        http.put(
            "/v1/deployments/shapes/validation",
            files={"file": ("v.jsonl", b"{}")},
            data={"metric": "bleu"},
        ),
        400,
        "unknown metric",
    )
    assert set((server.home / "validation").glob("*")) == before
    assert_openai_error(http.get("/v1/deployments/shapes/validation"), 404)


def test_every_rollout_operation_on_another_tenants_deployment_is_not_found(shapes, new_tenant):
    shapes(validation=False)
    with new_tenant().http() as other:
        calls = [
            ("POST", "/rollout", {"to": "m@2"}),
            ("GET", "/rollout", None),
            ("POST", "/rollout/pause", None),
            ("POST", "/rollout/resume", None),
            ("POST", "/rollout/abort", None),
            ("POST", "/rollout/promote", {}),
            ("POST", "/undo", None),
            ("POST", "/ab", {"variants": [{"adapter": "m@1", "weight": 100}]}),
            ("GET", "/ab", None),
            ("POST", "/ab/stop", {}),
            ("POST", "/ab/evaluate", None),
            ("GET", "/validation", None),
            ("PUT", "/answer-format", {}),
        ]
        for method, path, body in calls:
            response = other.request(method, f"/v1/deployments/shapes{path}", json=body)
            assert_openai_error(response, 404)
        assert other.get("/v1/rollouts").json() == []


def test_ab_test_reports_differences_and_keeps_the_winner(shapes, general_requests):
    http = shapes()
    started = http.post(
        "/v1/deployments/shapes/ab",
        json={
            "variants": [
                {"adapter": "m@1", "weight": 50},
                {"adapter": "m@2", "weight": 30},
                {"adapter": "m@3", "weight": 20},
            ]
        },
    )
    assert started.status_code == 201, started.text
    served = _variants(http, general_requests, [f"ab-{i}" for i in range(150)], max_tokens=8)
    assert set(served.values()) == {"m@1", "m@2", "m@3"}

    time.sleep(1.5)  # the controller flushes request samples every tick
    status = http.get("/v1/deployments/shapes/ab").json()
    by_variant = {v["variant"]: v for v in status["variants"]}
    assert sum(v["requests"] for v in by_variant.values()) == 150
    assert by_variant["m@1"]["format_validity"] > 0.8 > by_variant["m@3"]["format_validity"]
    worse = next(c for c in status["comparisons"] if c["variant"] == "m@3")
    low, high = worse["format_validity"]["interval"]
    assert high < 0 and worse["against"] == "m@1"  # clearly worse, with an interval that says so

    scores = http.post("/v1/deployments/shapes/ab/evaluate").json()
    assert scores["scores"]["m@1"] == scores["scores"]["m@2"] > scores["scores"]["m@3"]
    verdicts = {d["variant"]: (d["verdict"], d["interval"]) for d in scores["differences"]}
    assert verdicts["m@2"] == ("no difference shown", [0.0, 0.0])
    assert verdicts["m@3"][0] == "worse" and verdicts["m@3"][1][1] < 0

    stopped = http.post("/v1/deployments/shapes/ab/stop", json={"keep": "m@2"}).json()
    assert stopped["phase"] == "Stopped"
    assert http.get("/v1/deployments").json()[0]["adapter"]["version"] == 2
    assert set(_variants(http, general_requests, [f"ab-{i}" for i in range(10)]).values()) == {
        "stable"
    }


@pytest.mark.engine_restart
def test_restarted_gateway_resumes_the_rollout_where_it_was(server, shapes, general_requests):
    http = shapes(validation=False)
    _start(http, steps=[20, 50], min_requests=10**6, interval_s=3600)
    _command(http, "promote", {})
    users = [f"r{i}" for i in range(40)]
    before = _variants(http, general_requests, users)
    owner = _wait(http, lambda r: r["lease_owner"] is not None)["lease_owner"]

    server.restart()
    server.wait_ready()
    after = http.get("/v1/deployments/shapes/rollout").json()
    assert (after["phase"], after["step_index"]) == ("Progressing", 1)
    assert _variants(http, general_requests, users) == before  # same salt, same buckets
    resumed = _wait(http, lambda r: r["lease_owner"] not in (None, owner))
    assert resumed["step_index"] == 1
    assert _command(http, "promote", {"full": True})["phase"] == "Promoted"


def test_cli_drives_a_rollout_and_reports_the_gate(shapes, server, general_val):
    from typer.testing import CliRunner

    http = shapes(validation=False)
    runner = CliRunner()
    env = {
        "LORAFLEET_URL": server.url,
        "LORAFLEET_API_KEY": http.headers["authorization"].removeprefix("Bearer "),
    }
    pushed = runner.invoke(app, ["validation", "push", "shapes", str(general_val)], env=env)
    assert pushed.exit_code == 0 and "40 items, metric exact_match" in pushed.output, pushed.output
    refused = runner.invoke(app, ["rollout", "start", "shapes", "--to", "m@3"], env=env)
    assert (
        refused.exit_code == 1
        and "GateRefused" in refused.output
        and "ValidationRegressed" in refused.output
    )
    bad = runner.invoke(
        app, ["rollout", "start", "shapes", "--to", "m@2", "--interval", "soon"], env=env
    )
    assert bad.exit_code == 2 and "not a duration" in bad.output
    started = runner.invoke(
        app,
        [
            "rollout",
            "start",
            "shapes",
            "--to",
            "m@2",
            "--no-gate",
            "--steps",
            "20,50",
            "--interval",
            "1h",
        ],
        env=env,
    )
    assert (
        started.exit_code == 0
        and "Progressing" in started.output
        and "GateSkipped" in started.output
    )
    listed = runner.invoke(app, ["rollout", "status"], env=env)
    assert listed.exit_code == 0 and "shapes" in listed.output and "Progressing" in listed.output
    again = runner.invoke(app, ["rollout", "start", "shapes", "--to", "m@3", "--no-gate"], env=env)
    assert again.exit_code == 1 and "already running" in again.output
    aborted = runner.invoke(app, ["rollout", "abort", "shapes"], env=env)
    assert aborted.exit_code == 0 and "Aborted" in aborted.output
    assert http.get("/v1/deployments").json()[0]["adapter"]["version"] == 1


def test_an_enforced_format_makes_every_variant_valid_and_is_still_measured(
    shapes, general_requests
):
    """The A/B test of the test above, with the deployment's format enforced: the adapter that
    broke every answer's format now answers in it too."""
    http = shapes()
    http.put(
        "/v1/deployments/shapes/answer-format", json={**FORMAT, "enforce": True}
    ).raise_for_status()
    started = http.post(
        "/v1/deployments/shapes/ab",
        json={"variants": [{"adapter": "m@1", "weight": 50}, {"adapter": "m@3", "weight": 50}]},
    )
    assert started.status_code == 201, started.text
    served = _variants(http, general_requests, [f"enf-{i}" for i in range(80)], max_tokens=12)
    assert set(served.values()) == {"m@1", "m@3"}
    time.sleep(1.5)  # the controller flushes request samples every tick
    by_variant = {v["variant"]: v for v in http.get("/v1/deployments/shapes/ab").json()["variants"]}
    assert sum(v["requests"] for v in by_variant.values()) == 80
    assert by_variant["m@1"]["format_validity"] == by_variant["m@3"]["format_validity"] == 1.0
    # the replays answer under the format too, and still tell the variants apart by their scores
    scores = http.post("/v1/deployments/shapes/ab/evaluate").json()["scores"]
    assert scores["m@1"] > scores["m@3"]

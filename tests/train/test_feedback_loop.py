"""The feedback loop end to end, on the real gateway and engine and the shapes world: a weak
adapter serves with capture on; users send requests and correct the wrong answers; the export
trains a better adapter, which a canary rollout promotes while the rollout status shows the
users' feedback per variant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorafleet.chat_jsonl import answer_of, load_jsonl, request_messages
from lorafleet.scoring import json_fields
from lorafleet.serve.gateway_client import LorafleetClient
from tests.conftest import NEAR_BASE_STD
from tests.helpers import poll_until

pytestmark = pytest.mark.engine

DEPLOYMENT = "shapes-json"
CORRECTED = 64  # requests the users correct: the next adapter's training set
MAX_TOKENS = 24
JSON_SCHEMA = {
    "type": "object",
    "required": ["shape", "color"],
    "properties": {"shape": {"type": "string"}, "color": {"type": "string"}},
}


def _cli(server, tenant, *args: str, timeout: float = 1800) -> str:
    env = {**os.environ, "LORAFLEET_URL": server.url, "LORAFLEET_API_KEY": tenant.api_key}
    done = subprocess.run(
        [sys.executable, "-m", "lorafleet.serve.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _ask_and_judge(tenant, examples) -> dict[str, list[float]]:
    """Each example asked as a user would, and judged: thumbs up when right, else down with the
    right answer. Returns the judgements per variant that answered."""
    client, judged = tenant.openai(), {}
    with tenant.http() as http:
        for example in examples:
            reply = client.chat.completions.create(
                model=DEPLOYMENT,
                messages=request_messages(example),
                max_tokens=MAX_TOKENS,
                temperature=0,
            )
            truth, answer = answer_of(example), reply.choices[0].message.content or ""
            right = json_fields(answer, truth) == 1.0
            body = {"id": reply.id, "score": 1 if right else -1} | (
                {} if right else {"correction": truth}
            )
            response = http.post("/v1/feedback", json=body)
            assert response.status_code == 201, response.text
            judged.setdefault(response.json()["variant"], []).append(1.0 if right else 0.0)
    return judged


def test_corrections_of_live_answers_train_an_adapter_a_canary_then_promotes(
    server, world, new_tenant, make_adapter, tmp_path: Path
):
    tenant = new_tenant()
    client = LorafleetClient(server.url, tenant.api_key)
    # answers like the base: "a red circle", never JSON
    weak = make_adapter(seed=11, std=NEAR_BASE_STD)
    client.push_adapter("shapes", weak)
    client.deploy(DEPLOYMENT, "shapes@1")
    client.push_validation(DEPLOYMENT, world.file("json", "val"), "json_fields")  # the held-out set
    client.set_answer_format(DEPLOYMENT, {"json_schema": JSON_SCHEMA})
    with tenant.http() as http:
        on = http.put(
            f"/v1/deployments/{DEPLOYMENT}/capture",
            json={"sample_rate": 1.0, "max_per_day": 1000, "retention_days": 7},
        )
        assert on.status_code == 200, on.text

    live = load_jsonl(world.file("json", "train"))
    judged = _ask_and_judge(tenant, live[:CORRECTED])
    # the weak adapter is wrong almost every time
    assert judged["stable"].count(0.0) >= CORRECTED * 0.9

    data = tmp_path / "corrections.jsonl"
    _cli(server, tenant, "capture", "export", DEPLOYMENT, "--out", str(data), "--with-feedback")
    exported = load_jsonl(data)  # the trainer's own reader takes the export as it is
    # every answer had feedback; the wrong ones carry their correction
    assert len(exported) == CORRECTED
    answers = [json.loads(line)["metadata"]["answer"] for line in data.open()]
    assert answers.count("correction") == judged["stable"].count(0.0)

    out = tmp_path / "retrained"
    _cli(
        server,
        tenant,
        "train",
        "--base",
        str(world.base),
        "--train",
        str(data),
        "--val",
        str(world.file("json", "val")),
        "--probe",
        str(world.file("general", "val")),
        "--mix",
        str(world.file("general", "train")),
        "--mix-ratio",
        "0.5",
        "--out",
        str(out),
        "--rank",
        "16",
        "--lr",
        "2e-3",
        "--epochs",
        "6",
        "--batch-size",
        "8",
        "--eval-every",
        "16",
        "--metric",
        "json_fields",
    )
    version = client.push_adapter("shapes", out)
    assert version["version"] == 2

    client.start_rollout(
        DEPLOYMENT,
        to="shapes@2",
        steps=[50],
        min_requests=8,
        interval_s=1,
        look_requests=4,
        # JSON answers are longer than the weak adapter's: slower, rightly
        latency_tolerance=10.0,
    )
    gated = poll_until(
        lambda: (r := client.rollout(DEPLOYMENT))["phase"] != "Gating" and r, 900, "the gate"
    )
    assert gated["phase"] == "Progressing", gated["message"]
    gate = gated["gate"]["measurement"]
    # the retrained adapter scores better on the held-out set
    assert gate["effect"] > 0.3, gate["message"]

    remaining = iter(live[CORRECTED:])

    def promoted():
        _ask_and_judge(tenant, [next(remaining) for _ in range(8)])
        rollout = client.rollout(DEPLOYMENT)
        assert rollout["phase"] in ("Progressing", "Promoted"), rollout["message"]
        return rollout["phase"] == "Promoted" and rollout

    rollout = poll_until(promoted, 900, "the canary's promotion")
    feedback = {v["variant"]: v for v in rollout["feedback"]}
    canary, stable = feedback["canary"], feedback["stable"]
    assert canary["count"] >= 1 and stable["count"] >= 1
    # users liked the retrained adapter
    assert canary["mean"] > stable["mean"] and canary["difference"] > 0
    assert client.list_deployments()[0]["adapter"]["version"] == 2

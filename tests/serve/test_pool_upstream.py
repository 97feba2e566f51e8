"""lorafleet in front of an InferencePool (`LORAFLEET_POOL_URL`): two real `lorafleet engine`
nodes that fetch adapters from an S3 store behind a stand-in for the pool's gateway that places
every request round robin (tests/pool_standin.py; no cluster runs here), the gateway in front.

Every tenant's deployment answers from either node, with `model` = the adapter's digest and the
tenant and objective headers; the gateway never loads, scrapes or warms anything through the pool;
an A/B split reaches the pool as the gateway assigned it, and its replays carry the replay
objective; a pool that reached no pod is asked once more, one that sheds gets 503 + Retry-After;
a node killed under load fails no request; the nodes publish their adapters' residency on their
/metrics in vLLM's proposed shape."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from lorafleet.serve.dev.local_server import LocalServer
from lorafleet.serve.gateway_client import inline_images
from tests.conftest import NEAR_BASE_STD
from tests.engine_nodes import EngineNode, Nodes
from tests.helpers import assert_openai_error, image_messages, poll_until, upload_folder
from tests.pool_standin import PoolStandIn

pytestmark = pytest.mark.engine

FAIRNESS = ("x-gateway-inference-fairness-id", "x-llm-d-inference-fairness-id")
OBJECTIVE = ("x-gateway-inference-objective", "x-llm-d-inference-objective")


@dataclass
class Pool:
    gateway: LocalServer
    standin: PoolStandIn
    nodes: dict[str, EngineNode]  # by URL
    admin: httpx.Client
    tenants: dict[str, httpx.Client]  # by tenant name
    keys: dict[str, str]
    digests: dict[str, str]  # by adapter ref


@pytest.fixture(scope="module")
def pool(
    tiny_model: Path, make_adapter, tmp_path_factory: pytest.TempPathFactory, engine_nodes: Nodes
) -> Iterator[Pool]:
    nodes = {f"http://{address}": node for address, node in engine_nodes.nodes.items()}
    standin = PoolStandIn(nodes)
    gateway = LocalServer.start(
        tiny_model,
        tmp_path_factory.mktemp("pool-gateway"),
        store_url=engine_nodes.store_url,
        engine_api_key=engine_nodes.token,
        pool_url=standin.url,
        pool_objective="lorafleet-standard",
        pool_replay_objective="lorafleet-replay",
        max_lora_rank="8",
        drift_replay_s="0",  # the replays counted are the A/B evaluation's alone
    )
    try:
        for url in nodes:
            poll_until(lambda url=url: _healthy(url), 600, f"node {url} up")
        gateway.wait_ready()
        admin = httpx.Client(
            base_url=gateway.url,
            headers={"Authorization": f"Bearer {gateway.admin_key}"},
            timeout=120,
        )
        tenants, keys, digests = {}, {}, {}
        for tenant, seeds in (("acme", (90, 91)), ("globex", (92,))):  # (not the fleet test's)
            key = admin.post("/admin/tenants", json={"name": tenant}).json()["api_key"]
            keys[tenant] = key
            http = httpx.Client(
                base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=300
            )
            for seed in seeds:
                version = upload_folder(http, "m", make_adapter(seed, 8, std=NEAR_BASE_STD))
                digests[f"{tenant}/m@{version['version']}"] = version["digest"]
            deployed = http.put("/v1/deployments/reader", json={"adapter": "m@1"})
            assert deployed.status_code == 200, deployed.text
            tenants[tenant] = http
        yield Pool(gateway, standin, nodes, admin, tenants, keys, digests)
    finally:
        gateway.stop()
        standin.close()


def _healthy(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    return False


def _openai(pool: Pool, tenant: str) -> OpenAI:
    return OpenAI(base_url=pool.gateway.url + "/v1", api_key=pool.keys[tenant], max_retries=0)


def _ask(pool: Pool, tenant: str, user: str | None = None) -> httpx.Response:
    body: dict = {"model": "reader", "messages": image_messages(), "max_tokens": 4}
    if user is not None:
        body["user"] = user
    return pool.tenants[tenant].post("/v1/chat/completions", json=body)


def _chats(pool: Pool, since: int) -> list:
    return [p for p in pool.standin.placed[since:] if p.path == "/v1/chat/completions"]


def _residency(url: str) -> dict[str, str]:
    """A node's adapters by level, from its /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    levels = {}
    for family in text_string_to_metric_families(text):
        if family.name == "vllm:lora_adapter_loaded":
            for sample in family.samples:
                levels[sample.labels["adapter_name"]] = sample.labels["level"]
    return levels


def test_every_tenants_deployment_answers_from_either_node_with_its_flow_headers(pool: Pool):
    acme = pool.digests["acme/m@1"]
    globex = pool.digests["globex/m@1"]
    set_objective = pool.admin.put(
        "/admin/tenants/acme/deployments/reader/objective",
        json={"objective": "lorafleet-critical"},
    )
    assert set_objective.status_code == 200, set_objective.text
    assert set_objective.json() == {
        "tenant": "acme",
        "deployment": "reader",
        "objective": "lorafleet-critical",
        "default": "lorafleet-standard",
    }
    assert_openai_error(
        pool.admin.put(
            "/admin/tenants/acme/deployments/reader/objective", json={"objective": "Not_A_Name"}
        ),
        400,
        "an InferenceObjective's name",
    )
    since = len(pool.standin.placed)
    answers = {}
    for tenant in ("acme", "globex"):
        chat = _openai(pool, tenant).chat.completions
        for _ in range(6):
            answer = chat.create(model="reader", messages=image_messages(), max_tokens=4)
            assert answer.model == "reader" and answer.choices[0].message.content
            answers.setdefault(tenant, set()).add(answer.choices[0].message.content)
        # streamed as well
        stream = chat.create(model="reader", messages=image_messages(), max_tokens=4, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    placed = _chats(pool, since)
    assert len(placed) == 14 and all(p.status == 200 for p in placed)
    by_digest = {d: [p for p in placed if p.model == d] for d in (acme, globex)}
    assert [len(v) for v in by_digest.values()] == [7, 7]  # `model`: the adapter's digest
    for digest, requests in by_digest.items():  # the pool placed each on either node
        assert {p.endpoint for p in requests} == set(pool.nodes), digest
    for digest, tenant, objective in (
        (acme, "acme", "lorafleet-critical"),
        (globex, "globex", "lorafleet-standard"),
    ):
        for request in by_digest[digest]:
            assert all(request.headers[h] == tenant for h in FAIRNESS), request.headers
            assert all(request.headers[h] == objective for h in OBJECTIVE), request.headers
            assert request.headers["authorization"].startswith("Bearer ")
    # the gateway loaded, scraped and warmed nothing through the pool: chats and health only
    assert {(p.method, p.path) for p in pool.standin.placed} <= {
        ("POST", "/v1/chat/completions"),
        ("GET", "/health"),
    }
    engines = pool.admin.get("/admin/engines").json()
    assert engines["policy"] == "pool" and engines["placed"] >= 14
    assert [(r["name"], r["kind"], r["up"]) for r in engines["replicas"]] == [
        ("pool", "pool", True)
    ]
    # each node holds what it served, and says so in vLLM's proposed vocabulary
    for url in pool.nodes:
        poll_until(lambda url=url: {acme, globex} <= set(_residency(url)), 30, f"{url} residency")
        levels = _residency(url)
        assert levels[acme] in ("gpu", "cpu") and levels[globex] in ("gpu", "cpu")
        text = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'vllm:max_gpu_lora_adapters{model_name="lorafleet-base"} 2.0' in text
        assert "vllm:num_gpu_loaded_lora_adapters" in text
    # the tenant sees its deployment's objective; the default again with null
    assert pool.tenants["acme"].get("/v1/deployments").json()[0]["objective"] == (
        "lorafleet-critical"
    )
    # the CLI shows it and returns it to the default
    for args, said in (
        ([], "acme/reader: objective lorafleet-critical"),
        (["default"], "acme/reader: objective lorafleet-standard, the default"),
    ):
        shown = subprocess.run(
            [sys.executable, "-m", "lorafleet.serve.cli", "tenants", "objective", "acme", "reader"]
            + args
            + ["--url", pool.gateway.url],
            env={**os.environ, "LORAFLEET_ADMIN_KEY": pool.gateway.admin_key, "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 0 and said in shown.stdout, shown.stdout + shown.stderr
    since = len(pool.standin.placed)
    assert _ask(pool, "acme").status_code == 200
    (last,) = _chats(pool, since)
    assert last.headers["x-gateway-inference-objective"] == "lorafleet-standard"


def test_an_ab_split_reaches_the_pool_as_assigned_and_replays_carry_the_replay_objective(
    pool: Pool, general_val: Path
):
    http = pool.tenants["acme"]
    started = http.post(
        "/v1/deployments/reader/ab",
        json={"variants": [{"adapter": "m@1", "weight": 50}, {"adapter": "m@2", "weight": 50}]},
    )
    assert started.status_code == 201, started.text
    since = len(pool.standin.placed)
    served = Counter()
    for i in range(40):
        answer = _ask(pool, "acme", user=f"user-{i}")
        assert answer.status_code == 200, answer.text
        served[answer.headers["x-lorafleet-adapter"]] += 1
    placed = Counter(p.model for p in _chats(pool, since))
    assert placed == served  # what the gateway assigned is what reached the pool
    assert set(placed) == {pool.digests["acme/m@1"], pool.digests["acme/m@2"]}
    assert min(placed.values()) >= 8  # 50/50 over 40 users (p < 0.002 below 8)

    pushed = http.put(
        "/v1/deployments/reader/validation",
        files={"file": ("v.jsonl", inline_images(general_val))},
    )
    assert pushed.status_code == 200, pushed.text
    since = len(pool.standin.placed)
    evaluated = http.post("/v1/deployments/reader/ab/evaluate", params={"max_tokens": 8})
    assert evaluated.status_code == 200, evaluated.text
    replays = _chats(pool, since)
    assert len(replays) == 80  # 40 items, two variants, each through the pool
    assert {p.headers["x-gateway-inference-objective"] for p in replays} == {"lorafleet-replay"}
    assert {p.headers["x-gateway-inference-fairness-id"] for p in replays} == {"acme"}
    assert {p.endpoint for p in replays} == set(pool.nodes)
    http.post("/v1/deployments/reader/ab/stop", json={"keep": "m@1"}).raise_for_status()


def test_a_pool_that_reached_no_pod_is_asked_once_more_and_one_that_sheds_gets_503(pool: Pool):
    since = len(pool.standin.placed)
    pool.standin.fail_next[:] = [503]
    assert _ask(pool, "globex").status_code == 200  # once more, and served
    assert [p.status for p in _chats(pool, since)] == [503, 200]
    pool.standin.fail_next[:] = [502, 503]
    refused = _ask(pool, "globex")
    error = assert_openai_error(refused, 503, "reached no engine")
    assert error["code"] == "engine_unavailable" and refused.headers["Retry-After"]
    pool.standin.fail_next[:] = [429]
    shed = _ask(pool, "globex")
    assert assert_openai_error(shed, 503, "saturated")["code"] == "engine_busy"
    assert shed.headers["Retry-After"]
    assert not pool.standin.fail_next
    assert _ask(pool, "globex").status_code == 200


def test_a_node_killed_under_load_fails_no_request_and_serves_again_when_back(pool: Pool):
    victim_url = sorted(pool.nodes)[1]
    victim = pool.nodes[victim_url]
    statuses: list[int] = []
    stop = threading.Event()

    def client(tenant: str) -> None:
        while not stop.is_set():
            answer = _ask(pool, tenant)
            statuses.append(answer.status_code)
            assert answer.status_code == 200, answer.text

    threads = [threading.Thread(target=client, args=(t,)) for t in ("acme", "globex") * 2]
    for thread in threads:
        thread.start()
    try:
        poll_until(lambda: len(statuses) >= 8, 120, "requests under way")
        since = len(pool.standin.placed)
        victim.kill()
        killed_at = len(statuses)
        poll_until(lambda: victim_url not in pool.standin.live, 30, "the pool drops the node")
        poll_until(lambda: len(statuses) >= killed_at + 12, 300, "requests served by the survivor")
    finally:
        stop.set()
        for thread in threads:
            thread.join(300)
    assert statuses and set(statuses) == {200}, Counter(statuses)  # not one request failed
    # some reached the victim as it died and went once more
    assert any(p.status == 503 for p in _chats(pool, since)), "no request was in flight"

    victim.restart()
    poll_until(lambda: victim_url in pool.standin.live, 600, "the node back in the pool")
    since = len(pool.standin.placed)
    for _ in range(4):
        assert _ask(pool, "acme").status_code == 200
    assert victim_url in {p.endpoint for p in _chats(pool, since)}

"""The hop to the engine and back (`serve/api/forward.py`), fast: a real gateway (its app, catalog,
store, fleet and request log) attached to an instant OpenAI-shaped upstream
(`loadtests/stub_engine.py`), through the real `openai` SDK and raw HTTP. The real engine's tests
(tests/serve/api/test_chat.py) cover the same relay against vLLM."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from lorafleet.serve.api.app import create_app
from lorafleet.serve.engine.command import free_port
from lorafleet.serve.settings import Settings
from tests.factories import TINY_BASE_CONFIG
from tests.helpers import image_messages, on_loopback, poll_until, upload_folder

STUB = Path(__file__).parents[3] / "loadtests" / "stub_engine.py"
TOKENS = 16  # the stub's answer: "word " this many times, each token at STUB_LOGPROB
STUB_LOGPROB = -0.0123
ADMIN_KEY = "admin-key-for-the-relay-tests"
LORA = "base_model.model.model.language_model.layers.0.self_attn.q_proj"


@dataclass(frozen=True)
class Relay:
    url: str
    api_key: str
    deployment: str
    digest: str

    def openai(self) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=self.api_key, max_retries=0)

    def http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def _adapter(folder: Path) -> Path:
    """A rank-4 LoRA on the tiny base's one q_proj (64 -> 64)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    save_file(
        {
            f"{LORA}.lora_A.weight": torch.randn(4, 64, generator=generator),
            f"{LORA}.lora_B.weight": torch.randn(64, 4, generator=generator),
        },
        folder / "adapter_model.safetensors",
    )
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def stub_url() -> Iterator[str]:
    port = free_port()
    stub = subprocess.Popen(
        [sys.executable, str(STUB), "--port", str(port), "--tokens", str(TOKENS)]
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.TransportError:
            assert stub.poll() is None, "the stub engine exited"
            return False

    try:
        poll_until(answers, 30, "the stub engine")
        yield url
    finally:
        stub.terminate()
        stub.wait(10)


@pytest.fixture(scope="module")
def relay(stub_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """A gateway on loopback in front of the stub, with one tenant and one deployment."""
    work = tmp_path_factory.mktemp("relay")
    base = work / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(TINY_BASE_CONFIG))
    settings = Settings(
        base=str(base),
        home=work / "home",
        engine_url=stub_url,
        engine_api_key="stub",
        admin_key=ADMIN_KEY,
        request_log_flush_s=0.1,
        rollout_tick_s=3600,
        drift_look_s=3600,
        gc_interval_s=0,
    )
    with on_loopback(create_app(settings)) as url:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        poll_until(lambda: httpx.get(url + "/readyz").status_code == 200, 30, "the gateway")
        created = httpx.post(url + "/admin/tenants", json={"name": "acme"}, headers=admin)
        assert created.status_code == 201, created.text
        key = created.json()["api_key"]
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
            version = upload_folder(http, "extractor", _adapter(work / "adapter"))
            deployed = http.put("/v1/deployments/invoices", json={"adapter": "extractor"})
            assert deployed.status_code in (200, 201), deployed.text
        yield Relay(url, key, "invoices", version["digest"])


def _logged(relay: Relay, request_id: str) -> dict:
    """The request-log row of `request_id`, once the gateway has written it."""

    def row() -> dict | None:
        with relay.http() as http:
            page = http.get("/v1/requests", params={"limit": 50}).json()["data"]
        return next((r for r in page if r["id"] == request_id), None)

    return poll_until(row, 10, f"request {request_id} in the request log")


def test_a_stream_is_relayed_under_the_deployment_name_and_its_usage_only_if_asked(relay):
    client = relay.openai()
    chunks = list(
        client.chat.completions.create(
            model=relay.deployment, messages=image_messages(), stream=True, max_tokens=TOKENS
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "word " * TOKENS
    )
    assert {c.model for c in chunks} == {relay.deployment}
    assert all(c.usage is None for c in chunks)  # the gateway asked for usage; the client did not
    with_usage = list(
        client.chat.completions.create(
            model=relay.deployment,
            messages=image_messages(),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert with_usage[-1].choices == []
    # every chunk carries its request's id (what feedback names), the usage chunk included
    for answer in (chunks, with_usage):
        assert len({c.id for c in answer}) == 1 and answer[0].id.startswith("chatcmpl-")
    assert chunks[0].id != with_usage[0].id
    assert (with_usage[-1].usage.prompt_tokens, with_usage[-1].usage.completion_tokens) == (
        40,
        TOKENS,
    )
    row = _logged(relay, chunks[0].id)
    assert (row["stream"], row["completion_tokens"], row["deployment"]) == (
        True,
        TOKENS,
        relay.deployment,
    )


def test_the_adapter_digest_is_only_in_its_header_never_in_the_body(relay):
    body = {"model": relay.deployment, "messages": image_messages()}
    with relay.http() as http:
        plain = http.post("/v1/chat/completions", json=body)
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
            raw = b"".join(stream.iter_bytes())
            headers = stream.headers
    assert plain.status_code == 200 and relay.digest.encode() not in plain.content
    assert plain.json()["model"] == relay.deployment
    assert relay.digest.encode() not in raw and raw.endswith(b"data: [DONE]\n\n")
    assert headers["x-lorafleet-adapter"] == relay.digest
    assert headers["x-lorafleet-deployment"] == relay.deployment
    assert headers["x-request-id"] == json.loads(raw.split(b"\n")[0][6:])["id"]


def test_logprobs_the_gateway_asked_for_are_hidden_and_still_recorded(relay):
    client = relay.openai()
    answer = client.chat.completions.create(model=relay.deployment, messages=image_messages())
    assert answer.choices[0].logprobs is None
    streamed = list(
        client.chat.completions.create(
            model=relay.deployment, messages=image_messages(), stream=True
        )
    )
    assert all(c.choices[0].logprobs is None for c in streamed if c.choices)
    for request_id in (answer.id, streamed[0].id):
        row = _logged(relay, request_id)
        assert row["confidence_mean"] == pytest.approx(STUB_LOGPROB)
        assert row["confidence_min"] == pytest.approx(STUB_LOGPROB)


def test_a_client_that_asks_for_logprobs_gets_them(relay):
    client = relay.openai()
    answer = client.chat.completions.create(
        model=relay.deployment, messages=image_messages(), logprobs=True
    )
    assert [t.logprob for t in answer.choices[0].logprobs.content] == [STUB_LOGPROB] * TOKENS
    streamed = list(
        client.chat.completions.create(
            model=relay.deployment, messages=image_messages(), stream=True, logprobs=True
        )
    )
    tokens = [t for c in streamed if c.choices for t in c.choices[0].logprobs.content]
    assert [t.logprob for t in tokens] == [STUB_LOGPROB] * TOKENS


def test_health_is_the_readiness_and_unknown_routes_say_what_to_use(relay):
    import openai

    health = httpx.get(relay.url + "/health")
    assert health.status_code == 200 and health.json()["engine_up"] is True
    client = relay.openai()
    with pytest.raises(openai.NotFoundError) as legacy:
        client.completions.create(model=relay.deployment, prompt="hello")
    assert legacy.value.code == "not_found"
    assert "use /v1/chat/completions" in legacy.value.message
    with pytest.raises(openai.NotFoundError) as embeddings:
        client.embeddings.create(model=relay.deployment, input="hello")
    assert "embeddings are not served" in embeddings.value.message
    with relay.http() as http:
        unknown = http.get("/v1/no-such-thing")
    assert unknown.status_code == 404
    assert unknown.json()["error"] == {
        "message": "no route GET /v1/no-such-thing (the routes are listed at /docs)",
        "type": "invalid_request_error",
        "param": None,
        "code": "not_found",
    }


def test_json_bodies_are_json_whatever_their_content_type_says(relay):
    """`curl -d` sends form-urlencoded; other clients send no type at all."""
    with relay.http() as http:
        answer = http.post(
            "/v1/chat/completions",
            content=json.dumps({"model": relay.deployment, "messages": image_messages()}),
        )
        assert answer.status_code == 200, answer.text
        _logged(relay, answer.json()["id"])  # feedback names a logged request
        form = {"content-type": "application/x-www-form-urlencoded"}
        feedback = {"id": answer.json()["id"], "score": 1}
        posted = http.post("/v1/feedback", content=json.dumps(feedback), headers=form)
        assert posted.status_code == 201, posted.text
        again = http.post("/v1/feedback", content=json.dumps({**feedback, "score": 0}))
        assert again.status_code == 200 and again.json()["score"] == 0
        upload = http.post("/v1/adapters", content=b"{}", headers=form)  # an upload keeps its type
        assert upload.status_code in (400, 415), upload.text


def test_the_engines_times_are_recorded_as_usage_and_never_reach_the_client(relay):
    """vLLM's per-request `metrics` (prefill and decode times) become the request's engine time;
    the client's answer, streamed or not, is OpenAI's shape without them."""
    with relay.http() as http:
        # a deployment of this test's own: its usage row holds only these two requests
        http.put("/v1/deployments/timed", json={"adapter": "extractor"}).raise_for_status()
        body = {"model": "timed", "messages": [{"role": "user", "content": "hi"}]}
        plain = http.post("/v1/chat/completions", json=body)
        assert plain.status_code == 200 and "metrics" not in plain.json()
        assert plain.json()["usage"]["completion_tokens"] == TOKENS
        streamed_body = body | {"stream": True, "stream_options": {"include_usage": True}}
        with http.stream("POST", "/v1/chat/completions", json=streamed_body) as streamed:
            chunks = [
                json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")
            ]
        assert chunks[-1]["usage"]["completion_tokens"] == TOKENS
        assert all("metrics" not in chunk for chunk in chunks)
        logged = _logged(relay, plain.json()["id"])
        assert (logged["images"], logged["prefill_s"], logged["decode_s"]) == (0, 0.0125, 0.0375)

        def counted() -> dict | None:
            rows = http.get("/v1/usage", params={"group_by": "deployment"}).json()["rows"]
            row = next((r for r in rows if r["deployment"] == "timed"), None)
            return row if row is not None and row["requests"] == 2 else None

        row = poll_until(counted, 10, "the two requests in the usage report")
    assert row["engine_seconds"] == pytest.approx(2 * 0.05)
    assert row["completion_tokens"] == 2 * TOKENS and row["prompt_tokens"] == 2 * 40

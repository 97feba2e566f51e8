"""Adapters on the vision tower and connector, through the real gateway and engine (which runs with
vLLM's tower and connector LoRA: the tiny Qwen2.5-VL supports it), with the unmodified `openai`
SDK."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import upload_folder

MAX_TOKENS = 8
PROMPTS = 6


def _answers(client, deployment: str, prompts: list[list[dict]]) -> list[str]:
    return [
        client.chat.completions.create(
            model=deployment, messages=messages, max_tokens=MAX_TOKENS, temperature=0
        )
        .choices[0]
        .message.content
        for messages in prompts
    ]


@pytest.fixture(scope="module")
def tower_adapters(tiny_model, tmp_path_factory):
    from lorafleet.train.random_adapter import make_random_adapter

    out = tmp_path_factory.mktemp("tower-adapters")
    return {
        parts: make_random_adapter(tiny_model, out / "-".join(parts), seed=21, parts=parts)
        for parts in (("vision",), ("connector",))
    }


def test_tower_and_connector_adapters_are_served_and_change_image_answers(
    new_tenant, tower_adapters, make_adapter, tiny_model, general_requests, served_quantization
):
    from lorafleet.train.vllm_generate import generate

    tenant = new_tenant()
    with tenant.http() as http:
        for name, parts in (("eyes", ("vision",)), ("bridge", ("connector",))):
            version = upload_folder(http, name, tower_adapters[parts])
            assert version["parts"] == list(parts)
            assert http.put(f"/v1/deployments/{name}", json={"adapter": name}).status_code == 200
        assert upload_folder(http, "words", make_adapter(1))["parts"] == ["language"]
        assert http.put("/v1/deployments/words", json={"adapter": "words"}).status_code == 200
        shown = {a["name"]: a["versions"][0]["parts"] for a in http.get("/v1/adapters").json()}
    assert shown == {"eyes": ["vision"], "bridge": ["connector"], "words": ["language"]}
    prompts = general_requests[:PROMPTS]
    client = tenant.openai()
    served = {name: _answers(client, name, prompts) for name in ("eyes", "bridge", "words")}

    common = dict(dtype="float32", llm_kwargs=served_quantization.llm_kwargs)
    with_tower = generate(
        str(tiny_model),
        {
            "base": None,
            "eyes": str(tower_adapters[("vision",)]),
            "bridge": str(tower_adapters[("connector",)]),
        },
        prompts,
        MAX_TOKENS,
        tower_lora=True,
        **common,
    )
    without = generate(
        str(tiny_model),
        {"eyes": str(tower_adapters[("vision",)]), "words": str(make_adapter(1))},
        prompts,
        MAX_TOKENS,
        tower_lora=False,
        **common,
    )

    def texts(outputs: list[dict]) -> list[str]:
        return [o["text"] for o in outputs]

    base = texts(with_tower["base"])
    for name in ("eyes", "bridge"):
        assert served[name] == texts(with_tower[name])  # what vLLM gives with tower LoRA, exactly
        assert served[name] != base  # and it changes the answers to pictures
    # without tower LoRA the engine would have silently served the base's answers
    assert texts(without["eyes"]) == base
    # a language-model adapter on the same engine answers as on an engine without tower LoRA
    assert served["words"] == texts(without["words"])


def test_a_gateway_with_tower_lora_off_refuses_tower_adapters_and_serves_the_others(
    server, tower_adapters, make_adapter, tmp_path
):
    """A second gateway on the session's engine, with LORAFLEET_TOWER_LORA=off."""
    from lorafleet.serve.gateway_client import pack_adapter
    from tests.helpers import assert_openai_error, image_messages, upload_archive

    gateway = server.attach(tmp_path / "home", tower_lora="off")
    digest = None
    try:
        gateway.wait_ready(120)
        with httpx.Client(
            base_url=gateway.url, headers={"Authorization": f"Bearer {gateway.admin_key}"}
        ) as admin:
            key = admin.post("/admin/tenants", json={"name": "t"}).json()["api_key"]
        with httpx.Client(
            base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=120
        ) as http:
            archive = pack_adapter(tower_adapters[("connector",)])
            refused = upload_archive(http, "bridge", archive)
            assert_openai_error(refused, 400, "LORAFLEET_TOWER_LORA=off")
            assert "connector" in refused.json()["error"]["message"]
            assert http.get("/v1/adapters").json() == []  # nothing was registered
            digest = upload_folder(http, "words", make_adapter(1))["digest"]
            http.put("/v1/deployments/words", json={"adapter": "words"}).raise_for_status()
            answer = http.post(
                "/v1/chat/completions",
                json={"model": "words", "messages": image_messages(), "max_tokens": 4},
            )
        assert answer.status_code == 200, answer.text
        stored = {p.name for p in (gateway.home / "adapters").iterdir() if p.name[0] != "."}
        assert stored == {digest}  # the refused upload left nothing in the store
    finally:
        gateway.stop()
        if digest:
            server.unload(digest)

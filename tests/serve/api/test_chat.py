"""Chat completions through the real gateway and engine, with the unmodified `openai` SDK."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.helpers import assert_openai_error, image_messages, upload_folder

MAX_TOKENS = 8


def _deploy(tenant, adapter: Path, deployment: str, name: str = "ext") -> dict:
    with tenant.http() as http:
        version = upload_folder(http, name, adapter)
        response = http.put(
            f"/v1/deployments/{deployment}", json={"adapter": f"{name}@{version['version']}"}
        )
    assert response.status_code == 200, response.text
    return version


def _greedy(client, deployment: str, messages: list[dict]) -> str:
    reply = client.chat.completions.create(
        model=deployment, messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    return reply.choices[0].message.content


@pytest.fixture(scope="module")
def two_tenants(server, make_adapter, tiny_model):
    """Tenants A and B, each with its own adapter deployed as `assistant`."""
    import uuid

    from tests.conftest import TenantHandle

    handles = []
    with server.admin() as admin:
        for seed in (1, 2):
            created = admin.post(
                "/admin/tenants", json={"name": f"chat-{seed}-{uuid.uuid4().hex[:6]}"}
            ).json()
            handle = TenantHandle(name=created["name"], api_key=created["api_key"], url=server.url)
            _deploy(handle, make_adapter(seed), "assistant")
            handles.append(handle)
    return handles


def test_each_tenant_gets_exactly_what_vllm_gives_for_its_adapter(
    two_tenants, make_adapter, tiny_model, served_quantization
):
    # offline vLLM + LoRARequest on the folders: no gateway at all
    from lorafleet.train.vllm_generate import generate

    messages = image_messages()
    served = [_greedy(t.openai(), "assistant", messages) for t in two_tenants]
    direct = generate(
        str(tiny_model),
        {"base": None, "a": str(make_adapter(1)), "b": str(make_adapter(2))},
        [messages],
        MAX_TOKENS,
        max_rank=16,
        dtype="float32",
        # the same int4 base the server quantized
        llm_kwargs=served_quantization.llm_kwargs,
    )
    texts = {name: outputs[0]["text"] for name, outputs in direct.items()}
    assert served == [texts["a"], texts["b"]]  # the gateway serves each tenant's adapter, exactly
    assert len(set(texts.values())) == 3  # and the adapters really change outputs
    # the suite serves the quantized base
    assert served_quantization.label.startswith("int4 (torchao")


def test_streaming_and_non_streaming_agree(two_tenants):
    client = two_tenants[0].openai()
    messages = image_messages(color=(20, 200, 40))
    whole = _greedy(client, "assistant", messages)
    stream = client.chat.completions.create(
        model="assistant", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert {c.model for c in chunks} == {"assistant"}
    assert all(c.usage is None for c in chunks)  # usage is only sent when the client asks for it


def test_streaming_usage_is_returned_when_asked(two_tenants):
    stream = (
        two_tenants[0]
        .openai()
        .chat.completions.create(
            model="assistant",
            messages=image_messages(),
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    # the answer may end before max_tokens (the adapter's greedy answer is whatever it is)
    [finish] = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert usage is not None and usage.prompt_tokens > 0
    assert usage.completion_tokens == 4 if finish == "length" else 0 < usage.completion_tokens < 4


def test_response_names_the_deployment_and_adapter_never_the_digest_as_model(two_tenants):
    with two_tenants[0].http() as http:
        deployment = http.get("/v1/deployments").json()[0]
        response = http.post(
            "/v1/chat/completions",
            json={"model": "assistant", "messages": image_messages(), "max_tokens": 2},
        )
    assert response.status_code == 200
    assert response.json()["model"] == "assistant"
    assert response.headers["x-lorafleet-deployment"] == "assistant"
    assert response.headers["x-lorafleet-adapter"] == deployment["adapter"]["digest"]


def test_models_lists_only_the_tenants_deployments(two_tenants):
    ids = [m.id for m in two_tenants[0].openai().models.list()]
    assert ids == ["assistant"]
    assert two_tenants[0].openai().models.retrieve("assistant").id == "assistant"


def test_unknown_model_is_404_in_openai_shape(two_tenants):
    import openai

    with pytest.raises(openai.NotFoundError):
        two_tenants[0].openai().chat.completions.create(
            model="nope", messages=image_messages(), max_tokens=2
        )


def test_engine_validation_errors_pass_through(two_tenants):
    with two_tenants[0].http() as http:
        response = http.post(
            "/v1/chat/completions",
            json={"model": "assistant", "messages": image_messages(), "max_tokens": -1},
        )
    error = assert_openai_error(response, 400, "max_tokens")
    assert error["code"] == "invalid_request"  # a string, as the gateway's own codes
    assert response.headers["x-lorafleet-deployment"] == "assistant"


def test_tools_are_accepted_for_a_base_whose_tool_call_parser_vllm_has(two_tenants):
    """The tiny base is a Qwen2.5-VL: the engine runs with vLLM's hermes tool-call parser, so a
    tenant's tools reach the model (the tiny one answers in words rather than calling)."""
    weather = {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    for choice in ("auto", "none"):
        reply = (
            two_tenants[0]
            .openai()
            .chat.completions.create(
                model="assistant",
                messages=image_messages("Is it raining in Paris?"),
                tools=[weather],
                tool_choice=choice,
                max_tokens=MAX_TOKENS,
                temperature=0,
            )
        )
        assert reply.choices[0].message.content or reply.choices[0].message.tool_calls


def test_remote_image_urls_are_refused_by_default(two_tenants):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}},
                {"type": "text", "text": "hi"},
            ],
        }
    ]
    with two_tenants[0].http() as http:
        response = http.post(
            "/v1/chat/completions", json={"model": "assistant", "messages": messages}
        )
    assert_openai_error(response, 400, "remote image URLs are disabled")


def test_over_limit_images_and_other_media_get_400_and_the_server_still_answers(two_tenants):
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buffer, "PNG")  # 25 MP in a few KB: over the default 16 MP
    bomb_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    bomb = {"type": "image_url", "image_url": {"url": bomb_url}}
    image = image_messages()[0]["content"][0]
    video = {"type": "video_url", "video_url": {"url": "http://127.0.0.1:1/v.mp4"}}
    with two_tenants[0].http() as http:
        for parts, code in (
            ([bomb], "image_too_many_pixels"),
            ([image] * 9, "too_many_images"),
            ([video], "unsupported_content_part"),
        ):
            response = http.post(
                "/v1/chat/completions",
                json={
                    "model": "assistant",
                    "max_tokens": 2,
                    "messages": [
                        {"role": "user", "content": [*parts, {"type": "text", "text": "hi"}]}
                    ],
                },
            )
            assert assert_openai_error(response, 400)["code"] == code
    # refused before the engine saw them: it answers the next request as ever
    assert _greedy(two_tenants[0].openai(), "assistant", image_messages()) is not None


@pytest.mark.parametrize(
    "body, phrase",
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'{"messages": []}', "'model' is required"),
    ],
)
def test_malformed_chat_bodies_get_400(two_tenants, body, phrase):
    with two_tenants[0].http() as http:
        response = http.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    assert_openai_error(response, 400, phrase)


def test_missing_or_wrong_key_is_401(server):
    for headers in ({}, {"Authorization": "Bearer lf-wrong"}):
        response = httpx.post(
            server.url + "/v1/chat/completions",
            headers=headers,
            json={"model": "assistant", "messages": image_messages()},
        )
        assert_openai_error(response, 401)


def test_metrics_count_requests_and_tokens_by_tenant_deployment_adapter(
    server, two_tenants, served_quantization
):
    _greedy(two_tenants[1].openai(), "assistant", image_messages())
    text = httpx.get(server.metrics_url).text
    tenant = two_tenants[1].name
    lines = [
        line
        for line in text.splitlines()
        if line.startswith("lorafleet_requests_total") and f'tenant="{tenant}"' in line
    ]
    assert lines and 'deployment="assistant"' in lines[0] and 'status="200"' in lines[0]
    assert any(
        line.startswith("lorafleet_tokens_total")
        and f'tenant="{tenant}"' in line
        and 'kind="completion"' in line
        for line in text.splitlines()
    )
    assert "lorafleet_engine_up 1.0" in text
    assert f'quantization="{served_quantization.label}"' in next(
        line for line in text.splitlines() if line.startswith("lorafleet_engine_info{")
    )
    assert 'lorafleet_adapter_loads_total{outcome="ok"}' in text
    assert httpx.get(server.url + "/healthz").status_code == 200

"""`POST /v1/responses` through the real gateway and engine, with the unmodified `openai` SDK: the
same answer as the chat completion, with images, streamed and not; what it does not serve is a
400 naming the field."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.helpers import assert_openai_error, image_data_url
from tests.serve.api.test_chat import MAX_TOKENS, _greedy, two_tenants  # noqa: F401

PICTURE = image_data_url((30, 90, 220))


def _input(text: str = "What is in the image?") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "input_image", "image_url": PICTURE},
                {"type": "input_text", "text": text},
            ],
        }
    ]


def _chat_messages(text: str = "What is in the image?") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": PICTURE}},
                {"type": "text", "text": text},
            ],
        }
    ]


def test_a_response_is_the_chat_completion_with_an_image_streamed_and_not(two_tenants):  # noqa: F811
    tenant = two_tenants[0]
    client = tenant.openai()
    chat = _greedy(client, "assistant", _chat_messages())

    response = client.responses.create(
        model="assistant", input=_input(), max_output_tokens=MAX_TOKENS, temperature=0
    )
    assert response.output_text == chat and response.model == "assistant"
    assert response.id.startswith("resp_") and response.store is False
    assert response.status in ("completed", "incomplete")
    assert response.usage.output_tokens > 0 and response.usage.input_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens

    # the SDK's own stream helper accumulates the events into the same response; an answer cut
    # at max_output_tokens ends with `response.incomplete`, as OpenAI's does
    with client.responses.stream(
        model="assistant", input=_input(), max_output_tokens=MAX_TOKENS, temperature=0
    ) as stream:
        events = list(stream)
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    final = events[-1].response
    assert events[-1].type == f"response.{response.status}" and final.status == response.status
    assert "".join(deltas) == chat == final.output_text
    assert final.id.startswith("resp_") and final.id != response.id
    assert final.usage.output_tokens == response.usage.output_tokens

    # the answer's id takes feedback, as a chat completion's does
    with tenant.http() as http:
        judged = http.post("/v1/feedback", json={"id": response.id, "score": 1})
        assert judged.status_code == 201, judged.text
        assert judged.json()["id"] == "chatcmpl-" + response.id.removeprefix("resp_")


def test_instructions_and_a_plain_string_input(two_tenants):  # noqa: F811
    client = two_tenants[1].openai()
    chat = client.chat.completions.create(
        model="assistant",
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is a circle?"},
        ],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    response = client.responses.create(
        model="assistant",
        instructions="Answer briefly.",
        input="What is a circle?",
        max_output_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert response.output_text == chat.choices[0].message.content
    if chat.choices[0].finish_reason == "length":
        assert response.status == "incomplete"
        assert response.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"background": True}, "background"),
        (
            {"tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]},
            "tools",
        ),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_what_is_not_served_is_a_400_naming_the_field(two_tenants, extra, param):  # noqa: F811
    with two_tenants[0].http() as http:
        response = http.post("/v1/responses", json={"model": "assistant", "input": "hi", **extra})
    error = assert_openai_error(response, 400)
    assert error["param"] == param and isinstance(error["code"], str)


def test_sdk_errors_and_unknown_deployments(two_tenants):  # noqa: F811
    client = two_tenants[0].openai()
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="hi")
    with pytest.raises(openai.BadRequestError, match="file ids are not supported"):
        client.responses.create(
            model="assistant",
            input=[{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}],
        )
    # nothing is stored: there is no response to retrieve
    with two_tenants[0].http() as http:
        assert_openai_error(http.get("/v1/responses/resp_1"), 404, "not stored")
    assert httpx.post(two_tenants[0].url + "/v1/responses", json={}).status_code == 401


def test_the_admin_key_answers_for_no_tenant(server, two_tenants):  # noqa: F811
    acting = {
        "Authorization": f"Bearer {server.admin_key}",
        "X-Lorafleet-Tenant": two_tenants[0].name,
    }
    for path, body in (
        (
            "/v1/chat/completions",
            {"model": "assistant", "messages": [{"role": "user", "content": "hi"}]},
        ),
        ("/v1/responses", {"model": "assistant", "input": "hi"}),
    ):
        refused = httpx.post(server.url + path, json=body, headers=acting)
        assert_openai_error(refused, 400, "the admin key does not chat for a tenant")

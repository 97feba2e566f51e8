"""The Responses API as the chat completion it means, and the chat answer written back as a Response
and as the Responses stream's events (no engine: the translation alone)."""

from __future__ import annotations

import asyncio
import json

import pytest

from lorafleet.errors import InvalidRequest
from lorafleet.serve.api.responses import Echo, chat_body, stream_events

PICTURE = "data:image/png;base64,iVBORw0KGgo="


def test_a_request_becomes_its_chat_completion():
    chat = chat_body(
        {
            "model": "invoice",
            "instructions": "Answer in JSON.",
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_image", "image_url": PICTURE, "detail": "auto"},
                        {"type": "input_text", "text": "What is it?"},
                    ],
                },
                {"type": "message", "role": "assistant", "content": "a circle"},
                {"role": "developer", "content": "Be brief."},
            ],
            "max_output_tokens": 12,
            "temperature": 0,
            "stream": True,
            "store": True,
            "user": "u-1",
            "text": {"format": {"type": "json_schema", "name": "shape", "schema": {}}},
        }
    )
    assert chat == {
        "model": "invoice",
        "messages": [
            {"role": "system", "content": "Answer in JSON."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": PICTURE}},
                    {"type": "text", "text": "What is it?"},
                ],
            },
            {"role": "assistant", "content": "a circle"},
            {"role": "system", "content": "Be brief."},
        ],
        "max_tokens": 12,
        "temperature": 0,
        "user": "u-1",
        "stream": True,
        "stream_options": {"include_usage": True},
        "response_format": {"type": "json_schema", "json_schema": {"name": "shape", "schema": {}}},
    }
    assert chat_body({"model": "m", "input": "hi"})["messages"] == [
        {"role": "user", "content": "hi"}
    ]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "m", "input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"model": "m", "input": "hi", "conversation": "conv_1"}, "conversation"),
        ({"model": "m", "input": "hi", "background": True}, "background"),
        ({"model": "m", "input": "hi", "tools": [{"type": "web_search"}]}, "tools"),
        ({"model": "m", "input": "hi", "seed": 1}, "seed"),
        ({"model": "m", "input": []}, "input"),
        ({"model": "m", "input": [{"type": "function_call_output"}]}, "input[0]"),
        ({"model": "m", "input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        (
            {"model": "m", "input": [{"role": "user", "content": [{"type": "input_file"}]}]},
            "input[0].content[0]",
        ),
        ({"model": "m", "input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format"),
    ],
)
def test_what_is_not_served_names_its_field(body, param):
    with pytest.raises(InvalidRequest) as refused:
        chat_body(body)
    assert refused.value.param == param and refused.value.status == 400


def test_a_missing_model_is_the_chat_paths_error():
    with pytest.raises(InvalidRequest) as refused:
        chat_body({"input": "hi"})
    assert refused.value.code == "model_required"


def _sse(*chunks: dict) -> list[bytes]:
    lines = [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]
    # split across reads the way a network does
    joined = b"".join(lines)
    return [joined[i : i + 7] for i in range(0, len(joined), 7)]


async def _events(reads: list[bytes], echo: Echo) -> list[dict]:
    async def chat():
        for read in reads:
            yield read

    out = b"".join([e async for e in stream_events(chat(), echo)]).decode()
    events = []
    for block in out.strip().split("\n\n"):
        kind, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {event['type']}"
        events.append(event)
    return events


ECHO = Echo.of({"model": "invoice", "input": "hi"}, "chatcmpl-" + "ab" * 16)


def test_a_chat_stream_becomes_the_responses_events_in_order():
    reads = _sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "a red "}}]},
        {"choices": [{"index": 0, "delta": {"content": "circle"}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 2}},
    )
    events = asyncio.run(_events(reads, ECHO))
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",  # it stopped at max_output_tokens
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[6]["text"] == "a red circle"
    final = events[-1]["response"]
    assert final["id"] == "resp_" + "ab" * 16 and final["output"][0]["id"] == "msg_" + "ab" * 16
    assert final["output"][0]["content"][0]["text"] == "a red circle"
    assert final["usage"]["total_tokens"] == 22
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}


def test_an_engine_error_mid_stream_fails_the_response():
    reads = _sse(
        {"choices": [{"index": 0, "delta": {"content": "a"}}]},
        {"error": {"message": "the engine stopped", "code": "engine_unavailable"}},
    )
    events = asyncio.run(_events(reads, ECHO))
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    assert events[-1]["response"]["error"]["code"] == "engine_unavailable"

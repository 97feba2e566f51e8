"""`POST /v1/responses`: OpenAI's Responses API over the chat path, stateless.

A Responses request becomes the chat completion it means (`chat_body`): `instructions` the system
message, `input` the messages (`input_text` and `input_image` parts), `max_output_tokens`,
`text.format` the response format. It then takes the chat path's every step (limits, images,
deployment, rollout variant, fair queue, failover, request log, confidence, capture), and its
answer is written back as a Response (`response_object`), or as the Responses stream's events
(`stream_events`). Nothing is stored: `previous_response_id`, `conversation` and background
responses are refused with 400, and the answer says `"store": false`. Tools are served on
`/v1/chat/completions` only.

The answer's `id` is `resp_` and the request's 32 hex digits: the request log, feedback and
`x-request-id` know the request as `chatcmpl-` and the same digits (`logged_request_id`).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from lorafleet.errors import InvalidRequest
from lorafleet.serve.api.chat import parse_json_body, require_model, serve_chat
from lorafleet.serve.feedback.request_log import REQUEST_ID_PREFIX, RESPONSE_ID_PREFIX

__all__ = ["router", "chat_body", "response_object", "stream_events"]

router = APIRouter(prefix="/v1")

# what a Responses request may hold: translated, echoed, or harmless as the chat path serves it
_ACCEPTED = {
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stream",
    "store",
    "metadata",
    "user",
    "text",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "truncation",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "include",
}
_STATEFUL = ("previous_response_id", "conversation", "background")
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def _unsupported(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, code="unsupported_parameter", param=param)


def chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """The chat completion a Responses request means; InvalidRequest (400) naming the field for
    what the gateway does not serve."""
    for field in _STATEFUL:
        if body.get(field):
            raise _unsupported(
                f"'{field}' is not supported: lorafleet stores no responses; send the whole "
                "conversation in 'input'",
                field,
            )
    for field in body:
        if field not in _ACCEPTED and field not in _STATEFUL:
            raise InvalidRequest(
                f"unrecognized request argument supplied: {field}",
                code="unknown_parameter",
                param=field,
            )
    if body.get("tools"):
        raise _unsupported(
            "tools are not supported on /v1/responses: use /v1/chat/completions", "tools"
        )
    require_model(body)
    messages = []
    if body.get("instructions") is not None:
        if not isinstance(body["instructions"], str):
            raise InvalidRequest("'instructions' must be a string", param="instructions")
        messages.append({"role": "system", "content": body["instructions"]})
    messages.extend(_messages(body.get("input")))
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    for field, to in (("max_output_tokens", "max_tokens"), ("temperature", None), ("top_p", None)):
        if body.get(field) is not None:
            chat[to or field] = body[field]
    if isinstance(body.get("user"), str):
        chat["user"] = body["user"]
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # the completed event's usage
    if (response_format := _response_format(body.get("text"))) is not None:
        chat["response_format"] = response_format
    return chat


def _messages(given: Any) -> list[dict[str, Any]]:
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        raise InvalidRequest(
            "'input' must be a string or a non-empty list of messages", param="input"
        )
    return [_message(item, i) for i, item in enumerate(given)]


def _message(item: Any, index: int) -> dict[str, Any]:
    where = f"input[{index}]"
    if not isinstance(item, dict):
        raise InvalidRequest(f"{where} must be a message object", param=where)
    kind = item.get("type", "message")
    if kind != "message":
        raise _unsupported(
            f"{where}: input items of type {kind!r} are not supported (messages only)", where
        )
    role = _ROLES.get(item.get("role"))  # type: ignore[arg-type]
    if role is None:
        raise InvalidRequest(
            f"{where}.role must be one of {', '.join(_ROLES)}", param=f"{where}.role"
        )
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise InvalidRequest(
            f"{where}.content must be a string or a list of parts", param=f"{where}.content"
        )
    return {
        "role": role,
        "content": [_part(p, f"{where}.content[{i}]") for i, p in enumerate(content)],
    }


def _part(part: Any, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "input_image":
        if part.get("file_id"):
            raise _unsupported(f"{where}: file ids are not supported: pass image_url", where)
        if not isinstance(part.get("image_url"), str):
            raise InvalidRequest(f"{where}.image_url must be a URL or a data URL", param=where)
        return {"type": "image_url", "image_url": {"url": part["image_url"]}}
    raise _unsupported(
        f"{where}: parts of type {kind!r} are not supported (input_text, input_image)", where
    )


def _response_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise InvalidRequest(
        "text.format.type must be text, json_object or json_schema", param="text.format"
    )


@dataclass(frozen=True)
class Echo:
    """What a Response repeats of its request, and its ids."""

    id: str
    message_id: str
    model: str
    instructions: str | None
    max_output_tokens: int | None
    temperature: float | None
    top_p: float | None
    metadata: dict[str, Any]
    user: str | None
    text: dict[str, Any]

    @classmethod
    def of(cls, body: dict[str, Any], request_id: str) -> Echo:
        digits = request_id.removeprefix(REQUEST_ID_PREFIX)
        return cls(
            id=RESPONSE_ID_PREFIX + digits,
            message_id="msg_" + digits,
            model=body["model"],
            instructions=body.get("instructions"),
            max_output_tokens=body.get("max_output_tokens"),
            temperature=body.get("temperature"),
            top_p=body.get("top_p"),
            metadata=body.get("metadata") or {},
            user=body.get("user"),
            text=body.get("text") or {"format": {"type": "text"}},
        )


def _message_item(echo: Echo, text: str, status: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": echo.message_id,
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}] if text else [],
    }


def _usage(counts: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = counts.get("prompt_tokens", 0), counts.get("completion_tokens", 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def response_object(
    echo: Echo,
    created_at: float,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    """A Response as OpenAI's API writes it."""
    if status == "completed" and finish_reason == "length":
        status = "incomplete"
    return {
        "id": echo.id,
        "object": "response",
        "created_at": int(created_at),
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": echo.instructions,
        "max_output_tokens": echo.max_output_tokens,
        "model": echo.model,
        "output": output,
        "parallel_tool_calls": False,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": echo.temperature,
        "text": echo.text,
        "tool_choice": "none",
        "tools": [],
        "top_p": echo.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": echo.user,
        "metadata": echo.metadata,
    }


def _completed(echo: Echo, chat: dict[str, Any]) -> dict[str, Any]:
    choice = (chat.get("choices") or [{}])[0]
    text = (choice.get("message") or {}).get("content") or ""
    return response_object(
        echo,
        chat.get("created", time.time()),
        "completed",
        [_message_item(echo, text, "completed")],
        _usage(chat.get("usage") or {}),
        choice.get("finish_reason"),
    )


class _Events:
    """The Responses stream's events, numbered as they are written."""

    def __init__(self, echo: Echo) -> None:
        self.sequence = 0
        self.item_id = echo.message_id

    def __call__(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()

    def of_text(self, kind: str, **fields: Any) -> bytes:
        """An event of the answer's one text part (the message's first content part)."""
        return self(kind, item_id=self.item_id, output_index=0, content_index=0, **fields)


def _chunks(lines: Iterable[bytes]) -> Iterable[dict[str, Any]]:
    for line in lines:
        if line.startswith(b"data: {"):
            yield json.loads(line[6:])


async def stream_events(
    chat: AsyncIterable[str | bytes | memoryview], echo: Echo
) -> AsyncIterator[bytes]:
    """The chat stream's chunks as the Responses stream's events: created, the message and its
    text part added, a delta per chunk, the text, part and message done, then completed (or
    incomplete at max_output_tokens); an engine error mid-stream is an `error` event and a
    failed response."""
    event, created = _Events(echo), time.time()
    in_progress = response_object(echo, created, "in_progress", [], None)
    yield event("response.created", response=in_progress)
    yield event("response.in_progress", response=in_progress)
    yield event(
        "response.output_item.added", output_index=0, item=_message_item(echo, "", "in_progress")
    )
    part = {"type": "output_text", "text": "", "annotations": []}
    yield event.of_text("response.content_part.added", part=part)
    text: list[str] = []
    usage: dict[str, Any] = {}
    finish_reason = None
    pending = b""
    try:
        async for data in chat:
            pending += data.encode() if isinstance(data, str) else bytes(data)
            cut = pending.rfind(b"\n") + 1
            lines, pending = pending[:cut].splitlines(), pending[cut:]
            for chunk in _chunks(lines):
                if "error" in chunk:
                    error = chunk["error"]
                    yield event(
                        "error", code=error.get("code"), message=error.get("message"), param=None
                    )
                    failed = response_object(echo, created, "failed", [], None)
                    failed["error"] = {"code": error.get("code"), "message": error.get("message")}
                    yield event("response.failed", response=failed)
                    return
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    finish_reason = choice.get("finish_reason") or finish_reason
                    if delta := (choice.get("delta") or {}).get("content"):
                        text.append(delta)
                        yield event.of_text("response.output_text.delta", delta=delta, logprobs=[])
    finally:
        if hasattr(chat, "aclose"):
            await chat.aclose()  # the chat path's bookkeeping ends with its stream
    answer = "".join(text)
    yield event.of_text("response.output_text.done", text=answer, logprobs=[])
    part = {"type": "output_text", "text": answer, "annotations": []}
    yield event.of_text("response.content_part.done", part=part)
    item = {**_message_item(echo, answer, "completed"), "content": [part]}
    yield event("response.output_item.done", output_index=0, item=item)
    done = response_object(echo, created, "completed", [item], _usage(usage), finish_reason)
    yield event(f"response.{done['status']}", response=done)


async def create_response(request: Request) -> Response:
    """`POST /v1/responses` (a plain Starlette route, as the chat completions one)."""
    given: dict[str, Any] = {}

    async def read(request: Request) -> dict[str, Any]:
        given.update(await parse_json_body(request))
        return chat_body(given)

    response = await serve_chat(request, read)
    if response.status_code != 200:  # OpenAI's error shape on both APIs
        return response
    echo = Echo.of(given, response.headers["x-request-id"])
    if isinstance(response, StreamingResponse):
        response.body_iterator = stream_events(response.body_iterator, echo)
        return response
    body = json.dumps(_completed(echo, json.loads(bytes(response.body)))).encode()
    response.body = body
    response.headers["content-length"] = str(len(body))
    return response


router.add_route(f"{router.prefix}/responses", create_response, methods=["POST"])

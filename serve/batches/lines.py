"""A batch input file: one JSON request per line, as OpenAI's Batch API takes it,

    {"custom_id": "invoice-1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "<a deployment>", "messages": [...], ...}}

read and checked at upload, so a batch never starts on a file it cannot run: every error is a 400
naming the line (1-based) and what is wrong with it. The body is the chat path's: the gateway checks
what it reads (the deployment, `messages`, the images at run time) and the engine the rest.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from lorafleet.errors import InvalidRequest

__all__ = ["RequestLine", "read_lines", "ENDPOINT", "MAX_CUSTOM_ID"]

ENDPOINT = "/v1/chat/completions"  # the one endpoint batches run
MAX_CUSTOM_ID = 512
_MAX_DEPTH = 64  # as the chat path's (`chat.MAX_JSON_DEPTH`)


@dataclass(frozen=True)
class RequestLine:
    """One request of a batch: its position in the file (0-based), the client's id for it, and
    the chat body."""

    line: int
    custom_id: str
    body: dict[str, Any]


def _refuse(number: int, message: str) -> InvalidRequest:
    return InvalidRequest(f"line {number}: {message}", code="invalid_batch_line", param="file")


def _too_deep(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((v, depth + 1) for v in children if isinstance(v, (dict, list)))
    return False


def read_lines(
    data: bytes, max_line_bytes: int, max_lines: int, deployments: Collection[str] | None
) -> list[RequestLine]:
    """The file's request lines (blank lines skipped), checked: JSON objects of OpenAI's shape, a
    unique `custom_id` each, `model` one of the tenant's `deployments` (None: any name), no line
    over `max_line_bytes`, at most `max_lines` (0: no limit)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"the file is not UTF-8 text (byte {exc.start})", code="invalid_batch_file"
        ) from exc
    lines: list[RequestLine] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if max_lines and len(lines) == max_lines:
            raise InvalidRequest(
                f"line {number}: the file has more than {max_lines} requests, this tenant's limit "
                "of lines in one batch",
                code="batch_too_large",
                param="file",
            )
        if len(raw.encode()) > max_line_bytes:
            raise _refuse(number, f"larger than the limit of {max_line_bytes} bytes")
        try:
            request = json.loads(raw)
        except ValueError as exc:
            raise _refuse(number, f"not valid JSON ({exc})") from exc
        except RecursionError as exc:
            raise _refuse(number, "nested too deeply") from exc
        if not isinstance(request, dict):
            raise _refuse(number, "not a JSON object")
        if _too_deep(request, _MAX_DEPTH + 1):
            raise _refuse(number, f"nested deeper than {_MAX_DEPTH} levels")
        unknown = set(request) - {"custom_id", "method", "url", "body"}
        if unknown:
            raise _refuse(number, f"unknown field(s) {', '.join(sorted(unknown))}")
        custom_id = request.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
            raise _refuse(number, f"'custom_id' must be a string of 1-{MAX_CUSTOM_ID} characters")
        if custom_id in seen:
            raise _refuse(number, f"custom_id {custom_id!r} is not unique in the file")
        seen.add(custom_id)
        if request.get("method") != "POST":
            raise _refuse(number, "'method' must be \"POST\"")
        if request.get("url") != ENDPOINT:
            raise _refuse(number, f"'url' must be {ENDPOINT!r}: batches run chat completions")
        body = request.get("body")
        if not isinstance(body, dict):
            raise _refuse(number, "'body' must be a chat completion request (a JSON object)")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _refuse(number, "'body.model' must name one of your deployments")
        if deployments is not None and model not in deployments:
            raise _refuse(number, f"deployment {model!r} does not exist")
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise _refuse(number, "'body.messages' must be a non-empty list")
        if body.get("stream"):
            raise _refuse(number, "'body.stream' must be false: batch answers are written whole")
        lines.append(RequestLine(len(lines), custom_id, body))
    if not lines:
        raise InvalidRequest("the file has no request lines", code="invalid_batch_file")
    return lines

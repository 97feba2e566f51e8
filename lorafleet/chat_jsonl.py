"""Chat JSONL, the one data format of lorafleet: training sets, validation sets and requests alike.

One line = one request: `{"messages": [{"role": "user", "content": [{"type": "image_url",
"image_url": {"url": ...}}, {"type": "text", "text": ...}]}, {"role": "assistant", "content":
"..."}]}`. Image URLs are data URLs or paths relative to the JSONL file; a file from a client (a
validation set uploaded to the gateway) may hold data URLs only (`local_images=False`), so it can
never name a server file or a URL the gateway would fetch. The gateway and the trainer both parse it
here, and every walk over a message's content goes through `content_parts`.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from lorafleet.errors import DataError

__all__ = [
    "Example",
    "MAX_LINE_BYTES",
    "MAX_JSON_DEPTH",
    "load_jsonl",
    "data_hash",
    "prompt_of",
    "answer_of",
    "request_messages",
    "image_data_url",
    "content_parts",
    "count_images",
]

_ROLES = {"system", "user", "assistant"}
MAX_LINE_BYTES = 32 * 1024 * 1024  # one example, its images inlined
# a chat line nests about 6 deep; deeper input only overflows recursion downstream
MAX_JSON_DEPTH = 64


@dataclass(frozen=True)
class Example:
    messages: list[dict[str, Any]]  # as in the file
    images: list[Image.Image]  # in order of appearance
    source: str  # "file:line"


def content_parts(message: Any) -> list[Any]:
    """The parts of one message's content: a string is one text part; anything else that is not a
    list has none. Parts are returned as they are (callers that accept untrusted input check that
    each is a dict)."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content if isinstance(content, list) else []


def _load_image(url: str, folder: Path, source: str, local_images: bool) -> Image.Image:
    if not local_images and not url.startswith("data:"):
        raise DataError(
            source,
            f"image {url[:60]!r}: images must be data URLs (data:image/png;base64,...); "
            "file paths and http(s) or file: URLs are refused",
        )
    try:
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if ";base64" not in header:
                raise DataError(source, "data URLs must be base64-encoded")
            raw = io.BytesIO(base64.b64decode(payload, validate=True))
        elif url.startswith(("http://", "https://")):
            raise DataError(
                source,
                f"remote image {url[:60]!r}: download it and use a relative path or data URL",
            )
        else:
            path = (folder / url.removeprefix("file://")).resolve()
            if not path.is_file():
                raise DataError(source, f"image file not found: {url}")
            raw = io.BytesIO(path.read_bytes())
        image = Image.open(raw)
        image.load()
        return image.convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise DataError(source, f"unreadable image: {exc}") from exc


def _depth(value: Any) -> int:
    """How deep a parsed JSON value nests (iteratively: it checks values too deep to recurse
    over)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth <= MAX_JSON_DEPTH:
            members = (
                item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
            )
            stack.extend((member, depth + 1) for member in members)
    return deepest


def _parse_json(line: str, source: str) -> Any:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(source, f"not valid JSON ({exc.msg})") from exc
    except RecursionError as exc:
        raise DataError(source, "not valid JSON (nested too deeply)") from exc
    except ValueError as exc:  # e.g. an integer past Python's digit limit
        raise DataError(source, f"not valid JSON ({exc})") from exc
    if _depth(record) > MAX_JSON_DEPTH:
        raise DataError(source, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return record


def _parse_line(line: str, folder: Path, source: str, local_images: bool = True) -> Example:
    record = _parse_json(line, source)
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataError(source, "expected an object with a non-empty 'messages' list")
    images = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise DataError(source, f"message {i}: role must be one of {sorted(_ROLES)}")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not content:
            raise DataError(source, f"message {i}: content must be a string or a list of parts")
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                continue
            if kind == "image_url":
                url = (
                    part.get("image_url", {}).get("url")
                    if isinstance(part.get("image_url"), dict)
                    else None
                )
                if not isinstance(url, str):
                    raise DataError(source, f"message {i}: image_url.url must be a string")
                if message["role"] != "user":
                    raise DataError(source, f"message {i}: images belong in user messages")
                images.append(_load_image(url, folder, source, local_images))
                continue
            raise DataError(source, f"message {i}: unsupported content part {part!r:.60}")
    if messages[-1]["role"] != "assistant" or not isinstance(messages[-1]["content"], str):
        raise DataError(source, "the last message must be the assistant's answer, as a string")
    return Example(messages=messages, images=images, source=source)


def _lines(path: Path) -> Iterator[tuple[str, str]]:
    """(source, text) of each non-blank line, refusing one that is too long or not UTF-8."""
    with open(path, "rb") as file:
        for number, raw in enumerate(iter(lambda: file.readline(MAX_LINE_BYTES + 1), b""), start=1):
            source = f"{path.name}:{number}"
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(source, f"line of {len(raw)} bytes; the limit is {MAX_LINE_BYTES}")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(source, f"not UTF-8 text (byte {exc.start} of the line)") from exc
            if line.strip():
                yield source, line


def load_jsonl(path: Path, local_images: bool = True) -> list[Example]:
    """Parse and check every line; the first bad one raises DataError naming file and line. With
    `local_images=False` (a file a client sent) images must be data URLs."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "file not found")
    examples = [
        _parse_line(line, path.parent, source, local_images) for source, line in _lines(path)
    ]
    if not examples:
        raise DataError(str(path), "no examples")
    return examples


def prompt_of(example: Example) -> list[dict[str, Any]]:
    """The request a client would send: everything before the final answer."""
    return example.messages[:-1]


def image_data_url(image: Image.Image) -> str:
    """An image as a PNG data URL, the way clients send images to the server."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_messages(example: Example) -> list[dict[str, Any]]:
    """The prompt as a client would send it to the server: images inlined as PNG data URLs."""
    images = iter(example.images)
    messages = copy.deepcopy(prompt_of(example))
    for message in messages:
        for part in content_parts(message):
            if part["type"] == "image_url":
                part["image_url"] = {"url": image_data_url(next(images))}
    return messages


def answer_of(example: Example) -> str:
    return example.messages[-1]["content"]


def count_images(messages: list[dict]) -> int:
    return sum(
        part["type"] == "image_url" for message in messages for part in content_parts(message)
    )


def data_hash(path: Path) -> str:
    """sha256 of a data file and of the image files it references (what the manifest records).
    Call it on files `load_jsonl` accepted; images are hashed as bytes, not decoded."""
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes())
    for line in path.read_text(encoding="utf-8").splitlines():
        for message in json.loads(line)["messages"] if line.strip() else []:
            for part in content_parts(message):
                url = part["image_url"]["url"] if part["type"] == "image_url" else "data:"
                if not url.startswith("data:"):
                    digest.update((path.parent / url.removeprefix("file://")).read_bytes())
    return digest.hexdigest()

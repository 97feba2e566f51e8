"""Training data: the same OpenAI chat JSONL the server receives, rendered by the base's own processor.

One line = one request: `{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url":
{"url": ...}}, {"type": "text", "text": ...}]}, {"role": "assistant", "content": "..."}]}`.
Image URLs are data URLs or paths relative to the JSONL file. Labels are -100 except on assistant turns.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from adapters.errors import InvalidRequest

__all__ = ["DataError", "Example", "load_jsonl", "encode", "collate", "data_hash", "prompt_of", "answer_of",
           "request_messages", "image_data_url"]

IGNORE = -100
_ROLES = {"system", "user", "assistant"}


class DataError(InvalidRequest):
    """A bad line in a data file; the message names the file, the line and the reason."""

    code = "invalid_data"

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")


@dataclass(frozen=True)
class Example:
    messages: list[dict[str, Any]]  # as in the file
    images: list[Image.Image]  # in order of appearance
    source: str  # "file:line"


def _load_image(url: str, folder: Path | None, source: str) -> Image.Image:
    try:
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if ";base64" not in header:
                raise DataError(source, "data URLs must be base64-encoded")
            raw = io.BytesIO(base64.b64decode(payload, validate=True))
        elif url.startswith(("http://", "https://")):
            raise DataError(source, f"remote image {url[:60]!r}: download it and use a relative path or data URL")
        else:
            path = (folder / url.removeprefix("file://")).resolve()
            if not path.is_file():
                raise DataError(source, f"image file not found: {url}")
            raw = io.BytesIO(path.read_bytes())
        image = Image.open(raw)
        image.load()
        return image.convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError) as exc:
        raise DataError(source, f"unreadable image: {exc}") from exc


def _parse_line(line: str, folder: Path, source: str) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(source, f"not valid JSON ({exc.msg})") from exc
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
                url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else None
                if not isinstance(url, str):
                    raise DataError(source, f"message {i}: image_url.url must be a string")
                if message["role"] != "user":
                    raise DataError(source, f"message {i}: images belong in user messages")
                images.append(_load_image(url, folder, source))
                continue
            raise DataError(source, f"message {i}: unsupported content part {part!r:.60}")
    if messages[-1]["role"] != "assistant" or not isinstance(messages[-1]["content"], str):
        raise DataError(source, "the last message must be the assistant's answer, as a string")
    return Example(messages=messages, images=images, source=source)


def load_jsonl(path: Path) -> list[Example]:
    """Parse and check every line; the first bad one raises DataError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "file not found")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            examples.append(_parse_line(line, path.parent, f"{path.name}:{number}"))
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
        for part in message["content"] if isinstance(message["content"], list) else []:
            if part["type"] == "image_url":
                part["image_url"] = {"url": image_data_url(next(images))}
    return messages


def answer_of(example: Example) -> str:
    return example.messages[-1]["content"]


def _count_images(messages: list[dict]) -> int:
    return sum(1 for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image_url")


def _ids(processor, messages: list[dict], images: list[Image.Image], generation_prompt: bool) -> dict:
    # apply_chat_template rewrites image parts in place: render a copy, never the caller's messages
    text = processor.apply_chat_template(copy.deepcopy(messages), tokenize=False,
                                         add_generation_prompt=generation_prompt)
    return processor(text=[text], images=images or None, return_tensors="pt")


def encode(processor, example: Example, max_length: int) -> dict:
    """Token ids, labels (assistant tokens only), and image tensors of one example."""
    full = _ids(processor, example.messages, example.images, generation_prompt=False)
    input_ids = full["input_ids"][0]
    if len(input_ids) > max_length:
        raise DataError(example.source, f"{len(input_ids)} tokens, above max_length {max_length}")
    labels = input_ids.clone().fill_(IGNORE)
    for i, message in enumerate(example.messages):
        if message["role"] != "assistant":
            continue
        seen = _count_images(example.messages[:i])
        start = _ids(processor, example.messages[:i], example.images[:seen], generation_prompt=True)["input_ids"].shape[1]
        end = _ids(processor, example.messages[: i + 1], example.images[:seen], generation_prompt=False)["input_ids"].shape[1]
        labels[start:end] = input_ids[start:end]  # the answer and its end-of-turn token
    item = {"input_ids": input_ids, "labels": labels, "mm_token_type_ids": full["mm_token_type_ids"][0]}
    if example.images:
        item["pixel_values"], item["image_grid_thw"] = full["pixel_values"], full["image_grid_thw"]
    return item


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-pad a batch; image patches of all examples are concatenated (Qwen2-VL's layout)."""
    import torch

    length = max(len(item["input_ids"]) for item in items)
    batch = {
        "input_ids": torch.full((len(items), length), pad_id, dtype=torch.long),
        "labels": torch.full((len(items), length), IGNORE, dtype=torch.long),
        "attention_mask": torch.zeros((len(items), length), dtype=torch.long),
        "mm_token_type_ids": torch.zeros((len(items), length), dtype=torch.long),  # 1 marks image tokens
    }
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        batch["input_ids"][row, :n] = item["input_ids"]
        batch["labels"][row, :n] = item["labels"]
        batch["attention_mask"][row, :n] = 1
        batch["mm_token_type_ids"][row, :n] = item["mm_token_type_ids"]
    with_images = [item for item in items if "pixel_values" in item]
    if with_images:
        batch["pixel_values"] = torch.cat([item["pixel_values"] for item in with_images])
        batch["image_grid_thw"] = torch.cat([item["image_grid_thw"] for item in with_images])
    return batch


def data_hash(path: Path) -> str:
    """sha256 of a data file and of the image files it references (what the manifest records).
    Call it on files `load_jsonl` accepted; images are hashed as bytes, not decoded."""
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes())
    for line in path.read_text(encoding="utf-8").splitlines():
        for message in json.loads(line)["messages"] if line.strip() else []:
            for part in message["content"] if isinstance(message["content"], list) else []:
                url = part["image_url"]["url"] if part["type"] == "image_url" else "data:"
                if not url.startswith("data:"):
                    digest.update((path.parent / url.removeprefix("file://")).read_bytes())
    return digest.hexdigest()

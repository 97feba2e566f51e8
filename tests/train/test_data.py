"""Training data: every bad line is refused naming file, line and reason; labels cover assistant
turns only."""

from __future__ import annotations

import json

import pytest

from lorafleet.chat_jsonl import Example, load_jsonl, request_messages
from lorafleet.errors import DataError
from lorafleet.train.data import encode
from tests.helpers import image_data_url


def _user(url: str = "", text: str = "What is in the image?") -> dict:
    parts = (
        [{"type": "image_url", "image_url": {"url": url or image_data_url()}}]
        if url != "none"
        else []
    )
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def _write(tmp_path, *records) -> object:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


GOOD = {"messages": [_user(), {"role": "assistant", "content": "a red circle"}]}


@pytest.mark.parametrize(
    "record, reason",
    [
        ("{not json", "not valid JSON"),
        ({"prompt": "x"}, "non-empty 'messages' list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role must be one of"),
        (
            {"messages": [_user(), {"role": "user", "content": "x"}]},
            "last message must be the assistant's answer",
        ),
        (
            {
                "messages": [
                    _user("https://example.com/a.png"),
                    {"role": "assistant", "content": "x"},
                ]
            },
            "remote image",
        ),
        (
            {"messages": [_user("missing.png"), {"role": "assistant", "content": "x"}]},
            "image file not found",
        ),
        (
            {
                "messages": [
                    _user("data:image/png;base64,!!!"),
                    {"role": "assistant", "content": "x"},
                ]
            },
            "unreadable image",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "audio"}]},
                    {"role": "assistant", "content": "x"},
                ]
            },
            "unsupported content part",
        ),
        (
            {
                "messages": [
                    _user(),
                    {
                        "role": "assistant",
                        "content": [{"type": "image_url", "image_url": {"url": "a"}}],
                    },
                ]
            },
            "images belong in user messages",
        ),
    ],
)
def test_bad_line_names_file_line_and_reason(tmp_path, record, reason):
    path = _write(tmp_path, GOOD, record)
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    assert info.value.message.startswith("data.jsonl:2: ") and reason in info.value.message


def test_relative_image_paths_resolve_beside_the_file(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), "blue").save(tmp_path / "img.png")
    example = load_jsonl(
        _write(tmp_path, {"messages": [_user("img.png"), {"role": "assistant", "content": "x"}]})
    )[0]
    assert example.images[0].getpixel((0, 0)) == (0, 0, 255)


def test_labels_cover_only_the_assistant_turns(tiny_model):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model)
    messages = [
        _user(),
        {"role": "assistant", "content": "a red circle"},
        _user("none", "And the colour?"),
        {"role": "assistant", "content": "red"},
    ]
    item = encode(processor, Example(messages, load_images(messages), "x"), max_length=512)
    labelled = processor.tokenizer.decode(item["input_ids"][item["labels"] != -100])
    assert labelled == "a red circle<|im_end|>\nred<|im_end|>\n"
    # image tokens marked
    assert int(item["mm_token_type_ids"].sum()) == int(item["image_grid_thw"].prod()) // 4


def load_images(messages):
    from lorafleet.chat_jsonl import _load_image

    return [
        _load_image(p["image_url"]["url"], None, "x", True)
        for m in messages
        if isinstance(m["content"], list)
        for p in m["content"]
        if p["type"] == "image_url"
    ]


def test_examples_over_max_length_are_refused_not_truncated(tiny_model, tmp_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model)
    example = load_jsonl(_write(tmp_path, GOOD))[0]
    with pytest.raises(DataError, match="above max_length 20"):
        encode(processor, example, max_length=20)


def test_request_messages_inline_images_and_drop_the_answer(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), "blue").save(tmp_path / "img.png")
    example = load_jsonl(
        _write(tmp_path, {"messages": [_user("img.png"), {"role": "assistant", "content": "x"}]})
    )[0]
    request = request_messages(example)
    assert [m["role"] for m in request] == ["user"]
    assert request[0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    # the example is not mutated
    assert example.messages[0]["content"][0]["image_url"]["url"] == "img.png"

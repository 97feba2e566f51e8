"""Uploaded validation sets: checked line by line, images as data URLs only, nothing stored when
refused."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from starlette.datastructures import UploadFile

from lorafleet.adapters.store import BlobStore
from lorafleet.chat_jsonl import MAX_JSON_DEPTH, image_data_url, load_jsonl
from lorafleet.errors import InvalidRequest
from lorafleet.serve.api.rollouts import _store_validation
from lorafleet.serve.validation import canonical_validation, read_items


def _line(url: str, answer: str = "a red circle") -> dict:
    user = {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "What is in the image?"},
        ],
    }
    return {"messages": [user, {"role": "assistant", "content": answer}]}


def _jsonl(*records: dict) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


@pytest.fixture
def gateway(tmp_path: Path) -> SimpleNamespace:
    """What `_store_validation` uses of the gateway: its scratch folder and the real validation
    store."""
    (tmp_path / "tmp").mkdir()
    return SimpleNamespace(
        tmp_dir=tmp_path / "tmp", validation_store=BlobStore(tmp_path / "validation", ".jsonl")
    )


def _push(gateway: SimpleNamespace, data: bytes, filename: str = "v.jsonl") -> tuple[str, int, int]:
    return _store_validation(
        gateway, UploadFile(io.BytesIO(data), filename=filename), "exact_match"
    )


def _refused(
    gateway: SimpleNamespace, data: bytes, reason: str, filename: str = "v.jsonl"
) -> InvalidRequest:
    with pytest.raises(InvalidRequest, match=reason) as error:
        _push(gateway, data, filename)
    assert error.value.status == 400
    assert list(gateway.validation_store.root.iterdir()) == []  # nothing stored
    assert list(gateway.tmp_dir.iterdir()) == []  # nor left in scratch
    return error.value


DATA_URL = image_data_url(Image.new("RGB", (8, 8), "red"))


def test_data_url_set_is_stored_and_replays_its_items(gateway):
    good = _line(DATA_URL)
    digest, items, size = _push(gateway, _jsonl(good, good))
    assert items == 2 and gateway.validation_store.path(digest).stat().st_size == size
    replayed = read_items(gateway.validation_store.read(digest))
    assert replayed[0].answer == "a red circle" and replayed[0].messages == good["messages"][:-1]


@pytest.mark.parametrize(
    "url",
    [
        "/etc/passwd",
        "../../x.png",
        "x.png",
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data/",
        "https://example.com/a.png",
    ],
)
def test_image_that_is_not_a_data_url_is_refused_naming_the_line(gateway, url, tmp_path):
    # a server file the relative path could reach
    (gateway.tmp_dir.parent / "x.png").write_bytes(b"")
    error = _refused(
        gateway, _jsonl(_line(DATA_URL), _line(url)), "v.jsonl:2: image .*must be data URLs"
    )
    assert error.code == "invalid_data"


def test_data_url_that_is_no_image_is_refused(gateway):
    _refused(
        gateway, _jsonl(_line("data:text/plain;base64,aGVsbG8=")), "v.jsonl:1: unreadable image"
    )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}\n', "v.jsonl:1: not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000 + b"\n", "v.jsonl:1: not valid JSON"),
        (
            b'{"messages": ' + b"[" * (MAX_JSON_DEPTH + 5) + b"]" * (MAX_JSON_DEPTH + 5) + b"}\n",
            "nested deeper",
        ),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "n": ' + b"1" * 5000 + b"}\n",
            "not valid JSON",
        ),
        (b"\n\n", "no examples"),
    ],
)
def test_malformed_file_is_a_400_not_a_500(gateway, data, reason):
    _refused(gateway, data, reason)


def test_huge_line_is_refused_by_its_length(gateway, monkeypatch):
    # the real limit is 32 MiB: the same check, smaller
    monkeypatch.setattr("lorafleet.chat_jsonl.MAX_LINE_BYTES", 1000)
    _refused(
        gateway,
        _jsonl(_line(DATA_URL, answer="x" * 2000)),
        "v.jsonl:1: line of .* bytes; the limit is 1000",
    )


@pytest.mark.parametrize("filename", ["..", ".", "", "a/../..", "nul\x00.jsonl", "x" * 300])
def test_odd_file_names_cannot_escape_the_scratch_folder(gateway, filename):
    _refused(gateway, b"{}\n", "validation.jsonl:1: expected an object", filename=filename)


def test_trainer_still_reads_images_next_to_its_file(tmp_path):
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "img.png")
    path = tmp_path / "train.jsonl"
    path.write_bytes(_jsonl(_line("img.png")))
    assert load_jsonl(path)[0].images[0].size == (8, 8)
    with pytest.raises(InvalidRequest, match="must be data URLs"):
        load_jsonl(path, local_images=False)
    with pytest.raises(InvalidRequest, match="unknown metric"):
        canonical_validation(path, "bleu")

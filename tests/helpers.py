"""Small helpers shared by the integration tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
from PIL import Image

from lorafleet.chat import image_data_url as data_url
from lorafleet.serve.client import pack_adapter


def image_data_url(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 64)) -> str:
    return data_url(Image.new("RGB", size, color))


def image_messages(text: str = "What is in the image?", color: tuple[int, int, int] = (200, 30, 30)) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url(color)}},
                                         {"type": "text", "text": text}]}]


def upload_archive(http: httpx.Client, name: str, archive: Path) -> httpx.Response:
    with open(archive, "rb") as f:
        return http.post("/v1/adapters", data={"name": name}, files={"file": ("a.tar.gz", f, "application/gzip")})


def upload_folder(http: httpx.Client, name: str, folder: Path) -> dict:
    archive = pack_adapter(folder)
    try:
        response = upload_archive(http, name, archive)
    finally:
        archive.unlink()
    assert response.status_code in (200, 201), response.text
    return response.json()


def assert_openai_error(response: httpx.Response, status: int, phrase: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert phrase in error["message"], error["message"]
    return error


def poll_until(check: Callable[[], object], timeout: float, what: str) -> object:
    """`check()`'s first truthy result, asked every quarter second; AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {timeout} s")

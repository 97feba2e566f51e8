"""Admitting a chat request's images: every shape the engine reads, each limit, bombs, and remote
fetches that can only reach allowed, public hosts (proved against a real HTTP server on
loopback)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import ipaddress
import random
import struct
import zlib
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web
from PIL import Image
from yarl import URL

from lorafleet.errors import InvalidRequest
from lorafleet.serve.images import (
    PIXEL_CEILING,
    ImageLimits,
    RemoteImages,
    admit_images,
    is_public_address,
)
from lorafleet.serve.settings import Settings

LIMITS = ImageLimits(max_images=8, max_image_bytes=10 * 1024 * 1024, max_image_pixels=16_000_000)
LOOPBACK = ipaddress.ip_address("127.0.0.1")


def _png(size: tuple[int, int] = (64, 64), noisy: bool = False) -> bytes:
    image = Image.new("RGB", size, (200, 30, 30))
    if noisy:  # incompressible: the PNG is about 3 bytes per pixel
        image = Image.frombytes("RGB", size, random.Random(0).randbytes(size[0] * size[1] * 3))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _bomb(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, in a few hundred bytes (its pixel data is a
    stub)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _body(*parts: object) -> dict:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "hi"}]}],
    }


async def _refused(
    body: dict,
    code: str,
    limits: ImageLimits = LIMITS,
    remote: RemoteImages | None = None,
    phrase: str = "",
) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        await admit_images(body, limits, remote)
    assert caught.value.code == code, caught.value.message
    assert caught.value.status == 400
    assert phrase in caught.value.message
    return caught.value


# --- every shape the engine reads an image from ---

SHAPES: dict[str, Callable[[str], dict]] = {
    "image_url object": _image_part,
    "input_image (Responses)": lambda url: {
        "type": "input_image",
        "image_url": url,
        "detail": "auto",
    },
    "untyped, image_url string": lambda url: {"image_url": url},
    "untyped, image_url object": lambda url: {"image_url": {"url": url}},
}


@pytest.mark.parametrize("shape", SHAPES)
async def test_each_image_shape_is_counted(shape):
    body = _body(SHAPES[shape](_data_url(_png())))
    assert await admit_images(body, LIMITS, None) == 1


@pytest.mark.parametrize("shape", SHAPES)
async def test_each_image_shape_is_checked(shape):
    await _refused(
        _body(SHAPES[shape](_data_url(b"not an image"))),
        "invalid_image",
        phrase="not a readable image",
    )


async def test_images_in_every_message_count_and_text_costs_nothing():
    url = _data_url(_png())
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "plain string content"},
            {
                "role": "user",
                "content": [
                    "a bare string part",
                    {"type": "input_text", "text": "t"},
                    _image_part(url),
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "refusal", "refusal": "no"},
                    {"type": "thinking", "thinking": ""},
                ],
            },
            {"role": "user", "content": [{"image_url": url}]},
        ],
    }
    assert await admit_images(body, LIMITS, None) == 2
    assert (
        await admit_images({"messages": [{"role": "user", "content": "hello"}]}, LIMITS, None) == 0
    )


@pytest.mark.parametrize(
    "part, kind",
    [
        ({"type": "video_url", "video_url": {"url": "http://10.0.0.1/v.mp4"}}, "video_url"),
        ({"type": "audio_url", "audio_url": {"url": "http://10.0.0.1/a.wav"}}, "audio_url"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "input_audio"),
        ({"type": "image_embeds", "image_embeds": "AAAA"}, "image_embeds"),
        ({"type": "audio_embeds", "audio_embeds": "AAAA"}, "audio_embeds"),
        ({"type": "video_embeds", "video_embeds": "AAAA"}, "video_embeds"),
        ({"type": "prompt_embeds", "data": "AAAA"}, "prompt_embeds"),
        ({"type": "image_pil", "image_pil": "x"}, "image_pil"),
        # untyped: the engine reads it by its key
        ({"video_url": "http://10.0.0.1/v.mp4"}, "video_url"),
        ({"image_embeds": "AAAA"}, "image_embeds"),
        ({"type": "image", "image": "x"}, "image"),
        ({"type": "file", "file": {"file_id": "f"}}, "file"),
    ],
)
async def test_other_media_and_unknown_parts_are_refused_by_name(part, kind):
    await _refused(_body(part), "unsupported_content_part", phrase=repr(kind))


async def test_a_part_uuid_is_refused_since_the_engine_media_cache_is_shared():
    part = {**_image_part(_data_url(_png())), "uuid": "someone-elses-image"}
    await _refused(_body(part), "unsupported_content_part", phrase="uuid")
    await _refused(
        _body({"type": "image_url", "image_url": None, "uuid": "cached"}),
        "unsupported_content_part",
    )


@pytest.mark.parametrize("field", ["mm_processor_kwargs", "media_io_kwargs"])
async def test_per_request_processor_overrides_are_refused(field):
    await _refused({**_body(), field: {"max_pixels": 10**9}}, "unsupported_parameter", phrase=field)
    assert await admit_images({**_body(), field: None}, LIMITS, None) == 0


@pytest.mark.parametrize(
    "part, code",
    [
        (7, "invalid_content_part"),
        ({"text": "no type"}, "invalid_content_part"),
        ({"type": 3, "text": "x"}, "invalid_content_part"),
        # typed: an object
        ({"type": "image_url", "image_url": "data:image/png;base64,AAAA"}, "invalid_image"),
        ({"type": "image_url", "image_url": {"url": 5}}, "invalid_image"),
        ({"type": "input_image", "file_id": "file-1", "detail": "auto"}, "invalid_image"),
    ],
)
async def test_malformed_parts_are_refused(part, code):
    await _refused(_body(part), code)


# --- limits ---


async def test_too_many_images_is_refused_and_zero_means_no_count_limit():
    body = _body(*[_image_part(_data_url(_png())) for _ in range(9)])
    await _refused(body, "too_many_images", phrase="9 images, the limit is 8")
    assert (
        await admit_images(
            body, ImageLimits(0, LIMITS.max_image_bytes, LIMITS.max_image_pixels), None
        )
        == 9
    )


async def test_an_image_over_the_byte_limit_is_refused():
    raw = _png((40, 40), noisy=True)
    small = ImageLimits(8, len(raw) - 1, 16_000_000)
    await _refused(
        _body(_image_part(_data_url(raw))),
        "image_too_large",
        small,
        phrase=f"limit is {len(raw) - 1}",
    )
    assert (
        await admit_images(
            _body(_image_part(_data_url(raw))), ImageLimits(8, len(raw), 16_000_000), None
        )
        == 1
    )


async def test_an_oversized_data_url_is_refused_before_it_is_decoded():
    # not even base64: never decoded
    body = _body(_image_part("data:image/png;base64," + "!" * 40_000))
    await _refused(body, "image_too_large", ImageLimits(8, 1000, 16_000_000))


async def test_a_large_image_is_checked_off_the_event_loop_and_accepted():
    raw = _png((400, 400), noisy=True)  # ~480 KB: past the inline threshold
    assert await admit_images(_body(_image_part(_data_url(raw))), LIMITS, None) == 1


async def test_pixels_are_read_from_the_header_so_a_small_bomb_is_refused():
    raw = _bomb(5000, 5000)
    assert len(raw) < 200
    await _refused(
        _body(_image_part(_data_url(raw))), "image_too_many_pixels", phrase="5000 x 5000"
    )


async def test_pillows_own_bomb_error_is_the_same_400():
    await _refused(_body(_image_part(_data_url(_bomb(50000, 50000)))), "image_too_many_pixels")


@pytest.mark.parametrize("warnings", ["error", "ignore"])
async def test_pillows_bomb_warning_is_the_same_400_whatever_the_warning_filter(warnings):
    import warnings as module

    no_limit = ImageLimits(8, 10 * 1024 * 1024, 0)  # only the ceiling, where Pillow starts to warn
    with module.catch_warnings():
        module.simplefilter(warnings, Image.DecompressionBombWarning)
        await _refused(
            _body(_image_part(_data_url(_bomb(10000, 10000)))), "image_too_many_pixels", no_limit
        )


def test_limits_are_capped_at_pillows_bomb_threshold_and_never_negative():
    assert ImageLimits(1, 1, 10**12).image_pixels == PIXEL_CEILING
    assert ImageLimits(1, 1, 0).image_pixels == PIXEL_CEILING
    with pytest.raises(ValueError, match="negative"):
        ImageLimits(-1, 1, 1)


def test_limits_and_remote_fetches_come_from_the_settings():
    settings = Settings()
    assert ImageLimits.from_settings(settings) == ImageLimits(8, 10 * 1024 * 1024, 16_000_000)
    assert RemoteImages.from_settings(settings) is None  # off by default, as before
    remote = RemoteImages.from_settings(Settings(allow_remote_images=True))
    # existing installs that turned it on keep working
    assert remote is not None and remote.hosts == ("*",)


@pytest.mark.parametrize(
    "url, phrase",
    [
        ("data:image/png;base64,iVBORw0KGgo=!!", "not valid base64"),
        ("data:image/png;base64,iVBO\nRw0KGgo=", "not valid base64"),
        ("data:image/png,rawbytes", "must be base64"),
        ("data:image/png;base64", "must be base64"),
        ("data:text/plain;base64,aGVsbG8=", "media type"),
        (_data_url(b"hello, not an image"), "not a readable image"),
        (_data_url(_png((64, 64), noisy=True)[:6000]), "not a readable image"),  # truncated
        # EPS: Ghostscript
        (_data_url(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"), "not a readable image"),
    ],
)
async def test_unreadable_data_urls_are_invalid_images(url, phrase):
    await _refused(_body(_image_part(url)), "invalid_image", phrase=phrase)


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.png",
        "gopher://example.com/",
        "/etc/passwd",
        "cat.png",
        " http://example.com/a.png",
    ],
)
async def test_other_url_schemes_are_refused_even_with_remote_images_on(url):
    await _refused(_body(_image_part(url)), "unsupported_image_url", remote=RemoteImages(["*"]))


async def test_remote_images_are_refused_when_off():
    await _refused(
        _body(_image_part("https://example.com/cat.png")),
        "remote_images_disabled",
        phrase="remote image URLs are disabled",
    )


# --- public addresses and the host list ---


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fec0::1",
        "ff02::1",
        "2001:db8::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::1",
        "64:ff9b::a00:1",
    ],
)
def test_non_public_addresses_are_not_public(address):
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_public_addresses_are_public(address):
    assert is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "hosts, host, allowed",
    [
        (["*"], "anything.example.org", True),
        (["*.example.com"], "a.example.com", True),
        (["*.example.com"], "a.b.example.com", True),
        (["*.example.com"], "A.Example.COM.", True),
        (["*.example.com"], "example.com", False),
        (["*.example.com"], "badexample.com", False),
        (["*.example.com"], "example.com.evil.org", False),
        (["cdn.example.org"], "cdn.example.org", True),
        (["cdn.example.org"], "img.cdn.example.org", False),
    ],
)
def test_the_host_list_takes_exact_names_and_subdomain_patterns(hosts, host, allowed):
    assert RemoteImages(hosts).host_allowed(host) is allowed


async def test_a_host_off_the_list_is_refused_without_a_fetch():
    remote = RemoteImages(["images.example.com"])
    await _refused(
        _body(_image_part("https://other.example.org/a.png")),
        "remote_image_refused",
        remote=remote,
        phrase="not on this server's list",
    )


# --- fetches against a real server on loopback ---


@contextlib.asynccontextmanager
async def _image_server(hits: list[str], **extra: web.StreamResponse | bytes) -> AsyncIterator[int]:
    """A loopback HTTP server: /img.png serves a PNG, the other paths what `extra` holds; yields
    its port."""

    async def handle(request: web.Request) -> web.StreamResponse:
        hits.append(request.path)
        name = request.path.strip("/")
        served = {"img.png": _png(), **extra}.get(name)
        if served is None:
            return web.Response(status=404)
        if callable(served):
            return await served(request)
        return web.Response(body=served, content_type="image/png")

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


def _loopback_allowed(hosts: list[str] | None = None, **options: float) -> RemoteImages:
    """A fetcher that may reach 127.0.0.1 (and only it): what the default refuses, allowed for
    one test server."""
    return RemoteImages(
        hosts or ["127.0.0.1", "localhost"],
        is_public=lambda address: address == LOOPBACK,
        **options,
    )


@contextlib.asynccontextmanager
async def _closing(remote: RemoteImages) -> AsyncIterator[RemoteImages]:
    try:
        yield remote
    finally:
        await remote.aclose()


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "2130706433",
        "0x7f000001",
        "017700000001",
        "127.1",
        "127.0.0.1.",
        "0.0.0.0",
    ],
)
async def test_loopback_in_any_spelling_is_refused_and_never_reached(host):
    hits: list[str] = []
    async with _image_server(hits) as port, _closing(RemoteImages(["*"])) as remote:
        await _refused(
            _body(_image_part(f"http://{host}:{port}/img.png")),
            "remote_image_refused",
            remote=remote,
        )
    assert hits == []


async def test_a_name_is_checked_when_connecting_not_before():
    # "localhost" passes the URL check (a name); the connection's own DNS answer is what is refused,
    # so a name that resolves to something else by the time of the fetch (rebinding) is refused the
    # same way
    hits: list[str] = []
    async with _image_server(hits) as port, _closing(RemoteImages(["localhost"])) as remote:
        await _refused(
            _body(_image_part(f"http://localhost:{port}/img.png")),
            "remote_image_refused",
            remote=remote,
            phrase="resolves to no public address",
        )
    assert hits == []


@pytest.mark.parametrize("host", ["cafe.be", "1e100.net", "0x.example.com"])
def test_names_that_look_numeric_are_still_names(host):
    # their addresses are checked on connect
    RemoteImages(["*"]).check_url(URL(f"https://{host}/a.png"), "here")


async def test_credentials_in_a_url_are_refused():
    await _refused(
        _body(_image_part("http://user:pw@images.example.com/a.png")),
        "remote_image_refused",
        remote=RemoteImages(["*"]),
        phrase="credentials",
    )


@pytest.mark.parametrize("shape", SHAPES)
async def test_an_allowed_image_is_fetched_by_the_gateway_and_inlined(shape):
    hits: list[str] = []
    async with _image_server(hits) as port, _closing(_loopback_allowed()) as remote:
        body = _body(SHAPES[shape](f"http://localhost:{port}/img.png"))
        assert await admit_images(body, LIMITS, remote) == 1
    part = body["messages"][0]["content"][0]
    url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
    assert url == _data_url(_png())  # the engine gets the bytes, never the URL
    assert hits == ["/img.png"]


async def test_several_remote_images_are_all_inlined():
    hits: list[str] = []
    async with _image_server(hits) as port, _closing(_loopback_allowed()) as remote:
        body = _body(*[_image_part(f"http://127.0.0.1:{port}/img.png") for _ in range(3)])
        assert await admit_images(body, LIMITS, remote) == 3
    assert all(
        p["image_url"]["url"].startswith("data:image/png;base64,")
        for p in body["messages"][0]["content"][:3]
    )


async def test_redirects_are_followed_with_every_hop_checked():
    hits: list[str] = []

    async def to_image(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"http://127.0.0.1:{request.url.port}/img.png")

    async def to_private(request: web.Request) -> web.StreamResponse:
        # loopback too: not allowed
        raise web.HTTPFound(f"http://127.0.0.2:{request.url.port}/img.png")

    async def to_itself(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/loop")

    async with (
        _image_server(hits, hop=to_image, private=to_private, loop=to_itself) as port,
        _closing(_loopback_allowed(["127.0.0.1", "127.0.0.2"])) as remote,
    ):
        body = _body(_image_part(f"http://127.0.0.1:{port}/hop"))
        assert await admit_images(body, LIMITS, remote) == 1
        assert hits == ["/hop", "/img.png"]
        await _refused(
            _body(_image_part(f"http://127.0.0.1:{port}/private")),
            "remote_image_refused",
            remote=remote,
        )
        await _refused(
            _body(_image_part(f"http://127.0.0.1:{port}/loop")),
            "remote_image_fetch_failed",
            remote=remote,
            phrase="redirects",
        )


async def test_a_download_over_the_byte_limit_is_cut_off_while_streaming():
    big = _png((64, 64), noisy=True)

    # no Content-Length: counted as it arrives
    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(big), 1024):
            await response.write(big[start : start + 1024])
        return response

    small = ImageLimits(8, len(big) - 1, 16_000_000)
    async with (
        _image_server([], big=big, chunked=chunked) as port,
        _closing(_loopback_allowed()) as remote,
    ):
        for path in ("big", "chunked"):
            await _refused(
                _body(_image_part(f"http://127.0.0.1:{port}/{path}")),
                "image_too_large",
                small,
                remote,
            )


async def test_a_fetched_image_gets_the_same_pixel_and_format_checks():
    async with (
        _image_server([], bomb=_bomb(5000, 5000), text=b"<html>hi</html>") as port,
        _closing(_loopback_allowed()) as remote,
    ):
        await _refused(
            _body(_image_part(f"http://127.0.0.1:{port}/bomb")),
            "image_too_many_pixels",
            remote=remote,
        )
        await _refused(
            _body(_image_part(f"http://127.0.0.1:{port}/text")), "invalid_image", remote=remote
        )


async def test_failed_fetches_are_400s_that_say_why():
    answer = asyncio.Event()  # set once the fetch has been given up on: the server may then answer

    async def slow(request: web.Request) -> web.StreamResponse:
        await answer.wait()
        return web.Response(body=_png())

    async def gzipped(request: web.Request) -> web.StreamResponse:
        return web.Response(body=zlib.compress(_png()), headers={"Content-Encoding": "deflate"})

    async with (
        _image_server([], slow=slow, gzipped=gzipped) as port,
        _closing(_loopback_allowed(timeout_s=0.3)) as remote,
    ):
        base = f"http://127.0.0.1:{port}"
        await _refused(
            _body(_image_part(f"{base}/missing")),
            "remote_image_fetch_failed",
            remote=remote,
            phrase="answered 404",
        )
        await _refused(
            _body(_image_part(f"{base}/slow")),
            "remote_image_fetch_failed",
            remote=remote,
            phrase="within 0.3 s",
        )
        answer.set()
        await _refused(
            _body(_image_part(f"{base}/gzipped")),
            "remote_image_fetch_failed",
            remote=remote,
            phrase="compressed",
        )

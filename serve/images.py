"""Admitting a chat request's images: every image the engine would read is found, limited and made
safe first.

vLLM's chat parser (`vllm/renderers/chat_utils.py`, `_parse_chat_message_content_mm_part`) reads
media from content parts of several shapes; `admit_images` walks them the same way, so no image
reaches the engine unseen:

- `{"type": "image_url", "image_url": {"url": ...}}`, OpenAI's chat shape;
- `{"type": "input_image", "image_url": "..."}`, OpenAI's Responses shape;
- a part without `type` that has an `image_url` key, its value a URL string or `{"url": ...}`.

Other media are refused with a 400 that names the part type: `video_url` and `audio_url` (the engine
would fetch them itself), `input_audio`,
`image_embeds`/`audio_embeds`/`video_embeds`/`prompt_embeds` (tensors the engine deserializes) and
`image_pil` (not JSON). The base serves images, nothing else. So is a part's `uuid`: it keys the
engine's media cache, which every tenant shares, and the body's
`mm_processor_kwargs`/`media_io_kwargs`, which would override the processor's resizing (the bound on
an image's cost) per request.

Once admitted, every image URL is a base64 data URL of a PNG, JPEG, WebP, GIF, BMP or TIFF whose
bytes and pixels (read from its header; the pixels are never decoded) are within `ImageLimits`.
http(s) images are fetched by the gateway (`RemoteImages`: allow-listed hosts, public addresses
only, checked again when connecting) and inlined, so the engine fetches nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from yarl import URL

from lorafleet.chat_jsonl import content_parts
from lorafleet.errors import InvalidRequest
from lorafleet.serve.settings import Settings

__all__ = [
    "ImageLimits",
    "RemoteImages",
    "admit_images",
    "is_public_address",
    "PIXEL_CEILING",
    "BYTE_CEILING",
]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

_TEXT_PARTS = frozenset(
    {"text", "input_text", "output_text", "refusal", "thinking", "tool_reference"}
)
_IMAGE_PARTS = frozenset({"image_url", "input_image"})
# How vLLM reads a part without `type` (or with a `uuid`): by the first of these keys it has.
_KEYED_PARTS = (
    "image_url",
    "image_pil",
    "image_embeds",
    "audio_embeds",
    "video_embeds",
    "prompt_embeds",
    "audio_url",
    "input_audio",
    "video_url",
    "tool_reference",
)
_OVERRIDES = ("mm_processor_kwargs", "media_io_kwargs")
# Formats the engine may decode; Pillow opens more (EPS would run Ghostscript, for one).
_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF")
# smaller images are checked on the event loop (~0.2 ms); larger ones on a thread
_INLINE_CHARS = 256 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# 2130706433, 0x7f.1, 0177.0.0.1, 127.1: not addresses to `ipaddress`, yet socket (and so DNS) reads
# them as ones
_NUMERIC_HOST = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


# Bounds that hold whatever the limits say (0 in a limit means "no limit of its own").
# Pillow warns above it and refuses at twice: a bomb
PIXEL_CEILING = Image.MAX_IMAGE_PIXELS or 89_478_485
BYTE_CEILING = 64 * 1024 * 1024  # one image; bounds a download whose limit is 0


@dataclass(frozen=True)
class ImageLimits:
    """What one chat request's images may be (the gateway's settings, or a tenant's own); 0: no
    limit of its own, below the ceilings (`PIXEL_CEILING`, `BYTE_CEILING`)."""

    max_images: int  # image parts per request
    max_image_bytes: int  # one image's encoded size: a data URL's decoded payload, or a download
    max_image_pixels: int  # width x height, from the image header; at most PIXEL_CEILING

    def __post_init__(self) -> None:
        if min(self.max_images, self.max_image_bytes, self.max_image_pixels) < 0:
            raise ValueError(f"image limits cannot be negative: {self}")

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(
            settings.max_images_per_request, settings.max_image_bytes, settings.max_image_pixels
        )

    @property
    def image_bytes(self) -> int:
        return self.max_image_bytes or BYTE_CEILING

    @property
    def image_pixels(self) -> int:
        # Capped where Pillow only warns: every image it would call a bomb is then over the limit
        return min(self.max_image_pixels or PIXEL_CEILING, PIXEL_CEILING)


@dataclass
class _Image:
    """One image of the request: where it is, and the dict entry that holds its URL."""

    where: str  # "messages[0].content[1]"
    holder: dict[str, Any]
    key: str

    @property
    def url(self) -> str:
        return self.holder[self.key]


def is_public_address(address: IPAddress) -> bool:
    """Whether an address is on the public internet: not loopback, private, link-local,
    multicast, reserved or unspecified, judging an IPv6 address that carries an IPv4 one (mapped,
    6to4, NAT64) by that one."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_address(embedded)
        if address.is_site_local:
            return False
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


class _NotPublic(OSError):
    """A host name that resolved to no address a fetch may go to."""


class _PublicResolver(AbstractResolver):
    """aiohttp's resolver, keeping only the addresses allowed: a connection goes only to an
    address that was checked, whatever the DNS answers next (rebinding). IP literals skip
    resolvers; `RemoteImages` checks those."""

    def __init__(self, is_public: Callable[[IPAddress], bool]) -> None:
        self._resolver = aiohttp.ThreadedResolver()
        self._is_public = is_public

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._resolver.resolve(host, port, family)
        allowed = [r for r in found if self._is_public(ipaddress.ip_address(r["host"]))]
        if not allowed:
            raise _NotPublic(f"{host} resolves to no public address")
        return allowed

    async def close(self) -> None:
        await self._resolver.close()


def _refused(where: str, reason: str) -> InvalidRequest:
    return InvalidRequest(f"{where}: remote image refused: {reason}", code="remote_image_refused")


def _fetch_failed(where: str, reason: str) -> InvalidRequest:
    return InvalidRequest(
        f"{where}: could not fetch the remote image: {reason}", code="remote_image_fetch_failed"
    )


class RemoteImages:
    """Fetches http(s) images for the gateway: allow-listed hosts, public addresses only (checked
    again at connect time), bounded in time and size, each redirect checked like the first URL."""

    def __init__(
        self,
        hosts: Sequence[str],
        timeout_s: float = 10.0,
        max_redirects: int = 3,
        is_public: Callable[[IPAddress], bool] = is_public_address,
    ) -> None:
        """`hosts`: exact names, "*.example.com" (its subdomains) or "*" (any host); `is_public`
        says which addresses may be reached (tests allow one loopback server with it)."""
        self.hosts = tuple(h.lower().rstrip(".") for h in hosts)
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self.is_public = is_public
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RemoteImages | None:
        """The fetcher the settings allow; None where remote images are off."""
        if not settings.allow_remote_images:
            return None
        return cls(settings.remote_image_hosts, settings.remote_image_timeout_s)

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(
            p == "*" or p == host or (p.startswith("*.") and host.endswith(p[1:]))
            for p in self.hosts
        )

    def check_url(self, url: URL, where: str) -> None:
        """Refuse what no fetch may try: other schemes, credentials, hosts off the list,
        non-public IP literals."""
        if url.scheme not in ("http", "https") or not url.host:
            raise InvalidRequest(
                f"{where}: image URLs must be data URLs or http(s) URLs",
                code="unsupported_image_url",
            )
        if url.user is not None or url.password is not None:
            raise _refused(where, "URLs with credentials are not fetched")
        host = url.host
        if not self.host_allowed(host):
            raise _refused(where, f"host {host!r} is not on this server's list of image hosts")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            if _NUMERIC_HOST.fullmatch(host):
                raise _refused(
                    where, f"write IPv4 addresses as four decimal numbers, not {host!r}"
                ) from None
            return  # a name: its addresses are checked when connecting
        if not self.is_public(address):
            raise _refused(where, f"{host} is not a public address")

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:  # created on first use: it belongs to the running event loop
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=_PublicResolver(self.is_public), limit=100),
                timeout=aiohttp.ClientTimeout(
                    total=self.timeout_s, sock_connect=min(5.0, self.timeout_s)
                ),
                headers={"Accept-Encoding": "identity", "User-Agent": "lorafleet-image-fetch"},
                # one tenant's fetch never carries another's cookies
                cookie_jar=aiohttp.DummyCookieJar(),
                # no proxy: the checked address is the one reached
                auto_decompress=False,
                trust_env=False,
            )
        return self._session

    async def fetch(self, url: str, max_bytes: int, where: str) -> bytes:
        """The image at `url`, at most `max_bytes`, within `timeout_s` for all its hops together."""
        try:
            target = URL(url)
        except ValueError as exc:
            raise InvalidRequest(
                f"{where}: not a valid URL: {exc}", code="unsupported_image_url"
            ) from exc
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._follow(target, max_bytes, where)
        except TimeoutError as exc:  # aiohttp's own timeouts are TimeoutErrors too
            raise _fetch_failed(where, f"no complete answer within {self.timeout_s:g} s") from exc

    async def _follow(self, target: URL, max_bytes: int, where: str) -> bytes:
        """GET `target`, following up to `max_redirects` redirects, each checked as the first URL
        was."""
        for _ in range(self.max_redirects + 1):
            self.check_url(target, where)
            try:
                async with self._client().get(target, allow_redirects=False) as response:
                    location = response.headers.get("Location")
                    if response.status in _REDIRECTS and location:
                        target = response.url.join(URL(location))
                        continue
                    return await _read_bounded(response, max_bytes, where)
            except TimeoutError:
                raise  # aiohttp's timeouts are ClientErrors too; `fetch` reports them
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, _NotPublic):
                    raise _refused(where, str(exc.os_error)) from exc
                raise _fetch_failed(where, f"cannot connect to {target.host}") from exc
            except (aiohttp.ClientError, ValueError) as exc:
                raise _fetch_failed(where, type(exc).__name__) from exc
        raise _fetch_failed(where, f"more than {self.max_redirects} redirects")

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


async def _read_bounded(response: aiohttp.ClientResponse, max_bytes: int, where: str) -> bytes:
    """The body of a 200 answer, refused as soon as it is longer than `max_bytes`."""
    if response.status != 200:
        raise _fetch_failed(where, f"the server answered {response.status}")
    if response.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise _fetch_failed(where, "the server sent a compressed body (identity was asked for)")
    if (response.content_length or 0) > max_bytes:
        raise _too_large(where, f"{response.content_length} bytes", max_bytes)
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(where, f"over {max_bytes} bytes", max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(where: str, size: str, max_bytes: int) -> InvalidRequest:
    return InvalidRequest(
        f"{where}: the image is {size}, the limit is {max_bytes} bytes", code="image_too_large"
    )


def _invalid(where: str, reason: str) -> InvalidRequest:
    return InvalidRequest(f"{where}: {reason}", code="invalid_image")


def _image_format(raw: bytes, limits: ImageLimits, where: str) -> str:
    """The format of an encoded image within the limits, from its header (the pixels are not
    decoded)."""
    if len(raw) > limits.image_bytes:
        raise _too_large(where, f"{len(raw)} bytes", limits.image_bytes)
    try:
        with Image.open(io.BytesIO(raw), formats=_FORMATS) as image:
            (width, height), found = image.size, image.format or "?"
            if width * height <= limits.image_pixels:
                image.verify()  # PNG: every chunk is there with its CRC; nothing is decompressed
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(where, "far more pixels than Pillow opens", limits) from exc
    except Exception as exc:  # noqa: BLE001  Pillow's parsers raise many types on malformed input
        # that one names a Python object
        detail = "" if isinstance(exc, UnidentifiedImageError) else f": {exc}"
        raise _invalid(where, f"not a readable image ({', '.join(_FORMATS)}){detail}") from exc
    if width * height > limits.image_pixels:
        raise _too_many_pixels(where, f"{width} x {height} pixels", limits)
    return found


def _too_many_pixels(where: str, size: str, limits: ImageLimits) -> InvalidRequest:
    side = int(limits.image_pixels**0.5)
    return InvalidRequest(
        f"{where}: the image has {size}, the limit is {limits.image_pixels} pixels "
        f"(e.g. {side} x {side}): scale it down",
        code="image_too_many_pixels",
    )


def _check_data_url(url: str, limits: ImageLimits, where: str) -> None:
    """A data URL read the way the engine reads it (`MediaConnector._load_data_url`), within the
    limits."""
    spec, comma, payload = url[5:].partition(",")
    media_type, _, encoding = spec.rpartition(";")
    if not comma or encoding != "base64":
        raise _invalid(where, "data URLs must be base64: 'data:image/png;base64,...'")
    if not media_type.partition(";")[0].lower().startswith("image/"):
        raise _invalid(where, f"a data URL's media type must be image/..., not {media_type[:40]!r}")
    if len(payload) // 4 * 3 > limits.image_bytes + 2:  # refused before anything is decoded
        raise _too_large(where, f"about {len(payload) // 4 * 3} bytes", limits.image_bytes)
    try:
        # as strict as the engine's, faster than b64decode's
        raw = binascii.a2b_base64(payload, strict_mode=True)
    except ValueError as exc:
        raise _invalid(where, f"the data URL is not valid base64 ({exc})") from exc
    _image_format(raw, limits, where)


def _inline(raw: bytes, limits: ImageLimits, where: str) -> str:
    """A fetched image, checked, as the data URL the engine gets instead of its URL."""
    found = _image_format(raw, limits, where)
    return f"data:{Image.MIME.get(found, 'image/png')};base64,{base64.b64encode(raw).decode()}"


def _part_kind(part: dict[str, Any], where: str) -> tuple[str, bool]:
    """The part's type as the engine reads it, and whether it came from `type` (else from the
    part's keys)."""
    if part.get("uuid") is not None:
        raise InvalidRequest(
            f"{where}: 'uuid' is not accepted: it names an item in the engine's media cache, "
            "which every tenant shares",
            code="unsupported_content_part",
        )
    kind = part.get("type")
    if isinstance(kind, str):
        return kind, True
    if kind is not None:
        raise InvalidRequest(f"{where}: 'type' must be a string", code="invalid_content_part")
    keyed = next((key for key in _KEYED_PARTS if key in part), None)
    if keyed is None:
        raise InvalidRequest(f"{where}: a content part needs a 'type'", code="invalid_content_part")
    return keyed, False


def _image_of(part: dict[str, Any], kind: str, typed: bool, where: str) -> _Image:
    """Where an image part's URL is: `image_url.url`, or `image_url` itself as vLLM's shapes
    allow."""
    value = part.get("image_url")
    if kind == "image_url" and isinstance(value, dict):
        image = _Image(where, value, "url")
    elif isinstance(value, str) and (kind == "input_image" or not typed):
        image = _Image(where, part, "image_url")
    elif kind == "input_image":
        raise _invalid(
            where, "input_image needs 'image_url', a data or http(s) URL (file_id is not supported)"
        )
    else:
        raise _invalid(where, "image_url must be an object: {'url': 'data:image/png;base64,...'}")
    if not isinstance(image.holder.get(image.key), str):
        raise _invalid(where, "image_url.url must be a string")
    return image


def _find_images(messages: list[Any]) -> list[_Image]:
    """Every image part of the messages, in order; any other media is refused."""
    images = []
    for m, message in enumerate(messages):
        for p, part in enumerate(content_parts(message)):
            if isinstance(part, str):  # the engine reads a bare string part as text
                continue
            where = f"messages[{m}].content[{p}]"
            if not isinstance(part, dict):
                raise InvalidRequest(
                    f"{where}: a content part must be an object", code="invalid_content_part"
                )
            kind, typed = _part_kind(part, where)
            if kind in _TEXT_PARTS:
                continue
            if kind not in _IMAGE_PARTS:
                raise InvalidRequest(
                    f"{where}: content part type {kind!r} is not supported: this model takes text "
                    "and images ('image_url' parts)",
                    code="unsupported_content_part",
                )
            images.append(_image_of(part, kind, typed, where))
    return images


async def _admit_inline(image: _Image, limits: ImageLimits) -> None:
    if len(image.url) > _INLINE_CHARS:  # a large base64 decode would hold up every other request
        await run_in_threadpool(_check_data_url, image.url, limits, image.where)
    else:
        _check_data_url(image.url, limits, image.where)


async def _admit_remote(image: _Image, limits: ImageLimits, remote: RemoteImages) -> None:
    raw = await remote.fetch(image.url, limits.image_bytes, image.where)
    if len(raw) > _INLINE_CHARS:
        image.holder[image.key] = await run_in_threadpool(_inline, raw, limits, image.where)
    else:
        image.holder[image.key] = _inline(raw, limits, image.where)


async def _admit_all_remote(
    images: list[_Image], limits: ImageLimits, remote: RemoteImages
) -> None:
    """Fetch concurrently; the first failure cancels the other fetches."""
    if len(images) == 1:
        return await _admit_remote(images[0], limits, remote)
    tasks = [asyncio.create_task(_admit_remote(image, limits, remote)) for image in images]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def admit_images(
    body: dict[str, Any], limits: ImageLimits, remote: RemoteImages | None
) -> int:
    """Check every image of `body["messages"]` against `limits` and inline the remote ones
    (fetched by `remote`; None: refused), in place; return how many images the request has.
    Raises InvalidRequest (400)."""
    for name in _OVERRIDES:
        if body.get(name) is not None:
            raise InvalidRequest(
                f"'{name}' is not accepted: image processing is the same for every request",
                code="unsupported_parameter",
            )
    images = _find_images(body["messages"])
    if not images:
        return 0
    if limits.max_images and len(images) > limits.max_images:
        raise InvalidRequest(
            f"the request has {len(images)} images, the limit is {limits.max_images}",
            code="too_many_images",
        )
    fetched = []
    for image in images:
        scheme = image.url[:8].lower()
        if scheme.startswith("data:"):
            await _admit_inline(image, limits)
        elif scheme.startswith(("http://", "https://")):
            fetched.append(image)
        else:
            raise InvalidRequest(
                f"{image.where}: unsupported image URL scheme in {image.url[:40]!r}: use a data "
                "URL",
                code="unsupported_image_url",
            )
    if fetched and remote is None:
        raise InvalidRequest(
            "remote image URLs are disabled on this server: send the image as a data URL",
            code="remote_images_disabled",
        )
    if fetched and remote is not None:
        await _admit_all_remote(fetched, limits, remote)
    return len(images)

"""The adapter and blob stores on S3-compatible object storage
(`LORAFLEET_STORE_URL=s3://bucket/prefix`).

boto3 rather than s3fs: it is the AWS SDK itself, with the standard credential and endpoint chain
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ~/.aws/config, instance roles), its retries (AWS_RETRY_MODE)
and multipart transfers (`TransferConfig`), and it pins no asyncio event loop (s3fs pins aiobotocore
versions). Every call blocks: callers run them in a worker thread.

Keys, all content-addressed:

    <prefix>/adapters/<digest>/<upload>/adapter_config.json        one put's files, never rewritten
    <prefix>/adapters/<digest>/<upload>/adapter_model.safetensors
    <prefix>/adapters/<digest>/manifest.json                       written LAST: the blob is visible
                                                                   from then on
    <prefix>/validation/<sha256>.jsonl

The manifest names the upload folder, each file's size and sha256, and the digest. An engine host
fetches a blob into its `AdapterCache` and checks the sha256s and the content digest
(`content_digest`, as validation computed it) before the engine reads it. Each put writes its own
upload folder, so two puts never write one object (their config files may differ in bytes with one
digest), and the manifest is created conditionally: the loser stores nothing.

The delete race (`lorafleet.adapters.store`) is closed as on a filesystem: the manifest goes first
(the blob is out of sight), then `keep()` is asked; if kept, the manifest comes back (unless a put
made a new one meanwhile), else the upload folder it named goes. A put racing the delete writes its
own folder, which the delete never touches. A put also repairs a manifest whose folder is gone.
Folders that no manifest names (a put or delete that died half way, a put that lost) are
`temp_entries`, named `<digest>/<upload>`, for garbage collection past an age bound.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import uuid
from collections.abc import Callable, Iterator, Set
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError
from safetensors import SafetensorError

from lorafleet.adapters.adapter_cache import AdapterCache
from lorafleet.adapters.validate import CONFIG_FILE, WEIGHTS_FILE, ValidatedAdapter, content_digest
from lorafleet.errors import StoreCorrupt, StoreUnavailable

__all__ = ["S3Location", "S3AdapterStore", "S3BlobStore", "parse_s3_url"]

MANIFEST = "manifest.json"
_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# adapters are tens to hundreds of MB: 64 MiB parts keep a transfer to a few parallel requests
_TRANSFER = TransferConfig(
    multipart_threshold=64 * 1024**2, multipart_chunksize=64 * 1024**2, max_concurrency=4
)
_HEX = re.compile(r"[0-9a-f]{64}")
_UPLOAD = re.compile(r"[0-9a-f]{32}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_TRASH = ".del-"


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix ("" or "a/b", no slashes at the ends)."""

    bucket: str
    prefix: str = ""

    def key(self, *parts: str) -> str:
        return "/".join(part for part in (self.prefix, *parts) if part)

    @property
    def folder(self) -> str:
        """The prefix as a folder ("a/b/"), for listings."""
        return f"{self.prefix}/" if self.prefix else ""

    def child(self, folder: str) -> S3Location:
        return S3Location(self.bucket, self.key(folder))


def parse_s3_url(url: str) -> S3Location:
    """`s3://bucket/prefix` as a location; a ValueError naming LORAFLEET_STORE_URL otherwise."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(
            f"LORAFLEET_STORE_URL={url!r}: an S3 store is s3://<bucket>/<prefix> "
            "(the bucket is missing)"
        )
    if not _BUCKET.fullmatch(parsed.netloc):
        raise ValueError(f"LORAFLEET_STORE_URL={url!r}: {parsed.netloc!r} is not an S3 bucket name")
    if parsed.query or parsed.fragment:
        raise ValueError(
            f"LORAFLEET_STORE_URL={url!r}: no query or fragment (the endpoint and credentials come "
            "from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID... or ~/.aws/config)"
        )
    return S3Location(parsed.netloc, parsed.path.strip("/"))


class _Bucket:
    """The few S3 calls the stores make, with "not there" and "precondition failed" as values."""

    def __init__(self, bucket: str, client: Any = None) -> None:
        self.bucket = bucket
        # a client is thread-safe; a session is not
        self.client = client or boto3.session.Session().client("s3")

    def get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if _status(exc) == 404:
                return None
            raise

    def modified(self, key: str) -> float | None:
        """The object's last-modified time (epoch seconds), None if it is not there."""
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)["LastModified"].timestamp()
        except ClientError as exc:
            if _status(exc) == 404:
                return None
            raise

    def put(self, key: str, data: bytes, create: bool = False) -> bool:
        """Write an object; with `create`, only if none is there (False when one was)."""
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=key, Body=data, **({"IfNoneMatch": "*"} if create else {})
            )
        except ClientError as exc:
            # 409: a conditional write raced another (AWS's answer)
            if create and _status(exc) in (409, 412):
                return False
            # a service without conditional writes: the last manifest wins,
            if create and _status(exc) == 501:
                # which is still a complete one (a lost put's folder waits for gc)
                return self.put(key, data)
            raise
        return True

    def upload(self, path: Path, key: str) -> None:
        self.client.upload_file(str(path), self.bucket, key, Config=_TRANSFER)

    def download(self, key: str, path: Path) -> None:
        self.client.download_file(self.bucket, key, str(path), Config=_TRANSFER)

    def copy(self, source: str, key: str) -> bool:
        """Server-side copy; False if the source is not there."""
        try:
            self.client.copy_object(
                Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": source}
            )
        except ClientError as exc:
            if _status(exc) == 404:
                return False
            raise
        return True

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes up to 1000 keys
            chunk = keys[start : start + 1000]
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}
            )

    def listing(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, last-modified epoch seconds) of every object under `prefix`."""
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        ):
            for item in page.get("Contents", []):
                yield item["Key"], item["LastModified"].timestamp()


def _status(exc: ClientError) -> int:
    code = exc.response.get("Error", {}).get("Code", "")
    if code in ("NoSuchKey", "404", "NotFound"):
        return 404
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


@contextlib.contextmanager
def _answering(digest: str | None = None) -> Iterator[None]:
    """S3 failures that outlive botocore's retries become StoreUnavailable (503 + Retry-After)."""
    try:
        yield
    except (BotoCoreError, ClientError, Boto3Error) as exc:
        raise StoreUnavailable(f"S3 {type(exc).__name__}: {str(exc)[:200]}", digest=digest) from exc


@dataclass(frozen=True)
class _Manifest:
    digest: str
    upload: str
    files: dict[str, dict[str, Any]]  # name -> {"size": bytes, "sha256": hex}

    def encode(self) -> bytes:
        return json.dumps(
            {"digest": self.digest, "upload": self.upload, "files": self.files}, sort_keys=True
        ).encode()

    @classmethod
    def decode(cls, digest: str, data: bytes) -> _Manifest:
        try:
            raw = json.loads(data)
            manifest = cls(
                raw["digest"],
                raw["upload"],
                {
                    n: {"size": int(f["size"]), "sha256": str(f["sha256"])}
                    for n, f in raw["files"].items()
                },
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreCorrupt(digest, f"unreadable {MANIFEST}: {exc}") from exc
        if (
            manifest.digest != digest
            or not _UPLOAD.fullmatch(manifest.upload)
            or set(manifest.files) != set(_FILES)
        ):
            raise StoreCorrupt(
                digest,
                f"{MANIFEST} names {manifest.digest[:12]}, upload {manifest.upload!r}, files "
                f"{sorted(manifest.files)}",
            )
        return manifest


class S3AdapterStore:
    """Adapters in a bucket (see the module docstring), fetched and verified into a local
    `AdapterCache`."""

    def __init__(self, location: S3Location, cache: AdapterCache, client: Any = None) -> None:
        self.location, self.cache = location.child("adapters"), cache
        self._s3 = _Bucket(location.bucket, client)

    def _key(self, digest: str, *parts: str) -> str:
        return self.location.key(digest, *parts)

    def local_path(self, digest: str) -> Path:
        """Where the engine reads the blob once fetched (the cache's folder)."""
        return self.cache.path(digest)

    def exists(self, digest: str) -> bool:
        """Whether the blob is visible (its manifest is there)."""
        with _answering(digest):
            return self._s3.modified(self._key(digest, MANIFEST)) is not None

    def put(self, adapter: ValidatedAdapter) -> bool:
        """Upload the canonical files into a new upload folder, then the manifest; False if
        already stored."""
        digest = adapter.digest
        with _answering(digest):
            current = self._manifest(digest)
            if current is not None and self._complete(current):
                return False
            upload = uuid.uuid4().hex
            files = {name: _file_entry(adapter.path / name) for name in _FILES}
            for name in _FILES:
                self._s3.upload(adapter.path / name, self._key(digest, upload, name))
            manifest = _Manifest(digest, upload, files).encode()
            # create only if absent: else another put won (or the one there names a folder now gone:
            # replace it)
            if self._s3.put(self._key(digest, MANIFEST), manifest, create=current is None):
                return True
            self._s3.delete([self._key(digest, upload, name) for name in _FILES])
            return False

    def delete(self, digest: str, keep: Callable[[], bool] = lambda: False) -> bool:
        """Remove the blob unless `keep()`, asked once its manifest is gone, says a version now
        uses it; return whether it went. A concurrent upload either committed before that look
        (the manifest comes back) or puts the blob again after its commit (it sees none, and
        writes a folder of its own)."""
        with _answering(digest):
            data = self._s3.get(self._key(digest, MANIFEST))
            if data is None:
                return False
            manifest = _Manifest.decode(digest, data)
            self._s3.delete([self._key(digest, MANIFEST)])
        needed = True  # until the catalog says otherwise: an error there keeps the blob
        try:
            needed = keep()
        finally:
            if needed:
                self._restore(manifest, data)
        if not needed:
            with _answering(digest):
                self._s3.delete(self._folder_keys(digest, manifest.upload))
        return not needed

    def _restore(self, manifest: _Manifest, data: bytes) -> None:
        with _answering(manifest.digest):
            if not self._s3.put(self._key(manifest.digest, MANIFEST), data, create=True):
                # a put stored it again meanwhile, in its own folder
                now = self._manifest(manifest.digest)
                if now is not None and now.upload != manifest.upload:
                    self._s3.delete(self._folder_keys(manifest.digest, manifest.upload))

    def fetch(self, digest: str) -> Path:
        """The blob's local folder, downloaded and verified on a cache miss (blocking: call in a
        worker thread)."""
        return self.cache.fetch(digest, partial(self._download, digest))

    def pinned(self, digest: str) -> AbstractContextManager[None]:
        """Nothing evicts the local copy meanwhile."""
        return self.cache.pinned(digest)

    def touch(self, digest: str) -> None:
        """Note a use of the local copy (its place in the cache's LRU order)."""
        self.cache.touch(digest)

    def on_evict(self, listener: Callable[[str], None]) -> None:
        """Call `listener(digest)` when the cache removes a local copy."""
        self.cache.on_evict(listener)

    def digests(self) -> Iterator[tuple[str, float]]:
        """(digest, its manifest's last-modified time) of every visible blob."""
        with _answering():
            for key, modified in list(self._s3.listing(self.location.folder)):
                digest, _, name = key.removeprefix(self.location.folder).partition("/")
                if name == MANIFEST and _HEX.fullmatch(digest):
                    yield digest, modified

    def temp_entries(self) -> Iterator[tuple[str, float]]:
        """(`<digest>/<upload>`, its newest object's time) of upload folders no manifest names."""
        with _answering():
            folders, manifests = self._inventory()
            for digest, uploads in sorted(folders.items()):
                named = self._named_upload(digest, set(uploads)) if digest in manifests else None
                for upload, modified in sorted(uploads.items()):
                    if upload != named:
                        yield f"{digest}/{upload}", modified

    def remove_temp(self, name: str) -> None:
        """Delete an upload folder that no manifest names (left alone if one names it by now)."""
        digest, _, upload = name.partition("/")
        if not (_HEX.fullmatch(digest) and _UPLOAD.fullmatch(upload)):
            raise ValueError(f"{name!r} is not a temporary entry of {self.location}")
        with _answering(digest):
            current = self._manifest(digest)
            if current is None or current.upload != upload:
                self._s3.delete(self._folder_keys(digest, upload))

    def _inventory(self) -> tuple[dict[str, dict[str, float]], set[str]]:
        """Upload folders by digest (upload -> newest object time), and the digests with a
        manifest."""
        folders: dict[str, dict[str, float]] = {}
        manifests: set[str] = set()
        for key, modified in self._s3.listing(self.location.folder):
            parts = key.removeprefix(self.location.folder).split("/")
            if len(parts) == 2 and parts[1] == MANIFEST:
                manifests.add(parts[0])
            elif len(parts) == 3 and _HEX.fullmatch(parts[0]):
                uploads = folders.setdefault(parts[0], {})
                uploads[parts[1]] = max(uploads.get(parts[1], 0.0), modified)
        return folders, manifests

    def _named_upload(self, digest: str, uploads: Set[str]) -> str | None:
        """The upload folder the digest's manifest names (read only when there is a choice)."""
        if len(uploads) == 1:
            return next(iter(uploads))
        manifest = self._manifest(digest)
        return manifest.upload if manifest else None

    def _manifest(self, digest: str) -> _Manifest | None:
        data = self._s3.get(self._key(digest, MANIFEST))
        return None if data is None else _Manifest.decode(digest, data)

    def _complete(self, manifest: _Manifest) -> bool:
        """Whether the folder the manifest names still holds its files (a racing delete may have
        removed it)."""
        return all(
            self._s3.modified(self._key(manifest.digest, manifest.upload, name)) is not None
            for name in _FILES
        )

    def _folder_keys(self, digest: str, upload: str) -> list[str]:
        return [key for key, _ in self._s3.listing(self._key(digest, upload) + "/")]

    def _download(self, digest: str, folder: Path) -> None:
        """Download the blob into `folder` and verify it, or raise (the cache then discards the
        folder)."""
        with _answering(digest):
            manifest = self._manifest(digest)
            if manifest is None:
                raise StoreUnavailable(
                    "not in the store (or out of sight during a delete)", digest=digest
                )
            for name in _FILES:
                try:
                    self._s3.download(self._key(digest, manifest.upload, name), folder / name)
                except ClientError as exc:
                    if _status(exc) == 404:
                        raise StoreUnavailable(
                            f"{name} is gone from upload {manifest.upload}", digest=digest
                        ) from exc
                    raise
        for name in _FILES:
            if _file_entry(folder / name) != manifest.files[name]:
                raise StoreCorrupt(
                    digest, f"{name} does not match the size and sha256 in its {MANIFEST}"
                )
        try:
            computed = content_digest(folder)
        # bytes as stored, yet unreadable
        except (SafetensorError, ValueError, OSError, RuntimeError) as exc:
            raise StoreCorrupt(digest, f"unreadable adapter files: {exc}") from exc
        if computed != digest:
            raise StoreCorrupt(digest, f"its content digest is {computed[:12]}")


def _file_entry(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return {"size": path.stat().st_size, "sha256": sha}


class S3BlobStore:
    """Content-addressed blobs (validation sets) as `<location>/<sha256><suffix>` objects."""

    def __init__(self, location: S3Location, suffix: str, client: Any = None) -> None:
        self.location, self.suffix = location, suffix
        self._s3 = _Bucket(location.bucket, client)

    def _key(self, digest: str) -> str:
        return self.location.key(f"{digest}{self.suffix}")

    def put(self, data: bytes) -> str:
        """Store the data (written again if already stored: its last-modified time renews);
        return its digest."""
        digest = hashlib.sha256(data).hexdigest()
        with _answering(digest):
            # A set about to be referenced again must look new to a concurrent
            # `delete(if_unmodified_since=...)`.
            self._s3.put(self._key(digest), data)
        return digest

    def read(self, digest: str) -> bytes:
        """The blob's bytes, checked against its digest."""
        with _answering(digest):
            data = self._s3.get(self._key(digest))
        if data is None:
            raise StoreUnavailable("not in the store", digest=digest)
        if hashlib.sha256(data).hexdigest() != digest:
            raise StoreCorrupt(digest, "its bytes do not hash to its name")
        return data

    def delete(
        self,
        digest: str,
        keep: Callable[[], bool] = lambda: False,
        if_unmodified_since: float | None = None,
    ) -> bool:
        """Remove the blob unless `keep()`, asked once it is out of sight, says a row now uses
        it, or it was put again after `if_unmodified_since`; return whether it went. Out of sight
        = copied to a `.del-` object and deleted (a put of the same content writes the same
        bytes, so putting it back is always right). S3 has no rename: a put between the time
        check and the delete (milliseconds) is not seen."""
        key, trash = (
            self._key(digest),
            self.location.key(f"{_TRASH}{uuid.uuid4().hex}{self.suffix}"),
        )
        with _answering(digest):
            modified = self._s3.modified(key)
            if modified is None or (
                if_unmodified_since is not None and modified > if_unmodified_since
            ):
                return False  # gone, or put again since the caller looked
            if not self._s3.copy(key, trash):
                return False
            self._s3.delete([key])
        needed = True  # until the catalog says otherwise: an error there keeps the blob
        try:
            needed = keep()
        finally:
            with _answering(digest):
                if needed:
                    self._s3.copy(trash, key)
                self._s3.delete([trash])
        return not needed

    def digests(self) -> Iterator[tuple[str, float]]:
        """(digest, last-modified time) of every visible blob."""
        with _answering():
            for key, modified in list(self._s3.listing(self.location.folder)):
                name = key.removeprefix(self.location.folder)
                if name.endswith(self.suffix) and _HEX.fullmatch(name.removesuffix(self.suffix)):
                    yield name.removesuffix(self.suffix), modified

    def temp_entries(self) -> Iterator[tuple[str, float]]:
        """(name, last-modified time) of half-done deletes (a put is one atomic write: it leaves
        nothing)."""
        with _answering():
            for key, modified in list(self._s3.listing(self.location.folder + _TRASH)):
                yield key.removeprefix(self.location.folder), modified

    def remove_temp(self, name: str) -> None:
        if not name.startswith(_TRASH) or "/" in name:
            raise ValueError(f"{name!r} is not a temporary entry of {self.location}")
        with _answering():
            self._s3.delete([self.location.key(name)])

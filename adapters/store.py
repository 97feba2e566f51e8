"""Content-addressed adapter store: one folder per digest, written atomically (temp + rename).

A blob is shared by every version with its digest, in any tenant, so deleting one races with an
upload of the same content. Two rules close that race without a lock: an upload puts its blob again
once its version is committed (a no-op while the blob is there), and a delete moves the blob out of
sight before its last look at the catalog, putting it back if a version appeared meanwhile
(`LocalStore.delete`'s `keep`; on S3 the manifest is what goes out of sight and comes back, see
`lorafleet.adapters.s3_store`). Validation sets (`BlobStore`) are not put again after their row
commits: a put renews the blob's modification time instead, and a delete that judged an older one
keeps it (`BlobStore.delete`'s `if_unmodified_since`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from lorafleet.adapters.adapter_cache import DEFAULT_CACHE_BYTES, AdapterCache
from lorafleet.adapters.s3_store import S3AdapterStore, S3BlobStore, parse_s3_url
from lorafleet.adapters.validate import CONFIG_FILE, WEIGHTS_FILE, ValidatedAdapter
from lorafleet.errors import StoreUnavailable

__all__ = [
    "AdapterStore",
    "BlobStorage",
    "LocalStore",
    "BlobStore",
    "open_store",
    "open_blob_store",
    "last_changed",
]


class AdapterStore(Protocol):
    """Adapter blobs by digest: `LocalStore`, or `S3AdapterStore` (fetched into a local cache for
    the engine)."""

    def put(self, adapter: ValidatedAdapter) -> bool: ...
    def local_path(self, digest: str) -> Path: ...
    def exists(self, digest: str) -> bool: ...
    def delete(self, digest: str, keep: Callable[[], bool] = ...) -> bool: ...
    # the folder the engine loads; blocking (a download on a miss)
    def fetch(self, digest: str) -> Path: ...
    # not evicted while held; cheap
    def pinned(self, digest: str) -> AbstractContextManager[None]: ...
    def touch(self, digest: str) -> None: ...  # a use, for the local cache's LRU order; cheap
    def on_evict(self, listener: Callable[[str], None]) -> None: ...  # told when a local copy goes
    def digests(self) -> Iterator[tuple[str, float]]: ...
    def temp_entries(self) -> Iterator[tuple[str, float]]: ...
    def remove_temp(self, name: str) -> None: ...


class BlobStorage(Protocol):
    """Content-addressed blobs (validation sets) by sha256: `BlobStore` (a folder) or
    `S3BlobStore`."""

    def put(self, data: bytes) -> str: ...
    def read(self, digest: str) -> bytes: ...
    def delete(
        self, digest: str, keep: Callable[[], bool] = ..., if_unmodified_since: float | None = ...
    ) -> bool: ...
    def digests(self) -> Iterator[tuple[str, float]]: ...
    def temp_entries(self) -> Iterator[tuple[str, float]]: ...
    def remove_temp(self, name: str) -> None: ...


class LocalStore:
    """Adapters under `root/<digest>/`; the engine reads them from there directly."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def local_path(self, digest: str) -> Path:
        return self.root / digest

    def exists(self, digest: str) -> bool:
        return (self.local_path(digest) / WEIGHTS_FILE).is_file()

    def put(self, adapter: ValidatedAdapter) -> bool:
        """Store the canonical files; return False if that digest was already stored."""
        if self.exists(adapter.digest):
            return False
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copyfile(adapter.path / name, tmp / name)
            tmp.rename(self.local_path(adapter.digest))  # atomic: readers see all or nothing
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if self.exists(adapter.digest):  # a concurrent upload of the same content won the race
                return False
            raise
        return True

    def delete(self, digest: str, keep: Callable[[], bool] = lambda: False) -> bool:
        """Remove the blob unless `keep()`, asked once the blob is out of sight, says a version
        now uses it; return whether it went. A concurrent upload either committed before that
        look (the blob comes back) or puts the blob again after its commit (it sees none)."""
        path = self.local_path(digest)
        trash = self.root / f".del-{uuid.uuid4().hex}"
        try:
            path.rename(trash)
        except FileNotFoundError:
            return False
        needed = True  # until the catalog says otherwise: an error there keeps the blob
        try:
            needed = keep()
        finally:
            if needed:
                _restore(trash, path)
        if not needed:
            shutil.rmtree(trash, ignore_errors=True)
        return not needed

    def fetch(self, digest: str) -> Path:
        """The blob's folder: the engine reads it in place (nothing to download or verify)."""
        return self.local_path(digest)

    def pinned(self, digest: str) -> AbstractContextManager[None]:
        """Nothing evicts a local blob."""
        return contextlib.nullcontext()

    def touch(self, digest: str) -> None:
        """No cache to keep in order."""

    def on_evict(self, listener: Callable[[str], None]) -> None:
        """A local store never evicts."""

    def digests(self) -> Iterator[tuple[str, float]]:
        """(digest, when it last changed: `last_changed`) of every visible blob."""
        for entry in self.root.iterdir():
            if not entry.name.startswith(".") and entry.is_dir():
                try:
                    changed = last_changed(entry)
                except FileNotFoundError:  # deleted meanwhile
                    continue
                yield entry.name, changed

    def temp_entries(self) -> Iterator[tuple[str, float]]:
        """(name, when it last changed) of half-written puts and half-done deletes."""
        yield from _temp_entries(self.root)

    def remove_temp(self, name: str) -> None:
        _remove_temp(self.root, name)


_TEMP_PREFIXES = (".tmp-", ".del-")


def last_changed(path: Path) -> float:
    """The latest modification or status change in a file or folder tree (links not followed):
    when it was last written or moved (a rename changes the status time only, and a delete's
    `.del-` entry is a renamed blob)."""

    def changed(stat: os.stat_result) -> float:
        return max(stat.st_mtime, stat.st_ctime)

    newest = changed(path.lstat())
    if path.is_dir() and not path.is_symlink():
        for folder, _, files in os.walk(path):
            newest = max(
                [
                    newest,
                    changed(os.lstat(folder)),
                    *(changed(os.lstat(os.path.join(folder, name))) for name in files),
                ]
            )
    return newest


def _temp_entries(root: Path) -> Iterator[tuple[str, float]]:
    for entry in root.iterdir():
        if entry.name.startswith(_TEMP_PREFIXES):
            try:
                changed = last_changed(entry)
            except FileNotFoundError:  # its put or delete just finished
                continue
            yield entry.name, changed


def _remove_temp(root: Path, name: str) -> None:
    if not name.startswith(_TEMP_PREFIXES) or "/" in name:
        raise ValueError(f"{name!r} is not a temporary entry of {root}")
    path = root / name
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _restore(trash: Path, path: Path) -> None:
    try:
        trash.rename(path)
    except OSError:  # an upload put the same content back first
        if trash.is_dir():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)


def open_store(
    url: str, cache_dir: Path | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES
) -> AdapterStore:
    """`file:///path` (the default; the engine reads the folder) or `s3://bucket/prefix` (fetched
    into a local cache at `cache_dir`, at most `cache_bytes`)."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return LocalStore(Path(parsed.path if parsed.scheme else url).expanduser())
    if parsed.scheme == "s3":
        location = parse_s3_url(url)
        if cache_dir is None:
            raise ValueError(
                f"LORAFLEET_STORE_URL={url!r}: an S3 store needs a local cache folder "
                "(LORAFLEET_STORE_CACHE_DIR)"
            )
        return S3AdapterStore(location, AdapterCache(cache_dir, cache_bytes))
    raise ValueError(f"LORAFLEET_STORE_URL={url!r}: use file:///path or s3://bucket/prefix")


def open_blob_store(url: str, folder: str, local_root: Path, suffix: str) -> BlobStorage:
    """The blob store beside the adapter store at `url`: `local_root` for a file:// store
    (validation sets stay where they always were), `<prefix>/<folder>/` in an S3 store."""
    if urlparse(url).scheme == "s3":
        return S3BlobStore(parse_s3_url(url).child(folder), suffix)
    return BlobStore(local_root, suffix)


class BlobStore:
    """Content-addressed files (validation sets) under `root/<sha256><suffix>`, written temp +
    rename."""

    def __init__(self, root: Path, suffix: str) -> None:
        self.root, self.suffix = root, suffix
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / f"{digest}{self.suffix}"

    def read(self, digest: str) -> bytes:
        """The blob's bytes."""
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError as exc:
            raise StoreUnavailable("not in the store", digest=digest) from exc

    def put(self, data: bytes) -> str:
        """Store the data (its modification time renewed if already stored); return its digest."""
        digest = hashlib.sha256(data).hexdigest()
        try:
            # A set about to be referenced again must look new to a concurrent
            # `delete(if_unmodified_since=...)`.
            os.utime(self.path(digest))
        except FileNotFoundError:
            tmp = self.root / f".tmp-{uuid.uuid4().hex}"
            tmp.write_bytes(data)
            tmp.rename(self.path(digest))
        return digest

    def delete(
        self,
        digest: str,
        keep: Callable[[], bool] = lambda: False,
        if_unmodified_since: float | None = None,
    ) -> bool:
        """Remove the blob unless `keep()`, asked once it is out of sight, says a row now uses
        it, or it was put again after `if_unmodified_since` (an upload whose row commits later);
        return whether it went."""
        path = self.path(digest)
        trash = self.root / f".del-{uuid.uuid4().hex}"
        try:
            path.rename(trash)
        except FileNotFoundError:
            return False
        needed = True  # until the catalog says otherwise: an error there keeps the blob
        try:
            touched = (
                if_unmodified_since is not None and trash.stat().st_mtime > if_unmodified_since
            )
            needed = touched or keep()
        finally:
            if needed:
                _restore(trash, path)
        if not needed:
            trash.unlink(missing_ok=True)
        return not needed

    def digests(self) -> Iterator[tuple[str, float]]:
        """(digest, when it last changed: `last_changed`) of every visible blob."""
        for entry in self.root.iterdir():
            if entry.name.endswith(self.suffix) and not entry.name.startswith("."):
                try:
                    changed = last_changed(entry)
                except FileNotFoundError:  # deleted meanwhile
                    continue
                yield entry.name.removesuffix(self.suffix), changed

    def temp_entries(self) -> Iterator[tuple[str, float]]:
        """(name, when it last changed) of half-written puts and half-done deletes."""
        yield from _temp_entries(self.root)

    def remove_temp(self, name: str) -> None:
        _remove_temp(self.root, name)

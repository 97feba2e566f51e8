"""Content-addressed adapter store: one folder per digest, written atomically (temp + rename).

A blob is shared by every version with its digest, in any tenant, so deleting one races with an upload of the
same content. Two rules close that race without a lock: an upload puts its blob again once its version is
committed (a no-op while the blob is there), and a delete moves the blob out of sight before its last look at
the catalog, putting it back if a version appeared meanwhile (`LocalStore.delete`'s `keep`).
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from lorafleet.adapters.validate import CONFIG_FILE, WEIGHTS_FILE, ValidatedAdapter

__all__ = ["AdapterStore", "LocalStore", "BlobStore", "open_store"]


class AdapterStore(Protocol):
    def put(self, adapter: ValidatedAdapter) -> bool: ...
    def local_path(self, digest: str) -> Path: ...
    def exists(self, digest: str) -> bool: ...
    def delete(self, digest: str, keep: Callable[[], bool] = ...) -> bool: ...


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
        """Remove the blob unless `keep()`, asked once the blob is out of sight, says a version now uses it;
        return whether it went. A concurrent upload either committed before that look (the blob comes back)
        or puts the blob again after its commit (it sees none)."""
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


def _restore(trash: Path, path: Path) -> None:
    try:
        trash.rename(path)
    except OSError:  # an upload put the same content back first
        shutil.rmtree(trash, ignore_errors=True)


def open_store(url: str) -> AdapterStore:
    """`file:///path` (default). Object stores need the engine to read adapters locally: not yet supported."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return LocalStore(Path(parsed.path if parsed.scheme else url).expanduser())
    raise ValueError(f"adapter store {url!r}: only file:// stores are supported in this release")


class BlobStore:
    """Content-addressed files (validation sets) under `root/<sha256><suffix>`, written temp + rename."""

    def __init__(self, root: Path, suffix: str) -> None:
        self.root, self.suffix = root, suffix
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / f"{digest}{self.suffix}"

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if not self.path(digest).is_file():
            tmp = self.root / f".tmp-{uuid.uuid4().hex}"
            tmp.write_bytes(data)
            tmp.rename(self.path(digest))
        return digest

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

"""An engine host's bounded local copy of adapters fetched from an object store: vLLM loads adapters
from a path.

Each adapter is one folder `root/<digest>/`, downloaded into `root/.tmp-*` and renamed into place
once verified, so a reader sees all of it or nothing; concurrent fetches of one digest download it
once. Past `max_bytes` the least recently used folders go, never one that is pinned (being fetched,
or read by the engine's load call). A folder's mtime is its last use, so the order survives a
restart. Listeners hear of each eviction: the engine registered that adapter under its digest and
may read its files again, so it forgets the digest and the next request fetches and loads it afresh.
One process uses a cache folder (its index and pins are in memory).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AdapterCache", "DEFAULT_CACHE_BYTES"]

DEFAULT_CACHE_BYTES = 20 * 1024**3
# a use reaches the folder's mtime at most this often (every request touches the cache)
_TOUCH_PERSIST_S = 60.0
_DIGEST = re.compile(r"[0-9a-f]{64}")
_LEFTOVERS = (".tmp-", ".del-")
# a younger one may be another process's download in progress (a `lorafleet gc` on this host)
_LEFTOVER_AGE_S = 3600.0

log = logging.getLogger("lorafleet.adapters.cache")


@dataclass
class _Entry:
    size: int
    last_used: float
    persisted: float  # when last_used last reached the folder's mtime


class AdapterCache:
    """Verified adapter folders by digest under `root`, within `max_bytes` (least recently used
    evicted)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = root, max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        # guards the index and pins; held for in-memory work and renames only
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._pins: Counter[str] = Counter()
        self._fetch_locks: dict[str, threading.Lock] = {}
        self._listeners: list[Callable[[str], None]] = []
        self._scan()

    def path(self, digest: str) -> Path:
        return self.root / digest

    def __contains__(self, digest: str) -> bool:
        with self._lock:
            return digest in self._entries

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return sum(entry.size for entry in self._entries.values())

    def on_evict(self, listener: Callable[[str], None]) -> None:
        """Call `listener(digest)` (in the evicting thread) after each eviction."""
        self._listeners.append(listener)

    @contextlib.contextmanager
    def pinned(self, digest: str) -> Iterator[None]:
        """Nothing evicts `digest` meanwhile (cheap: no I/O, fine on the event loop)."""
        with self._lock:
            self._pins[digest] += 1
        try:
            yield
        finally:
            with self._lock:
                self._pins[digest] -= 1
                if not self._pins[digest]:
                    del self._pins[digest]

    def touch(self, digest: str) -> None:
        """Note a use of `digest`; its folder's mtime follows at most every _TOUCH_PERSIST_S
        (cheap)."""
        now = time.time()
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return
            entry.last_used = now
            if now - entry.persisted < _TOUCH_PERSIST_S:
                return
            entry.persisted = now
        with contextlib.suppress(OSError):  # evicted meanwhile
            os.utime(self.path(digest))

    def fetch(self, digest: str, download: Callable[[Path], None]) -> Path:
        """The local folder of `digest`, filled by `download(folder)` (which verifies, or raises)
        on a miss. Blocking: call it in a worker thread, holding `pinned(digest)` while the
        folder is read."""
        if not _DIGEST.fullmatch(digest):
            raise ValueError(f"{digest!r} is not a sha256 hex digest")
        with self.pinned(digest), self._fetch_lock(digest):
            if not self._hit(digest):
                self._download(digest, download)
            self._evict()
        return self.path(digest)

    def _fetch_lock(self, digest: str) -> threading.Lock:
        with self._lock:
            return self._fetch_locks.setdefault(digest, threading.Lock())

    def _hit(self, digest: str) -> bool:
        with self._lock:
            if digest not in self._entries:
                return False
            if self.path(digest).is_dir():
                self._entries[digest].last_used = time.time()
                return True
            del self._entries[digest]  # removed behind our back: fetch it again
            return False

    def _download(self, digest: str, download: Callable[[Path], None]) -> None:
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            download(tmp)
            size = _folder_bytes(tmp)
            os.utime(tmp)  # its mtime is its last use
            # a stray unindexed copy: ours is verified
            shutil.rmtree(self.path(digest), ignore_errors=True)
            with self._lock:
                tmp.rename(self.path(digest))  # atomic: the engine sees all of it or nothing
                now = time.time()
                self._entries[digest] = _Entry(size, now, now)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _evict(self) -> None:
        """Remove least recently used, unpinned folders until the cache fits; then tell the
        listeners."""
        gone: list[tuple[str, Path]] = []
        with self._lock:
            total = sum(entry.size for entry in self._entries.values())
            for digest in sorted(self._entries, key=lambda d: self._entries[d].last_used):
                if total <= self.max_bytes:
                    break
                if self._pins[digest]:
                    continue
                trash = self.root / f".del-{uuid.uuid4().hex}"
                with contextlib.suppress(FileNotFoundError):
                    # out of sight at once; removed outside the lock
                    self.path(digest).rename(trash)
                total -= self._entries.pop(digest).size
                gone.append((digest, trash))
            if total > self.max_bytes:
                log.warning(
                    "adapter cache holds %d bytes, above its bound of %d: the rest are in use",
                    total,
                    self.max_bytes,
                )
        for digest, trash in gone:
            shutil.rmtree(trash, ignore_errors=True)
            log.info("evicted adapter %s from the cache", digest[:12])
            for listener in self._listeners:
                try:
                    listener(digest)
                # a listener's failure must not stop the others, nor the fetch that evicted
                except Exception:
                    log.exception("an eviction listener failed for %s", digest[:12])

    def _scan(self) -> None:
        """Index the folders a previous process left (verified before their rename); drop old
        half-done ones."""
        for entry in self.root.iterdir():
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                if entry.name.startswith(_LEFTOVERS):
                    if time.time() - entry.stat().st_mtime > _LEFTOVER_AGE_S:
                        shutil.rmtree(entry, ignore_errors=True)
                elif _DIGEST.fullmatch(entry.name) and entry.is_dir():
                    used = entry.stat().st_mtime
                    self._entries[entry.name] = _Entry(_folder_bytes(entry), used, used)


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())

"""The S3 adapter and blob stores against a real S3-API server on loopback, the engine host's
cache, and the local store behind the same interface."""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from pathlib import Path

import boto3
import pytest

from lorafleet.adapters.adapter_cache import AdapterCache
from lorafleet.adapters.base_model import BaseModelSpec
from lorafleet.adapters.s3_store import (
    MANIFEST,
    S3AdapterStore,
    S3BlobStore,
    S3Location,
    parse_s3_url,
)
from lorafleet.adapters.store import BlobStore, LocalStore, open_blob_store, open_store
from lorafleet.adapters.validate import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ValidatedAdapter,
    content_digest,
    validate_adapter_dir,
)
from lorafleet.errors import StoreCorrupt, StoreUnavailable
from tests.factories import SMALL_LORA, small_adapter


def test_a_fetch_checks_the_digest_that_validation_computes(tmp_path):
    adapter = small_adapter(tmp_path / "a", seed=1)
    layer = SMALL_LORA.removeprefix("base_model.model.")
    spec = BaseModelSpec("fake", "model.language_model", {layer: (16, 16)}, {})
    assert validate_adapter_dir(adapter.path, spec, max_rank=16).digest == adapter.digest
    # the config's JSON, not bytes
    assert small_adapter(tmp_path / "b", seed=1, indent=2).digest == adapter.digest
    assert small_adapter(tmp_path / "c", seed=2).digest != adapter.digest


@pytest.fixture
def location(s3_url: str) -> S3Location:
    """A fresh prefix of the test bucket."""
    return parse_s3_url(f"{s3_url}/{uuid.uuid4().hex[:8]}")


def _store(location: S3Location, tmp_path: Path, max_bytes: int = 10**9) -> S3AdapterStore:
    # a client of boto3's default session: a new session's first client reads the S3 API's model
    # again (a tenth of a second)
    return S3AdapterStore(
        location, AdapterCache(tmp_path / "cache", max_bytes), client=boto3.client("s3")
    )


def _keys(location: S3Location, under: str = "") -> list[str]:
    pages = (
        boto3.client("s3")
        .get_paginator("list_objects_v2")
        .paginate(Bucket=location.bucket, Prefix=location.key(under))
    )
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def _cache_entries(store: S3AdapterStore) -> list[str]:
    return sorted(p.name for p in store.cache.root.iterdir())


# --- put, visibility, fetch ---


def test_put_then_fetch_gives_the_verified_files(location, tmp_path):
    store = _store(location, tmp_path)
    adapter = small_adapter(tmp_path / "a", seed=1)
    assert not store.exists(adapter.digest)
    assert store.put(adapter) is True and store.exists(adapter.digest)
    assert store.put(adapter) is False  # already stored
    folder = store.fetch(adapter.digest)
    assert folder == store.local_path(adapter.digest) and adapter.digest in store.cache
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        assert (folder / name).read_bytes() == (adapter.path / name).read_bytes()
    assert [d for d, _ in store.digests()] == [adapter.digest]
    assert list(store.temp_entries()) == []


def test_manifest_is_written_last_and_names_each_file(location, tmp_path):
    store = _store(location, tmp_path)
    adapter = small_adapter(tmp_path / "a", seed=1)
    store.put(adapter)
    manifest = json.loads(
        boto3.client("s3")
        .get_object(Bucket=location.bucket, Key=location.key("adapters", adapter.digest, MANIFEST))[
            "Body"
        ]
        .read()
    )
    assert manifest["digest"] == adapter.digest
    weights = (adapter.path / WEIGHTS_FILE).read_bytes()
    assert manifest["files"][WEIGHTS_FILE] == {
        "size": len(weights),
        "sha256": hashlib.sha256(weights).hexdigest(),
    }
    upload = manifest["upload"]
    assert _keys(location, f"adapters/{adapter.digest}/") == sorted(
        location.key("adapters", adapter.digest, *parts)
        for parts in [(MANIFEST,), (upload, CONFIG_FILE), (upload, WEIGHTS_FILE)]
    )


def test_files_without_a_manifest_are_not_visible(location, tmp_path):
    store = _store(location, tmp_path)
    adapter = small_adapter(tmp_path / "a", seed=1)
    store.put(adapter)
    boto3.client("s3").delete_object(
        Bucket=location.bucket, Key=location.key("adapters", adapter.digest, MANIFEST)
    )
    assert not store.exists(adapter.digest) and list(store.digests()) == []
    ((entry, _),) = store.temp_entries()
    assert entry.startswith(f"{adapter.digest}/")
    with pytest.raises(StoreUnavailable) as missing:
        store.fetch(adapter.digest)
    assert missing.value.status == 503 and missing.value.digest == adapter.digest
    assert _cache_entries(store) == []
    store.remove_temp(entry)
    assert _keys(location) == []


def _overwrite(location: S3Location, digest: str, name: str, data: bytes) -> None:
    s3 = boto3.client("s3")
    key = location.key("adapters", digest, MANIFEST)
    upload = json.loads(s3.get_object(Bucket=location.bucket, Key=key)["Body"].read())["upload"]
    s3.put_object(
        Bucket=location.bucket, Key=location.key("adapters", digest, upload, name), Body=data
    )


def test_a_changed_object_is_refused_and_leaves_nothing_in_the_cache(location, tmp_path):
    store = _store(location, tmp_path)
    adapter = small_adapter(tmp_path / "a", seed=1)
    other = small_adapter(tmp_path / "b", seed=2)
    store.put(adapter)
    _overwrite(location, adapter.digest, WEIGHTS_FILE, (other.path / WEIGHTS_FILE).read_bytes())
    with pytest.raises(StoreCorrupt) as corrupt:
        store.fetch(adapter.digest)
    assert WEIGHTS_FILE in corrupt.value.message and corrupt.value.digest == adapter.digest
    assert _cache_entries(store) == []  # neither the folder nor its download


def test_files_that_match_their_manifest_but_not_the_digest_are_refused(location, tmp_path):
    store = _store(location, tmp_path)
    adapter = small_adapter(tmp_path / "a", seed=1)
    forged = small_adapter(tmp_path / "b", seed=2)
    store.put(adapter)
    s3, key = boto3.client("s3"), location.key("adapters", adapter.digest, MANIFEST)
    manifest = json.loads(s3.get_object(Bucket=location.bucket, Key=key)["Body"].read())
    data = (forged.path / WEIGHTS_FILE).read_bytes()
    manifest["files"][WEIGHTS_FILE] = {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    s3.put_object(Bucket=location.bucket, Key=key, Body=json.dumps(manifest).encode())
    _overwrite(location, adapter.digest, WEIGHTS_FILE, data)
    with pytest.raises(StoreCorrupt, match="content digest"):
        store.fetch(adapter.digest)
    assert _cache_entries(store) == []


def test_a_later_fetch_is_served_from_the_cache(location, tmp_path):
    store = _store(location, tmp_path)
    adapter = small_adapter(tmp_path / "a", seed=1)
    store.put(adapter)
    first = store.fetch(adapter.digest)
    boto3.client("s3").delete_object(
        Bucket=location.bucket, Key=location.key("adapters", adapter.digest, MANIFEST)
    )
    assert store.fetch(adapter.digest) == first  # no S3 call needed


def test_a_restarted_cache_keeps_its_copies(location, tmp_path):
    store = _store(location, tmp_path)
    adapter = small_adapter(tmp_path / "a", seed=1)
    store.put(adapter)
    store.fetch(adapter.digest)
    again = AdapterCache(store.cache.root, 10**9)
    assert adapter.digest in again and again.size_bytes == store.cache.size_bytes > 0


# --- the cache's bound ---


def _copy_in(adapter: ValidatedAdapter, calls: list[str] | None = None):
    def download(folder: Path) -> None:
        if calls is not None:
            calls.append(adapter.digest)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            (folder / name).write_bytes((adapter.path / name).read_bytes())

    return download


def test_the_least_recently_used_adapter_goes_first_and_listeners_hear_of_it(tmp_path):
    a, b, c = (small_adapter(tmp_path / name, seed) for seed, name in enumerate("abc"))
    cache = AdapterCache(tmp_path / "cache", max_bytes=a.size_bytes * 2 + a.size_bytes // 2)
    evicted: list[str] = []
    cache.on_evict(evicted.append)
    cache.fetch(a.digest, _copy_in(a))
    cache.fetch(b.digest, _copy_in(b))
    cache.touch(a.digest)  # a is used again: b is now the least recent
    cache.fetch(c.digest, _copy_in(c))
    assert evicted == [b.digest]
    assert a.digest in cache and c.digest in cache and b.digest not in cache
    assert not cache.path(b.digest).exists() and cache.size_bytes <= cache.max_bytes


def test_a_pinned_adapter_is_never_evicted(tmp_path):
    a, b, c = (small_adapter(tmp_path / name, seed) for seed, name in enumerate("abc"))
    cache = AdapterCache(tmp_path / "cache", max_bytes=a.size_bytes)
    evicted: list[str] = []
    cache.on_evict(evicted.append)
    cache.fetch(a.digest, _copy_in(a))
    with cache.pinned(a.digest):  # e.g. the engine is loading it
        cache.fetch(b.digest, _copy_in(b))
        # over the bound, for now
        assert evicted == [] and (cache.path(a.digest) / WEIGHTS_FILE).is_file()
    cache.fetch(c.digest, _copy_in(c))
    assert evicted == [a.digest, b.digest] and c.digest in cache


def test_concurrent_fetches_of_one_digest_download_it_once(tmp_path):
    adapter = small_adapter(tmp_path / "a", seed=1)
    cache = AdapterCache(tmp_path / "cache", max_bytes=10**9)
    calls: list[str] = []
    start = threading.Barrier(8)
    results: list[Path] = []

    def fetch() -> None:
        start.wait()
        results.append(cache.fetch(adapter.digest, _copy_in(adapter, calls)))

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [adapter.digest] and set(results) == {cache.path(adapter.digest)}


def test_concurrent_s3_fetches_download_once(location, tmp_path):
    store = _store(location, tmp_path)
    adapter = small_adapter(tmp_path / "a", seed=1)
    store.put(adapter)
    downloads: list[str] = []
    real = store._download
    store._download = lambda digest, folder: (downloads.append(digest), real(digest, folder))[1]
    start = threading.Barrier(6)
    threads = [
        threading.Thread(target=lambda: (start.wait(), store.fetch(adapter.digest)))
        for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (
        downloads == [adapter.digest]
        and (store.local_path(adapter.digest) / WEIGHTS_FILE).is_file()
    )


def test_a_failed_download_leaves_no_folder(tmp_path):
    cache = AdapterCache(tmp_path / "cache", max_bytes=10**9)

    def broken(folder: Path) -> None:
        (folder / WEIGHTS_FILE).write_bytes(b"half")
        raise StoreCorrupt("0" * 64, "test")

    with pytest.raises(StoreCorrupt):
        cache.fetch("0" * 64, broken)
    assert list(cache.root.iterdir()) == []


# --- delete and its race with an upload of the same content ---


def test_delete_removes_every_object(location, tmp_path):
    store = _store(location, tmp_path)
    adapter = small_adapter(tmp_path / "a", seed=1)
    store.put(adapter)
    assert store.delete(adapter.digest) is True
    assert not store.exists(adapter.digest) and _keys(location) == []
    assert store.delete(adapter.digest) is False  # nothing there


def test_a_kept_delete_puts_the_manifest_back(location, tmp_path):
    store = _store(location, tmp_path)
    adapter = small_adapter(tmp_path / "a", seed=1)
    store.put(adapter)
    seen: list[bool] = []

    def keep() -> bool:  # a version appeared: asked while the blob is out of sight
        seen.append(store.exists(adapter.digest))
        return True

    assert store.delete(adapter.digest, keep=keep) is False
    assert seen == [False] and store.exists(adapter.digest)
    assert (store.fetch(adapter.digest) / WEIGHTS_FILE).is_file()


def test_a_failing_look_at_the_catalog_keeps_the_blob(location, tmp_path):
    store = _store(location, tmp_path)
    adapter = small_adapter(tmp_path / "a", seed=1)
    store.put(adapter)

    def keep() -> bool:
        raise RuntimeError("catalog down")

    with pytest.raises(RuntimeError):
        store.delete(adapter.digest, keep=keep)
    assert store.exists(adapter.digest)


@pytest.mark.parametrize("kept", [False, True])
def test_an_upload_racing_a_delete_keeps_its_own_files(location, tmp_path, kept):
    """Another tenant uploads the same content (its config formatted differently) while the blob
    is out of sight; whatever the delete decides, the blob left is complete and verifies."""
    store = _store(location, tmp_path)
    adapter = small_adapter(tmp_path / "a", seed=1)
    same = small_adapter(tmp_path / "b", seed=1, indent=2)
    assert same.digest == adapter.digest
    store.put(adapter)

    def keep() -> bool:
        assert store.put(same) is True  # it sees no blob, so it writes one
        return kept  # False: its version commits after this look

    assert store.delete(adapter.digest, keep=keep) is not kept  # its own copy went, or came back
    assert store.exists(adapter.digest) and list(store.temp_entries()) == []
    assert (store.fetch(adapter.digest) / CONFIG_FILE).read_bytes() == (
        same.path / CONFIG_FILE
    ).read_bytes()


def test_a_put_repairs_a_manifest_whose_files_are_gone(location, tmp_path):
    store = _store(location, tmp_path)
    adapter = small_adapter(tmp_path / "a", seed=1)
    store.put(adapter)
    s3 = boto3.client("s3")
    for key in _keys(location):
        if not key.endswith(MANIFEST):
            s3.delete_object(Bucket=location.bucket, Key=key)
    assert store.put(adapter) is True
    assert (store.fetch(adapter.digest) / WEIGHTS_FILE).is_file()


# --- validation sets ---


def test_blob_store_roundtrip_and_delete_rules(location):
    blobs = S3BlobStore(location.child("validation"), ".jsonl", client=boto3.client("s3"))
    data = b'{"messages": []}\n'
    digest = blobs.put(data)
    assert digest == hashlib.sha256(data).hexdigest() and blobs.read(digest) == data
    assert _keys(location) == [location.key("validation", f"{digest}.jsonl")]
    ((listed, changed),) = blobs.digests()
    assert listed == digest
    # a row uses it
    assert blobs.delete(digest, keep=lambda: True) is False and blobs.read(digest) == data
    # put again since that listing
    assert blobs.delete(digest, if_unmodified_since=changed - 60) is False
    assert (
        blobs.delete(digest) is True
        and list(blobs.digests()) == []
        and list(blobs.temp_entries()) == []
    )
    with pytest.raises(StoreUnavailable):
        blobs.read(digest)


def test_blob_store_refuses_changed_bytes(location):
    blobs = S3BlobStore(location.child("validation"), ".jsonl", client=boto3.client("s3"))
    digest = blobs.put(b"one\n")
    boto3.client("s3").put_object(
        Bucket=location.bucket, Key=location.key("validation", f"{digest}.jsonl"), Body=b"two\n"
    )
    with pytest.raises(StoreCorrupt):
        blobs.read(digest)


def test_the_blob_store_follows_the_adapter_store_url(s3_url, tmp_path):
    assert isinstance(
        open_blob_store(f"{s3_url}/x", "validation", tmp_path / "v", ".jsonl"), S3BlobStore
    )
    local = open_blob_store(
        f"file://{tmp_path / 'adapters'}", "validation", tmp_path / "v", ".jsonl"
    )
    # where existing installs keep them
    assert isinstance(local, BlobStore) and local.root == tmp_path / "v"
    assert local.read(local.put(b"x\n")) == b"x\n"


# --- URLs ---


def test_s3_urls_give_bucket_and_prefix():
    assert parse_s3_url("s3://bucket/a/b/") == S3Location("bucket", "a/b")
    assert parse_s3_url("s3://bucket") == S3Location("bucket", "")
    assert S3Location("bucket", "").key("adapters", "d") == "adapters/d"


@pytest.mark.parametrize(
    "url", ["s3://", "s3:///prefix", "s3://Bad_Bucket/x", "s3://bucket/x?endpoint=y"]
)
def test_a_bad_s3_url_names_the_setting(url, tmp_path):
    with pytest.raises(ValueError, match="LORAFLEET_STORE_URL"):
        open_store(url, tmp_path / "cache")


def test_an_s3_store_needs_a_cache_folder_and_other_schemes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="LORAFLEET_STORE_CACHE_DIR"):
        open_store("s3://bucket/prefix")
    with pytest.raises(ValueError, match="file:///path or s3://bucket/prefix"):
        open_store("gs://bucket/prefix", tmp_path)
    assert isinstance(open_store("s3://bucket/prefix", tmp_path / "cache"), S3AdapterStore)


# --- the local store behind the same interface ---


def test_the_local_store_is_read_in_place(tmp_path):
    store = open_store(f"file://{tmp_path / 'adapters'}", tmp_path / "cache")
    assert isinstance(store, LocalStore)
    adapter = small_adapter(tmp_path / "a", seed=1)
    assert (
        store.put(adapter) is True and store.put(adapter) is False and store.exists(adapter.digest)
    )
    store.on_evict(lambda digest: pytest.fail("a local store never evicts"))
    with store.pinned(adapter.digest):
        assert store.fetch(adapter.digest) == tmp_path / "adapters" / adapter.digest
    store.touch(adapter.digest)
    assert content_digest(store.fetch(adapter.digest)) == adapter.digest
    # not there: the engine says so when it loads
    assert store.fetch("f" * 64) == store.local_path("f" * 64)
    assert not (tmp_path / "cache").exists()

"""Unpack an uploaded .tar.gz or .zip into a scratch folder, refusing a hostile archive before it
costs much.

Each member is checked from the zip's directory or the tar's header *before* any of its bytes are
written, and the first violation stops the read: nothing is extracted first and checked later. A
tar.gz is read as a stream whose decompressed bytes are counted as they come, so a gzip bomb stops
after at most MAX_COMPRESSION_RATIO times the upload's size (tar headers, PAX records and member
data alike). Only regular files and folders are written; links, devices, FIFOs, nested archives and
duplicates are refused.
"""

from __future__ import annotations

import gzip
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO, cast

from lorafleet.errors import InvalidAdapter, PayloadTooLarge

__all__ = [
    "unpack_archive",
    "MAX_MEMBERS",
    "MAX_PATH_DEPTH",
    "MAX_COMPRESSION_RATIO",
    "RATIO_FREE_BYTES",
    "NESTED_ARCHIVE_SUFFIXES",
]

MAX_MEMBERS = 64  # files and folders in one upload; a PEFT folder has 2-4 files
MAX_PATH_DEPTH = 4  # components of a member's path, e.g. outputs/run-1/adapter/adapter_config.json
# unpacked bytes per uploaded byte; trained float weights barely compress (~1.1x)
MAX_COMPRESSION_RATIO = 200
# up to this much unpacked, any ratio is fine: tar padding and a lone config compress well
RATIO_FREE_BYTES = 1 << 20
NESTED_ARCHIVE_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".rar")
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20
# tar headers and padding around the members: a PAX header, its records and the member's own header
# each, plus one record of read-ahead
_TAR_FRAMING_BYTES = 4 * 512 * MAX_MEMBERS + tarfile.RECORDSIZE
# one central-directory entry: 46 bytes, the name (<= 4 parts), extra fields
_ZIP_DIRECTORY_ENTRY_BYTES = 2048


class _Budget:
    """Unpacked bytes against the total limit and the compression-ratio limit of one upload."""

    def __init__(self, archive_bytes: int, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.ratio_bytes = max(MAX_COMPRESSION_RATIO * archive_bytes, RATIO_FREE_BYTES)

    def check(self, unpacked: int, slack: int = 0) -> None:
        """Raise once `unpacked` bytes (less `slack` of archive framing) pass either limit."""
        if unpacked - slack > self.max_bytes:
            raise PayloadTooLarge(f"archive unpacks to more than {self.max_bytes} bytes")
        if unpacked - slack > self.ratio_bytes:
            raise InvalidAdapter(
                "file",
                f"archive unpacks to more than {MAX_COMPRESSION_RATIO}x its size "
                f"({self.ratio_bytes} bytes): refused as a possible archive bomb",
            )


class _CountedStream:
    """A read-only stream that counts the decompressed bytes it hands out and stops at the
    budget."""

    def __init__(self, source: IO[bytes], budget: _Budget) -> None:
        self._source, self._budget, self.count = source, budget, 0

    def read(self, size: int = -1) -> bytes:
        # never read "all": a short read is fine for tarfile, which loops until it has what it asked
        # for
        data = self._source.read(min(size, _CHUNK) if size >= 0 else _CHUNK)
        self.count += len(data)
        self._budget.check(self.count, slack=_TAR_FRAMING_BYTES)
        return data


class _Members:
    """The members admitted so far; `admit` checks the next one before any of its bytes are
    written."""

    def __init__(self, budget: _Budget) -> None:
        self._budget = budget
        self._names: set[str] = set()
        self._count = self._declared = 0

    def admit(self, name: str, kind: str, size: int) -> PurePosixPath | None:
        """Return where the member goes under the destination (None: the archive's root folder)."""
        if kind in ("symlink", "hard link"):
            raise InvalidAdapter("file", f"links are not allowed in the archive: {name!r}")
        if kind not in ("file", "folder"):
            raise InvalidAdapter(
                "file", f"special file in archive ({kind}): {name!r}; only files and folders"
            )
        self._count += 1
        if self._count > MAX_MEMBERS:
            raise InvalidAdapter(
                "file", f"the archive holds more than {MAX_MEMBERS} files and folders"
            )
        path = _safe_path(name)
        if path is None and kind == "folder":
            return None
        if path is None:
            raise InvalidAdapter("file", f"a file without a name in the archive: {name!r}")
        _check_path(path, name, kind)
        if str(path) in self._names:
            raise InvalidAdapter("file", f"duplicate member in the archive: {name!r}")
        self._names.add(str(path))
        self._declared += size
        self._budget.check(self._declared)
        return path


def _safe_path(name: str) -> PurePosixPath | None:
    """The member's relative path, or None for the root folder; refuses anything that leaves the
    folder."""
    path = PurePosixPath(name.replace("\\", "/"))
    if (
        name.startswith(("/", "\\"))
        or ".." in path.parts
        or "\x00" in name
        or (path.parts and ":" in path.parts[0])
    ):
        raise InvalidAdapter("file", f"unsafe path in archive: {name!r}")
    return path if path.parts else None


def _check_path(path: PurePosixPath, name: str, kind: str) -> None:
    if len(path.parts) > MAX_PATH_DEPTH:
        raise InvalidAdapter(
            "file", f"{name!r} is nested {len(path.parts)} levels deep; at most {MAX_PATH_DEPTH}"
        )
    if kind == "file" and path.name.lower().endswith(NESTED_ARCHIVE_SUFFIXES):
        raise InvalidAdapter("file", f"nested archive {name!r}: upload the adapter folder itself")


def _write(source: IO[bytes], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with source, open(target, "xb") as out:  # "x": a member never overwrites another
        shutil.copyfileobj(source, out, _CHUNK)


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hard link"
    if member.issparse():  # its declared size is not the bytes that follow
        return "sparse file"
    if member.isfile():
        return "file"
    if member.isdir():
        return "folder"
    return {
        tarfile.CHRTYPE: "character device",
        tarfile.BLKTYPE: "block device",
        tarfile.FIFOTYPE: "FIFO",
    }.get(member.type, f"tar type {member.type!r}")


def _is_gzip(archive: Path) -> bool:
    with open(archive, "rb") as raw:
        return raw.read(2) == _GZIP_MAGIC


def _unpack_tar(archive: Path, dest: Path, budget: _Budget) -> None:
    with open(archive, "rb") as raw:
        source = cast(IO[bytes], gzip.GzipFile(fileobj=raw) if _is_gzip(archive) else raw)
        # "r|": a stream, read once front to back, so nothing is decompressed ahead of the checks
        with tarfile.open(
            fileobj=cast(IO[bytes], _CountedStream(source, budget)), mode="r|"
        ) as tar:
            members = _Members(budget)
            for member in tar:
                path = members.admit(member.name, _tar_kind(member), member.size)
                if path is not None and member.isfile():
                    _write(cast(IO[bytes], tar.extractfile(member)), dest / path)
                elif path is not None:
                    (dest / path).mkdir(parents=True, exist_ok=True)


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if info.is_dir() or stat.S_ISDIR(mode):
        return "folder"
    if stat.S_IFMT(mode) in (0, stat.S_IFREG):  # 0: written without Unix modes (e.g. on Windows)
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return {
        stat.S_IFCHR: "character device",
        stat.S_IFBLK: "block device",
        stat.S_IFIFO: "FIFO",
        stat.S_IFSOCK: "socket",
    }.get(stat.S_IFMT(mode), f"file mode {oct(mode)}")


def _check_zip_directory(archive: BinaryIO) -> None:
    """Refuse an oversized member list from the end record alone, before zipfile parses every
    entry."""
    # zipfile walks the whole central directory on open; its end record (zip64 included) says how
    # big it is
    end = zipfile._EndRecData(archive)  # type: ignore[attr-defined]
    if end is None:
        raise InvalidAdapter("file", "not a .tar.gz or .zip archive")
    entries, size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
    if entries > MAX_MEMBERS or size > MAX_MEMBERS * _ZIP_DIRECTORY_ENTRY_BYTES:
        raise InvalidAdapter("file", f"the archive holds more than {MAX_MEMBERS} files and folders")


def _unpack_zip(archive: Path, dest: Path, budget: _Budget) -> None:
    with open(archive, "rb") as raw:
        _check_zip_directory(raw)
    with zipfile.ZipFile(archive) as zf:
        members, planned = _Members(budget), []
        for info in zf.infolist():  # every member is admitted before the first byte is written
            if info.flag_bits & 0x1:
                raise InvalidAdapter("file", f"encrypted member in the archive: {info.filename!r}")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise InvalidAdapter(
                    "file",
                    f"{info.filename!r}: compression method {info.compress_type} is "
                    "not accepted; use deflate",
                )
            planned.append((info, members.admit(info.filename, _zip_kind(info), info.file_size)))
        for info, path in planned:
            if path is not None and not info.is_dir():
                _write(zf.open(info), dest / path)  # zipfile stops each member at its declared size
            elif path is not None:
                (dest / path).mkdir(parents=True, exist_ok=True)


def unpack_archive(archive: Path, dest: Path, max_bytes: int) -> None:
    """Unpack a .zip, .tar.gz or .tar into `dest`, within the limits above; raise InvalidAdapter
    or PayloadTooLarge."""
    budget = _Budget(archive.stat().st_size, max_bytes)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            _unpack_zip(archive, dest, budget)
        elif _is_gzip(archive) or tarfile.is_tarfile(archive):
            _unpack_tar(archive, dest, budget)
        else:
            raise InvalidAdapter("file", "not a .tar.gz or .zip archive")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise InvalidAdapter("file", f"unreadable archive: {exc}") from exc

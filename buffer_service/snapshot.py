"""Atomic shard snapshots on the run's storage, no pickle.

The shard's directory is a :class:`td3drive.contracts.storage.RunStorage` location: a
local or shared filesystem path, or a URI (``s3://``, ``gs://``, ``file://``)
that every node reaches. A snapshot is a pair of files in it:

* ``snapshot-<seq>.td3r``: magic ``b"TD3RSNAP"``, a u32-length-prefixed JSON
  header (counters, ids, rate-limiter state), one u64-length-prefixed codec
  payload per chunk (:func:`td3drive.contracts.codec.pack`), and, with prioritized
  sampling, the live priorities as raw float64;
* ``snapshot-<seq>.done``: JSON ``{"bytes": ..., "crc32": ...}`` of the data
  file, written last.

Writing is atomic per file (:meth:`td3drive.contracts.storage.RunStorage.write_with`:
temp file, fsync and rename on a local filesystem; one upload on an object
store, the snapshot built in memory first), data file first, then the done
marker; only then are older snapshots removed. A crash at any point leaves
the previous complete snapshot in place, and :func:`read_latest` ignores a
data file without a matching done marker. Reading decodes every chunk
through the codec, so a damaged snapshot is rejected, not half-loaded.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from td3drive.contracts.codec import CodecError, CompressedChunk, decode, pack
from td3drive.contracts.storage import RunStorage

MAGIC = b"TD3RSNAP"
FORMAT_VERSION = 1
_NAME = re.compile(r"snapshot-(\d{8})\.td3r$")


class SnapshotError(ValueError):
    """A snapshot that cannot be read."""


@dataclass(frozen=True)
class SnapshotState:
    """What a shard saves and restores.

    Attributes:
        header: JSON-able counters and settings (ids, rate limiter, policy version).
        chunks: ``(first_id, chunk)`` oldest first.
        priorities: ``float64[size]`` live priorities ``p^α`` or ``None``.
    """

    header: dict[str, Any]
    chunks: list[tuple[int, CompressedChunk]]
    priorities: np.ndarray | None


def _storage(directory: str | Path | RunStorage) -> RunStorage:
    return directory if isinstance(directory, RunStorage) else RunStorage(directory)


def write_snapshot(directory: str | Path | RunStorage, state: SnapshotState) -> str:
    """Write ``state`` as the next snapshot in ``directory`` and remove older ones.

    Args:
        directory: the shard's snapshot directory: a local path (relative to
            this process's working directory), a URI, or a storage.

    Returns:
        The data file's location (an absolute path or a URI).

    Raises:
        OSError: (a :class:`td3drive.contracts.storage.StorageError`) the directory is
            not writable, the disk is full, the storage is unreachable; the
            previous snapshot is intact and no partial file is left behind.
    """
    storage = _storage(directory)
    storage.make_dirs()
    existing = sorted(_snapshots(storage))
    seq = existing[-1][0] + 1 if existing else 1
    data_name = f"snapshot-{seq:08d}.td3r"
    header = dict(state.header)
    header["format_version"] = FORMAT_VERSION
    header["first_ids"] = [first_id for first_id, _ in state.chunks]
    header["has_priorities"] = state.priorities is not None

    def write_data(handle: BinaryIO) -> None:
        crc = 0
        size = 0
        for part in _data_parts(header, state):
            handle.write(part)
            crc = zlib.crc32(part, crc)
            size += len(part)
        marker["bytes"], marker["crc32"] = size, crc

    marker: dict[str, int] = {}
    location = storage.write_with(data_name, write_data)
    storage.write_bytes(_done(data_name), json.dumps(marker).encode() + b"\n")
    for _, old in existing:
        storage.delete(_done(old))
        storage.delete(old)
    return location


def _done(data_name: str) -> str:
    """The done marker's name of a data file's name."""
    return data_name.removesuffix(".td3r") + ".done"


def _data_parts(header: dict[str, Any], state: SnapshotState) -> Iterator[bytes]:
    text = json.dumps(header).encode()
    yield MAGIC + struct.pack("<I", len(text)) + text
    for _, chunk in state.chunks:
        payload = pack(chunk)
        yield struct.pack("<Q", len(payload)) + payload
    if state.priorities is not None:
        raw = np.ascontiguousarray(state.priorities, dtype="<f8").tobytes()
        yield struct.pack("<Q", len(raw)) + raw


def read_latest(directory: str | Path | RunStorage) -> tuple[str, SnapshotState] | None:
    """The newest complete snapshot in ``directory``, or ``None`` if there is none.

    Snapshots without a done marker, or whose marker does not match the data
    (a crash mid-write), are skipped in favour of older complete ones.

    Args:
        directory: as for :func:`write_snapshot`.

    Returns:
        ``(data file location, state)`` or ``None``.

    Raises:
        SnapshotError: the newest complete-looking snapshot has a matching
            marker but does not parse (a bug or deliberate tampering).
        td3drive.contracts.storage.StorageError: the storage cannot be reached or listed.
    """
    storage = _storage(directory)
    if not storage.is_dir():
        return None
    for _, name in sorted(_snapshots(storage), reverse=True):
        try:
            marker = json.loads(storage.read_text(_done(name)))
            data = storage.read_bytes(name)
        except (OSError, ValueError):
            continue
        if marker.get("bytes") != len(data) or marker.get("crc32") != zlib.crc32(data):
            continue
        location = storage.path(name)
        return location, _parse(location, data)
    return None


def _parse(path: str, data: bytes) -> SnapshotState:
    view = memoryview(data)
    try:
        if bytes(view[:8]) != MAGIC:
            raise SnapshotError(f"{path}: not a td3drive replay snapshot")
        (length,) = struct.unpack_from("<I", view, 8)
        header = json.loads(bytes(view[12 : 12 + length]))
        if header.get("format_version") != FORMAT_VERSION:
            raise SnapshotError(f"{path}: snapshot format {header.get('format_version')}")
        offset = 12 + length
        chunks = []
        for first_id in header["first_ids"]:
            (size,) = struct.unpack_from("<Q", view, offset)
            chunks.append((int(first_id), decode(view[offset + 8 : offset + 8 + size])))
            offset += 8 + size
        priorities = None
        if header["has_priorities"]:
            (size,) = struct.unpack_from("<Q", view, offset)
            priorities = np.frombuffer(view[offset + 8 : offset + 8 + size], dtype="<f8").copy()
            offset += 8 + size
        if offset != len(data):
            raise SnapshotError(f"{path}: {len(data) - offset} unexpected trailing bytes")
    except (struct.error, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, SnapshotError):
            raise
        kind = "a chunk is invalid" if isinstance(exc, CodecError) else "malformed"
        raise SnapshotError(f"{path}: {kind}: {exc}") from exc
    return SnapshotState(header=header, chunks=chunks, priorities=priorities)


def _snapshots(storage: RunStorage) -> Iterator[tuple[int, str]]:
    """``(sequence number, data file name)`` of the snapshots in ``storage``."""
    for name in storage.list():
        match = _NAME.match(name)
        if match:
            yield int(match.group(1)), name

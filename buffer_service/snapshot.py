"""Atomic shard snapshots on disk, no pickle.

A snapshot is a pair of files in the shard's directory:

* ``snapshot-<seq>.td3r``: magic ``b"TD3RSNAP"``, a u32-length-prefixed JSON
  header (counters, ids, rate-limiter state), one u64-length-prefixed codec
  payload per chunk (:func:`buffer_service.codec.pack`), and, with prioritized
  sampling, the live priorities as raw float64;
* ``snapshot-<seq>.done``: JSON ``{"bytes": ..., "crc32": ...}`` of the data
  file, written last.

Writing goes to a temp file, is fsynced and renamed, then the done marker is
written the same way; only then are older snapshots removed. A crash at any
point leaves the previous complete snapshot in place, and :func:`read_latest`
ignores a data file without a matching done marker. Reading decodes every
chunk through the codec, so a damaged snapshot is rejected, not half-loaded.
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

from buffer_service.codec import CodecError, CompressedChunk, decode, pack
from td3drive.atomic_file import atomic_write

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


def write_snapshot(directory: str | Path, state: SnapshotState) -> Path:
    """Write ``state`` as the next snapshot in ``directory`` and remove older ones.

    Returns:
        The data file's path.

    Raises:
        OSError: the directory is not writable or the disk is full; the
            previous snapshot is intact and no partial file is left behind.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    existing = sorted(_snapshots(directory))
    seq = existing[-1][0] + 1 if existing else 1
    data_path = directory / f"snapshot-{seq:08d}.td3r"
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
    atomic_write(data_path, write_data)
    atomic_write(
        data_path.with_suffix(".done"), lambda h: h.write(json.dumps(marker).encode() + b"\n")
    )
    for _, old in existing:
        old.with_suffix(".done").unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    return data_path


def _data_parts(header: dict[str, Any], state: SnapshotState) -> Iterator[bytes]:
    text = json.dumps(header).encode()
    yield MAGIC + struct.pack("<I", len(text)) + text
    for _, chunk in state.chunks:
        payload = pack(chunk)
        yield struct.pack("<Q", len(payload)) + payload
    if state.priorities is not None:
        raw = np.ascontiguousarray(state.priorities, dtype="<f8").tobytes()
        yield struct.pack("<Q", len(raw)) + raw


def read_latest(directory: str | Path) -> tuple[Path, SnapshotState] | None:
    """The newest complete snapshot in ``directory``, or ``None`` if there is none.

    Snapshots without a done marker, or whose marker does not match the data
    (a crash mid-write), are skipped in favour of older complete ones.

    Raises:
        SnapshotError: the newest complete-looking snapshot has a matching
            marker but does not parse (a bug or deliberate tampering).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for _, path in sorted(_snapshots(directory), reverse=True):
        marker_path = path.with_suffix(".done")
        try:
            marker = json.loads(marker_path.read_text())
            data = path.read_bytes()
        except (OSError, ValueError):
            continue
        if marker.get("bytes") != len(data) or marker.get("crc32") != zlib.crc32(data):
            continue
        return path, _parse(path, data)
    return None


def _parse(path: Path, data: bytes) -> SnapshotState:
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


def _snapshots(directory: Path) -> Iterator[tuple[int, Path]]:
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match:
            yield int(match.group(1)), path

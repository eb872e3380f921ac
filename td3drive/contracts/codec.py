"""Chunk wire format: consecutive steps of one episode, frames stored once, LZ4.

A chunk of ``T`` steps carries ``T + 4`` grayscale frames (not ``2 × 4 × T``):
step ``t`` observes the stack ``frames[t : t + 4]`` (oldest first) and its next
observation is ``frames[t + 1 : t + 5]``. Vectors likewise: ``T + 1`` of them,
``vectors[t]`` and ``vectors[t + 1]``.

Layout of a payload (all little-endian)::

    header   struct "<4sHHIqqII": magic b"TD3C", format version, reserved (0),
             num_steps T, episode_id, first_step, len(arrays), len(frames)
    crc32    u32 over the header and everything after the crc
    arrays   LZ4 block (4-byte size prefix) of: a directory of 6 entries
             (name, numpy dtype string, ndim, shape) and then the arrays
             vectors f4[T+1,23], actions f4[T,2], rewards f4[T],
             terminated u1[T], truncated u1[T], versions i8[T], in that order
    frames   u32 offsets[T+5], then T+4 LZ4 blocks, one per 84×84 frame

Frames are compressed one by one (DESIGN.md §7: ~6× each, ~1.1 KB) so a
sampler decompresses only the 5–8 frames a transition needs. That departs
from "the whole payload LZ4-compressed" in DESIGN.md §2 for that reason; the
small arrays are compressed together.

No pickle: decoding parses fixed structs and numpy buffers only, so untrusted
bytes never run code. Everything that is not exactly right raises
:class:`CodecError` before anything is returned.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import lz4.block
import numpy as np

from td3drive.contracts import spec
from td3drive.contracts.spec import Transition

MAGIC = b"TD3C"
FORMAT_VERSION = 1
MAX_STEPS = 4096
"""Largest chunk accepted; bounds what a hostile header can make us allocate."""

MAX_ABS_REWARD = 1e6
"""Largest ``|reward|`` of one step that a chunk may carry.

A driving task's step reward is O(1) (:mod:`td3drive.task`); this leaves six
orders of magnitude for other reward scales while keeping everything the
learner derives from rewards finite in float32: an n-step return is at most
``n · 1e6`` (``n ≤`` :data:`MAX_STEPS`), a value estimate about
``1e6 / (1 − γ)`` (``1e8`` at ``γ = 0.99``) and the critic's squared error
about ``1e16``, far below float32's ``3.4e38``. Finite rewards near float32's
maximum would otherwise overflow the n-step sum to ``inf`` and poison every
batch that samples them."""

_HEADER = struct.Struct("<4sHHIqqII")
_CRC = struct.Struct("<I")
_ENTRY = struct.Struct("<12s4sB3xII")
_FRAME_BYTES = spec.FRAME_SIZE * spec.FRAME_SIZE
_FRAME_SHAPE = (spec.FRAME_SIZE, spec.FRAME_SIZE)

# name, dtype, shape as a function of T
_ARRAYS: tuple[tuple[str, np.dtype[Any], Callable[[int], tuple[int, ...]]], ...] = (
    ("vectors", np.dtype("<f4"), lambda t: (t + 1, spec.VECTOR_DIM)),
    ("actions", np.dtype("<f4"), lambda t: (t, spec.ACTION_DIM)),
    ("rewards", np.dtype("<f4"), lambda t: (t,)),
    ("terminated", np.dtype("u1"), lambda t: (t,)),
    ("truncated", np.dtype("u1"), lambda t: (t,)),
    ("versions", np.dtype("<i8"), lambda t: (t,)),
)


class CodecError(ValueError):
    """A payload or chunk that does not satisfy the wire format; nothing was decoded."""


@dataclass(frozen=True, eq=False)
class Chunk:
    """``T`` consecutive steps of one episode, uncompressed.

    Attributes:
        frames: ``uint8[T+4, 84, 84]``; step ``t`` sees ``frames[t:t+4]``.
        vectors: ``float32[T+1, 23]``; step ``t`` sees ``vectors[t]``.
        actions: ``float32[T, 2]`` in ``[-1, 1]``.
        rewards: ``float32[T]``.
        terminated: ``bool[T]``; only the last step may be true.
        truncated: ``bool[T]``; only the last step may be true.
        versions: ``int64[T]``, policy version that chose each action.
        episode_id: episode of all steps, ``≥ 0``.
        first_step: step index of ``t = 0`` within the episode, ``≥ 0``.
    """

    frames: np.ndarray
    vectors: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    versions: np.ndarray
    episode_id: int
    first_step: int

    @property
    def num_steps(self) -> int:
        return int(self.actions.shape[0])

    def obs(self, t: int) -> dict[str, np.ndarray]:
        """Observation of step ``t`` (``0 ≤ t ≤ T``; ``t = T`` is the last next_obs)."""
        return {"image": self.frames[t : t + spec.FRAME_STACK], "vector": self.vectors[t]}

    def transitions(self) -> list[Transition]:
        """The chunk as one-step transitions (for tests and reference buffers)."""
        return [
            Transition(
                obs=self.obs(t),
                action=self.actions[t],
                reward=float(self.rewards[t]),
                next_obs=self.obs(t + 1),
                terminated=bool(self.terminated[t]),
                truncated=bool(self.truncated[t]),
                policy_version=int(self.versions[t]),
                episode_id=self.episode_id,
                step=self.first_step + t,
            )
            for t in range(self.num_steps)
        ]

    def equals(self, other: Chunk) -> bool:
        """Bit-for-bit equality of every array and field."""
        return (
            self.episode_id == other.episode_id
            and self.first_step == other.first_step
            and all(
                a.dtype == b.dtype and np.array_equal(a, b)
                for a, b in zip(self._arrays(), other._arrays(), strict=True)
            )
        )

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return (
            self.frames,
            self.vectors,
            self.actions,
            self.rewards,
            self.terminated,
            self.truncated,
            self.versions,
        )

    @classmethod
    def from_transitions(cls, transitions: Sequence[Transition]) -> Chunk:
        """Pack consecutive transitions of one episode, storing each frame once.

        Raises:
            CodecError: empty input, steps of different episodes or not
                consecutive, an episode end before the last step, or
                observations whose frame stacks do not slide by one frame
                (``next_obs`` of step ``t`` must be the ``obs`` of ``t + 1``).
        """
        if not transitions:
            raise CodecError("a chunk needs at least one transition")
        first = transitions[0]
        for t, (cur, nxt) in enumerate(itertools.pairwise(transitions)):
            if cur.terminated or cur.truncated:
                raise CodecError(f"step {t} ends the episode but is not the chunk's last")
            if nxt.episode_id != first.episode_id or nxt.step != cur.step + 1:
                raise CodecError(f"step {t + 1} does not follow step {t} in one episode")
            for key in spec.OBS_KEYS:
                if not np.array_equal(cur.next_obs[key], nxt.obs[key]):
                    raise CodecError(f"next_obs[{key!r}] of step {t} differs from obs of {t + 1}")
        for t, step in enumerate(transitions):
            if not np.array_equal(step.obs["image"][1:], step.next_obs["image"][:-1]):
                raise CodecError(f"frame stack of step {t} does not slide by one frame")
        frames = np.concatenate(
            [first.obs["image"], np.stack([s.next_obs["image"][-1] for s in transitions])]
        )
        vectors = np.stack([first.obs["vector"], *(s.next_obs["vector"] for s in transitions)])
        chunk = cls(
            frames=np.ascontiguousarray(frames, dtype=np.uint8),
            vectors=vectors.astype(np.float32),
            actions=np.stack([s.action for s in transitions]).astype(np.float32),
            rewards=np.asarray([s.reward for s in transitions], dtype=np.float32),
            terminated=np.asarray([s.terminated for s in transitions], dtype=bool),
            truncated=np.asarray([s.truncated for s in transitions], dtype=bool),
            versions=np.asarray([s.policy_version for s in transitions], dtype=np.int64),
            episode_id=int(first.episode_id),
            first_step=int(first.step),
        )
        validate_chunk(chunk)
        return chunk


@dataclass(frozen=True, eq=False)
class CompressedChunk:
    """A validated chunk as a shard holds it: frames LZ4-compressed one by one,
    the small arrays decoded (read-only numpy views).

    Attributes:
        frame_data: the concatenated LZ4 blocks of the ``T + 4`` frames.
        frame_offsets: ``uint32[T+5]``; frame ``i`` is ``frame_data[o[i]:o[i+1]]``.
        vectors, actions, rewards, terminated, truncated, versions,
        episode_id, first_step: as in :class:`Chunk`.
    """

    frame_data: bytes
    frame_offsets: np.ndarray
    vectors: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    versions: np.ndarray
    episode_id: int
    first_step: int

    @property
    def num_steps(self) -> int:
        return int(self.actions.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of payload this chunk holds (frames, offsets and arrays)."""
        arrays = (
            self.frame_offsets,
            self.vectors,
            self.actions,
            self.rewards,
            self.terminated,
            self.truncated,
            self.versions,
        )
        return len(self.frame_data) + sum(a.nbytes for a in arrays)

    def frame(self, index: int) -> np.ndarray:
        """Decompress frame ``index`` (``0 ≤ index < T + 4``): ``uint8[84, 84]``."""
        start, end = int(self.frame_offsets[index]), int(self.frame_offsets[index + 1])
        raw = lz4.block.decompress(
            memoryview(self.frame_data)[start:end], uncompressed_size=_FRAME_BYTES
        )
        return np.frombuffer(raw, dtype=np.uint8).reshape(_FRAME_SHAPE)

    def decompress(self) -> Chunk:
        """The full :class:`Chunk` (all frames decompressed)."""
        frames = np.stack([self.frame(i) for i in range(self.num_steps + spec.FRAME_STACK)])
        return Chunk(
            frames=frames,
            vectors=self.vectors,
            actions=self.actions,
            rewards=self.rewards,
            terminated=self.terminated.astype(bool),
            truncated=self.truncated.astype(bool),
            versions=self.versions,
            episode_id=self.episode_id,
            first_step=self.first_step,
        )


def decompress_frames(
    chunks: Sequence[CompressedChunk],
    chunk_index: np.ndarray,
    frame_index: np.ndarray,
    pool: Executor | None = None,
    parts: int = 1,
) -> np.ndarray:
    """Decompress many frames of several chunks into one array.

    Row ``i`` of the result is frame ``frame_index[i]`` of
    ``chunks[chunk_index[i]]``. The frames are decompressed in ``parts``
    contiguous slices, on ``pool`` when one is given (``lz4`` releases the GIL
    while it decompresses), each written straight into the result.

    Args:
        chunks: validated chunks (:func:`decode` test-decompressed every frame).
        chunk_index: ``int[N]``, indices into ``chunks``.
        frame_index: ``int[N]``, ``0 ≤ frame_index[i] < T + 4`` of that chunk.
        pool: threads to decompress on; ``None`` decompresses in this thread.
        parts: slices to split the work into (``≥ 1``; only used with ``pool``).

    Returns:
        ``uint8[N, 84, 84]``.

    Raises:
        IndexError: an index out of range.
        ValueError: a frame that does not decompress to 84×84 bytes (not
            possible for chunks that came through :func:`decode`).
    """
    starts, ends = frame_blocks(chunks, chunk_index, frame_index)
    sources = [memoryview(c.frame_data) for c in chunks]
    return decompress_blocks(sources, chunk_index, starts, ends, pool, parts)


def frame_blocks(
    chunks: Sequence[CompressedChunk], chunk_index: np.ndarray, frame_index: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Where frame ``frame_index[i]`` of ``chunks[chunk_index[i]]`` lies in
    that chunk's ``frame_data``.

    Args:
        chunks: the chunks.
        chunk_index: ``int[N]``, indices into ``chunks``, ``≥ 0``.
        frame_index: ``int[N]``, ``0 ≤ frame_index[i] < T + 4`` of that chunk.

    Returns:
        ``(starts int64[N], ends int64[N])``, byte offsets.

    Raises:
        IndexError: an index out of range.
    """
    chunk_index = np.asarray(chunk_index, dtype=np.int64)
    frame_index = np.asarray(frame_index, dtype=np.int64)
    if chunk_index.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if frame_index.min() < 0 or chunk_index.min() < 0:
        raise IndexError("negative chunk or frame index")
    # Every chunk's offset table, end to end: chunk c's starts at table_base[c].
    tables = [c.frame_offsets for c in chunks]
    table_size = np.asarray([t.shape[0] for t in tables], dtype=np.int64)
    table_base = np.zeros(len(tables), dtype=np.int64)
    np.cumsum(table_size[:-1], out=table_base[1:])
    if (frame_index + 1 >= table_size[chunk_index]).any():
        raise IndexError("frame index beyond its chunk's frames")
    offsets = np.concatenate(tables).astype(np.int64)
    where = table_base[chunk_index] + frame_index
    return offsets[where], offsets[where + 1]


def decompress_blocks(
    sources: Sequence[bytes | memoryview],
    source_index: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    pool: Executor | None = None,
    parts: int = 1,
) -> np.ndarray:
    """Decompress LZ4 frame blocks: row ``i`` of the result is the block
    ``sources[source_index[i]][starts[i]:ends[i]]``, decompressed straight
    into it, in ``parts`` slices on ``pool`` when one is given.

    Args:
        sources: byte buffers holding LZ4 blocks of 84×84 frames (no size prefix).
        source_index: ``int[N]``, indices into ``sources``.
        starts, ends: ``int[N]`` byte offsets of each block in its source.
        pool: threads to decompress on; ``None`` decompresses in this thread.
        parts: slices to split the work into (``≥ 1``; only used with ``pool``).

    Returns:
        ``uint8[N, 84, 84]``.

    Raises:
        lz4.block.LZ4BlockError: a block that is not valid LZ4.
        ValueError: a block that does not decompress to 84×84 bytes.
    """
    count = int(np.asarray(source_index).shape[0])
    out = np.empty((count, *_FRAME_SHAPE), dtype=np.uint8)
    if count == 0:
        return out
    views = [memoryview(source) for source in sources]
    which = np.asarray(source_index, dtype=np.int64).tolist()
    first = np.asarray(starts, dtype=np.int64).tolist()
    last = np.asarray(ends, dtype=np.int64).tolist()
    flat = out.reshape(-1).data  # writable bytes of `out`, to decompress straight into

    def run(lo: int, hi: int) -> None:
        decompress = lz4.block.decompress
        for i in range(lo, hi):
            data = views[which[i]][first[i] : last[i]]
            flat[i * _FRAME_BYTES : (i + 1) * _FRAME_BYTES] = decompress(
                data, uncompressed_size=_FRAME_BYTES
            )

    if pool is None or parts <= 1:
        run(0, count)
    else:
        bounds = np.linspace(0, count, min(parts, count) + 1).astype(int).tolist()
        futures = [pool.submit(run, lo, hi) for lo, hi in itertools.pairwise(bounds)]
        for future in futures:
            future.result()
    return out


def validate_chunk(chunk: Chunk) -> None:
    """Check a chunk's shapes, dtypes and values.

    Raises:
        CodecError: naming the field: wrong shape or dtype, NaN/inf, action
            outside ``[-1, 1]``, ``|reward| >`` :data:`MAX_ABS_REWARD`, an
            episode end before the last step, negative ids, or more than
            :data:`MAX_STEPS` steps.
    """
    for name in ("frames", "vectors", "actions", "rewards", "terminated", "truncated", "versions"):
        value = getattr(chunk, name)
        if not isinstance(value, np.ndarray):
            raise CodecError(f"{name}: expected a numpy array, got {type(value).__name__}")
    for name in ("episode_id", "first_step"):
        value = getattr(chunk, name)
        if not isinstance(value, int | np.integer) or not 0 <= value < 2**63:
            raise CodecError(f"{name}: expected an integer in [0, 2**63), got {value!r}")
    steps = chunk.actions.shape[0] if chunk.actions.ndim else 0
    if not 1 <= steps <= MAX_STEPS:
        raise CodecError(f"chunk has {steps} steps; expected 1..{MAX_STEPS}")
    expected = {
        "frames": (np.dtype(np.uint8), (steps + spec.FRAME_STACK, *_FRAME_SHAPE)),
        "vectors": (np.dtype(np.float32), (steps + 1, spec.VECTOR_DIM)),
        "actions": (np.dtype(np.float32), (steps, spec.ACTION_DIM)),
        "rewards": (np.dtype(np.float32), (steps,)),
        "terminated": (np.dtype(bool), (steps,)),
        "truncated": (np.dtype(bool), (steps,)),
        "versions": (np.dtype(np.int64), (steps,)),
    }
    for name, (dtype, shape) in expected.items():
        value = getattr(chunk, name)
        if value.dtype != dtype:
            raise CodecError(f"{name}: expected dtype {dtype}, got {value.dtype}")
        if value.shape != shape:
            raise CodecError(f"{name}: expected shape {list(shape)}, got {list(value.shape)}")
    _check_values(
        chunk.vectors,
        chunk.actions,
        chunk.rewards,
        chunk.terminated,
        chunk.truncated,
        chunk.versions,
        chunk.episode_id,
        chunk.first_step,
    )


def _check_values(
    vectors: np.ndarray,
    actions: np.ndarray,
    rewards: np.ndarray,
    terminated: np.ndarray,
    truncated: np.ndarray,
    versions: np.ndarray,
    episode_id: int,
    first_step: int,
) -> None:
    for name, value in (("vectors", vectors), ("actions", actions), ("rewards", rewards)):
        if not np.isfinite(value).all():
            raise CodecError(f"{name}: contains NaN or inf")
    if np.abs(rewards).max() > MAX_ABS_REWARD:
        raise CodecError(
            f"rewards: |reward| {float(np.abs(rewards).max()):.4g} exceeds "
            f"codec.MAX_ABS_REWARD ({MAX_ABS_REWARD:g}); scale the task's reward down"
        )
    if np.abs(actions).max() > 1.0:
        raise CodecError("actions: values outside [-1, 1]")
    if terminated[:-1].any() or truncated[:-1].any():
        raise CodecError("terminated/truncated: episode ends before the chunk's last step")
    if versions.min() < 0:
        raise CodecError("versions: negative policy version")
    if episode_id < 0 or first_step < 0:
        raise CodecError("episode_id and first_step must be >= 0")


def compress(chunk: Chunk) -> CompressedChunk:
    """Compress each frame of a validated chunk (LZ4 block, no size prefix).

    Raises:
        CodecError: the chunk is invalid (see :func:`validate_chunk`).
    """
    validate_chunk(chunk)
    blocks = [lz4.block.compress(frame.tobytes(), store_size=False) for frame in chunk.frames]
    offsets = np.zeros(len(blocks) + 1, dtype=np.uint32)
    np.cumsum([len(b) for b in blocks], out=offsets[1:])
    return CompressedChunk(
        frame_data=b"".join(blocks),
        frame_offsets=offsets,
        vectors=chunk.vectors,
        actions=chunk.actions,
        rewards=chunk.rewards,
        terminated=chunk.terminated.astype(np.uint8),
        truncated=chunk.truncated.astype(np.uint8),
        versions=chunk.versions,
        episode_id=chunk.episode_id,
        first_step=chunk.first_step,
    )


def encode(chunk: Chunk) -> bytes:
    """Chunk → payload bytes (see the module docstring for the layout).

    Raises:
        CodecError: the chunk is invalid.
    """
    return pack(compress(chunk))


def pack(compressed: CompressedChunk) -> bytes:
    """A :class:`CompressedChunk` → payload bytes, without recompressing frames."""
    arrays = {
        "vectors": compressed.vectors,
        "actions": compressed.actions,
        "rewards": compressed.rewards,
        "terminated": compressed.terminated,
        "truncated": compressed.truncated,
        "versions": compressed.versions,
    }
    return pack_arrays(
        compressed.num_steps,
        compressed.episode_id,
        compressed.first_step,
        arrays,
        compressed.frame_offsets,
        compressed.frame_data,
    )


def pack_arrays(
    num_steps: int,
    episode_id: int,
    first_step: int,
    arrays: dict[str, np.ndarray],
    frame_offsets: np.ndarray,
    frame_data: bytes,
    version: int = FORMAT_VERSION,
) -> bytes:
    """Low-level writer: packs whatever it is given, valid or not, with a
    correct checksum. :func:`encode` is the way to make payloads; this exists
    so tests can build well-formed payloads with wrong contents."""
    directory = []
    data = []
    for name, value in arrays.items():
        shape = (*value.shape, 0, 0)[:2]
        directory.append(
            _ENTRY.pack(
                name.encode()[:12], value.dtype.str.encode()[:4], value.ndim, shape[0], shape[1]
            )
        )
        data.append(np.ascontiguousarray(value).tobytes())
    arrays_blob = lz4.block.compress(b"".join(directory + data), store_size=True)
    frames_blob = frame_offsets.astype("<u4").tobytes() + frame_data
    header = _HEADER.pack(
        MAGIC,
        version,
        0,
        num_steps,
        episode_id,
        first_step,
        len(arrays_blob),
        len(frames_blob),
    )
    body = arrays_blob + frames_blob
    crc = zlib.crc32(body, zlib.crc32(header))
    return header + _CRC.pack(crc) + body


def _byte_view(payload: object) -> memoryview:
    """``payload`` as a flat byte view, if it is ``bytes``, ``bytearray`` or a
    contiguous ``memoryview``.

    Raises:
        CodecError: anything else (``str``, ``None``, numpy arrays, a
            non-contiguous view, ...).
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise CodecError(
            f"payload must be bytes, bytearray or memoryview, got {type(payload).__name__}"
        )
    try:
        return memoryview(payload).cast("B")
    except (TypeError, ValueError) as exc:
        raise CodecError(f"payload is not a contiguous byte buffer: {exc}") from None


def payload_steps(payload: object) -> int:
    """The step count a payload's header claims, without decoding the rest.

    Returns:
        ``T`` from the header (``1..MAX_STEPS``); the payload may still be
        invalid.

    Raises:
        CodecError: not bytes, shorter than the header, bad magic or a step
            count outside ``1..MAX_STEPS``.
    """
    view = _byte_view(payload)
    if len(view) < _HEADER.size:
        raise CodecError(f"payload of {len(view)} bytes is shorter than the header")
    magic, _, _, steps, *_ = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise CodecError(f"bad magic {bytes(magic)!r}; not a td3drive chunk")
    if not 1 <= steps <= MAX_STEPS:
        raise CodecError(f"header claims {steps} steps; expected 1..{MAX_STEPS}")
    return int(steps)


def decode(payload: bytes | bytearray | memoryview) -> CompressedChunk:
    """Parse and fully validate a payload; every frame is test-decompressed.

    Raises:
        CodecError: not ``bytes``/``bytearray``/contiguous ``memoryview``,
            truncated or oversized payload, bad magic, another format
            version, checksum mismatch, a directory entry with the wrong name,
            dtype or shape, undecodable LZ4 data, a frame that does not
            decompress to 84×84 bytes, NaN/inf, ``|reward| >``
            :data:`MAX_ABS_REWARD`, actions outside ``[-1, 1]``, an episode
            end before the last step, or negative ids.
    """
    view = _byte_view(payload)
    fixed = _HEADER.size + _CRC.size
    if len(view) < fixed:
        raise CodecError(f"payload of {len(view)} bytes is shorter than the {fixed}-byte header")
    magic, version, reserved, steps, episode_id, first_step, arrays_len, frames_len = (
        _HEADER.unpack_from(view)
    )
    if magic != MAGIC:
        raise CodecError(f"bad magic {bytes(magic)!r}; not a td3drive chunk")
    if version != FORMAT_VERSION:
        raise CodecError(f"format version {version}; this decoder reads {FORMAT_VERSION}")
    if reserved != 0:
        raise CodecError(f"reserved header field is {reserved}, expected 0")
    if not 1 <= steps <= MAX_STEPS:
        raise CodecError(f"header claims {steps} steps; expected 1..{MAX_STEPS}")
    if len(view) != fixed + arrays_len + frames_len:
        raise CodecError(
            f"payload is {len(view)} bytes; header says {fixed + arrays_len + frames_len}"
            " (truncated or padded)"
        )
    (crc,) = _CRC.unpack_from(view, _HEADER.size)
    body = view[fixed:]
    if zlib.crc32(body, zlib.crc32(view[: _HEADER.size])) != crc:
        raise CodecError("checksum mismatch: payload corrupted")

    arrays = _decode_arrays(body[:arrays_len], steps)
    frame_offsets, frame_data = _decode_frames(body[arrays_len:], steps)
    _check_values(
        arrays["vectors"],
        arrays["actions"],
        arrays["rewards"],
        arrays["terminated"],
        arrays["truncated"],
        arrays["versions"],
        episode_id,
        first_step,
    )
    return CompressedChunk(
        frame_data=frame_data,
        frame_offsets=frame_offsets,
        episode_id=int(episode_id),
        first_step=int(first_step),
        **arrays,
    )


def _decode_arrays(blob: memoryview, steps: int) -> dict[str, np.ndarray]:
    expected_size = len(_ARRAYS) * _ENTRY.size + sum(
        dtype.itemsize * int(np.prod(shape_of(steps))) for _, dtype, shape_of in _ARRAYS
    )
    if len(blob) < 4:
        raise CodecError("arrays section is truncated")
    (claimed,) = struct.unpack_from("<I", blob)
    if claimed != expected_size:
        raise CodecError(
            f"arrays section claims {claimed} bytes; {steps} steps need {expected_size}"
        )
    try:
        raw = lz4.block.decompress(blob)
    except lz4.block.LZ4BlockError as exc:
        raise CodecError(f"arrays section is not valid LZ4: {exc}") from exc
    if len(raw) != expected_size:
        raise CodecError("arrays section decompressed to the wrong size")
    out: dict[str, np.ndarray] = {}
    offset = len(_ARRAYS) * _ENTRY.size
    for index, (name, dtype, shape_of) in enumerate(_ARRAYS):
        got_name, got_dtype, ndim, d0, d1 = _ENTRY.unpack_from(raw, index * _ENTRY.size)
        shape = shape_of(steps)
        got_shape = (d0, d1)[:ndim]
        if got_name.rstrip(b"\0").decode(errors="replace") != name:
            raise CodecError(f"array {index}: expected {name!r}, got {got_name!r}")
        if got_dtype.rstrip(b"\0") != dtype.str.encode():
            raise CodecError(f"{name}: expected dtype {dtype.str}, got {got_dtype!r}")
        if ndim > 2 or tuple(got_shape) != tuple(shape):
            raise CodecError(f"{name}: expected shape {list(shape)}, got {list(got_shape)}")
        count = int(np.prod(shape))
        out[name] = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape)
        offset += count * dtype.itemsize
    if out["terminated"].max() > 1 or out["truncated"].max() > 1:
        raise CodecError("terminated/truncated: values other than 0 and 1")
    return out


def _decode_frames(blob: memoryview, steps: int) -> tuple[np.ndarray, bytes]:
    count = steps + spec.FRAME_STACK
    table = (count + 1) * 4
    if len(blob) < table:
        raise CodecError("frame section is shorter than its offset table")
    offsets = np.frombuffer(blob, dtype="<u4", count=count + 1).astype(np.uint32)
    data = bytes(blob[table:])
    if (
        offsets[0] != 0
        or offsets[-1] != len(data)
        or (np.diff(offsets.astype(np.int64)) <= 0).any()
    ):
        raise CodecError("frame offsets are not increasing within the frame data")
    for i in range(count):
        try:
            raw = lz4.block.decompress(
                memoryview(data)[offsets[i] : offsets[i + 1]], uncompressed_size=_FRAME_BYTES
            )
        except lz4.block.LZ4BlockError as exc:
            raise CodecError(f"frame {i} is not valid LZ4: {exc}") from exc
        if len(raw) != _FRAME_BYTES:
            raise CodecError(f"frame {i} decompressed to {len(raw)} bytes, not {_FRAME_BYTES}")
    return offsets, data

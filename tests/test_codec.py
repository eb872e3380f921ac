"""The chunk wire format (td3drive/contracts/codec.py): round trips, rejections, fuzzing.

Chunks are built the way a rollout worker builds them: from the transitions of
a small fake frame-stacking environment (reset repeats the first frame four
times; each step slides the stack by one frame; ``next_obs`` of step ``t`` is
the ``obs`` of step ``t + 1``).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import pickle
import struct
import zlib
from collections.abc import Callable
from typing import Any, Literal

import lz4.block
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from td3drive.contracts import codec, spec
from td3drive.contracts.codec import (
    FORMAT_VERSION,
    MAGIC,
    MAX_ABS_REWARD,
    MAX_STEPS,
    Chunk,
    CodecError,
    CompressedChunk,
    compress,
    decode,
    encode,
    pack,
    pack_arrays,
    payload_steps,
    validate_chunk,
)
from td3drive.contracts.spec import Transition

FRAME = spec.FRAME_SIZE
STACK = spec.FRAME_STACK
FRAME_BYTES = FRAME * FRAME
# The layout documented in the codec's module docstring, restated independently.
HEADER = struct.Struct("<4sHHIqqII")
CRC = struct.Struct("<I")
FIXED = HEADER.size + CRC.size  # 36 + 4
ARRAY_NAMES = ("vectors", "actions", "rewards", "terminated", "truncated", "versions")

End = Literal["none", "terminated", "truncated"]
Obs = dict[str, np.ndarray]


# --------------------------------------------------------------------------- helpers


def smooth_frame(k: int) -> np.ndarray:
    """World frame ``k``: a gradient with vertical bars, scrolled ``k`` px; compresses well.

    Pixels ``[0, 0]`` and ``[0, 1]`` encode ``k`` so that no two frames are equal
    and an off-by-one in frame indexing cannot go unnoticed.
    """
    cols = (np.arange(FRAME) + k) % FRAME
    rows = np.arange(FRAME)[:, None]
    img = (cols[None, :] * 2 + rows // 8).astype(np.uint8)
    img[:, cols % 21 == 0] = 255
    img[0, 0], img[0, 1] = k % 256, k // 256
    return img


class FakeFrameStackEnv:
    """A minimal frame-stacking environment: only the observations matter here."""

    def __init__(self, seed: int = 0, noise: bool = False) -> None:
        self._rng = np.random.default_rng(seed)
        self._seed = seed
        self._noise = noise
        self.world: list[np.ndarray] = []
        """Every frame rendered this episode, in order (``world[s]`` after ``s`` steps)."""

    def _render(self) -> np.ndarray:
        k = len(self.world)
        if self._noise:
            frame = self._rng.integers(0, 256, (FRAME, FRAME), dtype=np.uint8)
        else:
            frame = smooth_frame(k + self._seed)
        self.world.append(frame)
        return frame

    def _obs(self) -> Obs:
        s = len(self.world) - 1
        stack = [self.world[max(0, s - STACK + 1 + j)] for j in range(STACK)]
        vector = self._rng.standard_normal(spec.VECTOR_DIM).astype(np.float32)
        return {"image": np.stack(stack), "vector": vector}

    def reset(self) -> Obs:
        self.world = []
        self._render()
        return self._obs()

    def step(self) -> Obs:
        self._render()
        return self._obs()


def make_transitions(
    num_steps: int,
    *,
    first_step: int = 0,
    end: End = "none",
    episode_id: int = 3,
    noise: bool = False,
    seed: int = 0,
) -> tuple[list[Transition], np.ndarray]:
    """Steps ``first_step .. first_step + num_steps - 1`` of one episode of the fake env.

    Returns the transitions and the ``T + 4`` frames a chunk of them must store.
    Rewards and actions are float32-representable, so a chunk reproduces them exactly.
    """
    env = FakeFrameStackEnv(seed=seed, noise=noise)
    rng = np.random.default_rng(seed + 1000)
    obs = env.reset()
    for _ in range(first_step):
        obs = env.step()
    transitions = []
    for t in range(num_steps):
        action = rng.uniform(-1.0, 1.0, spec.ACTION_DIM).astype(np.float32)
        if t % 5 == 1:
            action[:] = (1.0, -1.0)  # the bounds themselves are allowed
        next_obs = env.step()
        last = t == num_steps - 1
        transitions.append(
            Transition(
                obs=obs,
                action=action,
                reward=float(np.float32(rng.normal())),
                next_obs=next_obs,
                terminated=last and end == "terminated",
                truncated=last and end == "truncated",
                policy_version=7 + (first_step + t) // 3,
                episode_id=episode_id,
                step=first_step + t,
            )
        )
        obs = next_obs
    frames = np.stack([env.world[max(0, first_step - STACK + 1 + i)] for i in range(num_steps + 4)])
    return transitions, frames


def make_chunk(
    num_steps: int = 4,
    *,
    first_step: int = 0,
    end: End = "none",
    episode_id: int = 3,
    noise: bool = False,
) -> Chunk:
    transitions, _ = make_transitions(
        num_steps, first_step=first_step, end=end, episode_id=episode_id, noise=noise
    )
    return Chunk.from_transitions(transitions)


def chunk_arrays(chunk: Chunk) -> dict[str, np.ndarray]:
    names = ("frames", *ARRAY_NAMES)
    return {name: getattr(chunk, name) for name in names}


def assert_chunks_identical(got: Chunk, want: Chunk) -> None:
    """Every array equal with the same dtype and shape, and the ids equal."""
    assert got.episode_id == want.episode_id
    assert got.first_step == want.first_step
    for name, want_array in chunk_arrays(want).items():
        got_array = getattr(got, name)
        assert got_array.dtype == want_array.dtype, name
        assert got_array.shape == want_array.shape, name
        assert np.array_equal(got_array, want_array), name
    assert got.equals(want)


def assert_transitions_identical(got: list[Transition], want: list[Transition]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        for key in spec.OBS_KEYS:
            for side in ("obs", "next_obs"):
                x, y = getattr(a, side)[key], getattr(b, side)[key]
                assert x.dtype == y.dtype and np.array_equal(x, y), (side, key, b.step)
        assert a.action.dtype == np.float32 and np.array_equal(a.action, b.action)
        assert a.reward == b.reward
        assert (a.terminated, a.truncated) == (b.terminated, b.truncated)
        assert (a.policy_version, a.episode_id, a.step) == (
            b.policy_version,
            b.episode_id,
            b.step,
        )


def split_payload(payload: bytes) -> tuple[tuple[Any, ...], bytes, bytes]:
    """Header fields, arrays section and frames section of a payload, by the documented layout."""
    fields = HEADER.unpack_from(payload)
    arrays_len, frames_len = fields[6], fields[7]
    arrays_blob = payload[FIXED : FIXED + arrays_len]
    frames_blob = payload[FIXED + arrays_len : FIXED + arrays_len + frames_len]
    return fields, arrays_blob, frames_blob


def raw_payload(
    arrays_blob: bytes,
    frames_blob: bytes,
    *,
    steps: int,
    episode_id: int = 3,
    first_step: int = 0,
    magic: bytes = MAGIC,
    version: int = FORMAT_VERSION,
    reserved: int = 0,
) -> bytes:
    """A payload assembled by hand (not by the codec), with a correct CRC32."""
    header = HEADER.pack(
        magic,
        version,
        reserved,
        steps,
        episode_id,
        first_step,
        len(arrays_blob),
        len(frames_blob),
    )
    crc = zlib.crc32(header + arrays_blob + frames_blob)
    return header + CRC.pack(crc) + arrays_blob + frames_blob


def recrc(payload: bytes | bytearray) -> bytes:
    """``payload`` with its checksum recomputed: structural checks, not the CRC, must catch it."""
    data = bytearray(payload)
    crc = zlib.crc32(bytes(data[FIXED:]), zlib.crc32(bytes(data[: HEADER.size])))
    CRC.pack_into(data, HEADER.size, crc)
    return bytes(data)


@dataclasses.dataclass(frozen=True)
class Parts:
    """The inputs of :func:`pack_arrays` for one chunk, to be altered one at a time."""

    num_steps: int
    episode_id: int
    first_step: int
    arrays: dict[str, np.ndarray]
    blocks: tuple[bytes, ...]
    offsets: np.ndarray | None = None  # None: derived from blocks
    version: int = FORMAT_VERSION

    @classmethod
    def of(cls, chunk: Chunk) -> Parts:
        cc = compress(chunk)
        o = cc.frame_offsets
        blocks = tuple(cc.frame_data[o[i] : o[i + 1]] for i in range(len(o) - 1))
        arrays = {name: np.array(getattr(cc, name)) for name in ARRAY_NAMES}
        return cls(cc.num_steps, cc.episode_id, cc.first_step, arrays, blocks)

    def with_arrays(self, **changes: np.ndarray) -> Parts:
        return dataclasses.replace(self, arrays={**self.arrays, **changes})

    def with_block(self, index: int, block: bytes) -> Parts:
        blocks = list(self.blocks)
        blocks[index] = block
        return dataclasses.replace(self, blocks=tuple(blocks))

    def default_offsets(self) -> np.ndarray:
        offsets = np.zeros(len(self.blocks) + 1, dtype=np.uint32)
        np.cumsum([len(b) for b in self.blocks], out=offsets[1:])
        return offsets

    def payload(self) -> bytes:
        offsets = self.default_offsets() if self.offsets is None else self.offsets
        return pack_arrays(
            self.num_steps,
            self.episode_id,
            self.first_step,
            self.arrays,
            offsets,
            b"".join(self.blocks),
            version=self.version,
        )


def with_value(array: np.ndarray, index: int | tuple[int, ...], value: float) -> np.ndarray:
    out = np.array(array)
    out[index] = value
    return out


# --------------------------------------------------------------------------- 1. round trip


@dataclasses.dataclass(frozen=True)
class Case:
    num_steps: int
    first_step: int
    end: End = "none"
    noise: bool = False
    seed: int = 0


ROUND_TRIP_CASES = {
    "episode_start": Case(8, first_step=0),
    "near_episode_start": Case(5, first_step=2),
    "mid_episode": Case(8, first_step=37),
    "ends_terminated": Case(8, first_step=12, end="terminated"),
    "ends_truncated": Case(8, first_step=12, end="truncated"),
    "single_step": Case(1, first_step=5),
    "single_step_at_reset_terminated": Case(1, first_step=0, end="terminated"),
    "single_step_truncated": Case(1, first_step=9, end="truncated"),
    "long": Case(64, first_step=100, seed=4),
    "long_from_reset_terminated": Case(64, first_step=0, end="terminated", seed=1),
    "noise_frames": Case(6, first_step=9, noise=True, seed=2),
}


@pytest.mark.parametrize("case", list(ROUND_TRIP_CASES.values()), ids=list(ROUND_TRIP_CASES))
def test_round_trip_is_bit_exact(case: Case) -> None:
    transitions, frames = make_transitions(
        case.num_steps, first_step=case.first_step, end=case.end, noise=case.noise, seed=case.seed
    )
    steps = case.num_steps
    chunk = Chunk.from_transitions(transitions)

    # Frames stored once: T + 4 of them, exactly the env's frames in order.
    assert chunk.num_steps == steps
    assert chunk.frames.shape == (steps + 4, FRAME, FRAME)
    assert chunk.frames.dtype == np.uint8
    assert np.array_equal(chunk.frames, frames)
    assert chunk.vectors.shape == (steps + 1, spec.VECTOR_DIM)
    assert_transitions_identical(chunk.transitions(), transitions)

    decoded = decode(encode(chunk)).decompress()
    assert_chunks_identical(decoded, chunk)
    assert_transitions_identical(decoded.transitions(), transitions)

    last = np.arange(steps) == steps - 1
    none = np.zeros(steps, dtype=bool)
    assert np.array_equal(decoded.terminated, last if case.end == "terminated" else none)
    assert np.array_equal(decoded.truncated, last if case.end == "truncated" else none)
    assert decoded.first_step == case.first_step
    if case.first_step == 0:  # a reset stack: the first frame four times
        assert all(np.array_equal(decoded.frames[i], decoded.frames[0]) for i in range(STACK))
        assert not np.array_equal(decoded.frames[STACK], decoded.frames[0])
    elif case.first_step >= STACK - 1:  # mid-episode: four distinct frames
        assert len({decoded.frames[i].tobytes() for i in range(STACK)}) == STACK


@pytest.mark.parametrize(
    ("episode_id", "first_step"), [(0, 0), (2**63 - 1, 2**62), (2**40, 2**63 - 1)]
)
def test_round_trip_keeps_extreme_ids(episode_id: int, first_step: int) -> None:
    chunk = dataclasses.replace(make_chunk(2), episode_id=episode_id, first_step=first_step)
    decoded = decode(encode(chunk)).decompress()
    assert_chunks_identical(decoded, chunk)
    assert [t.step for t in decoded.transitions()] == [first_step, first_step + 1]


def test_decode_accepts_bytes_bytearray_and_memoryview_and_does_not_alias_them() -> None:
    chunk = make_chunk(5, first_step=3)
    payload = encode(chunk)
    for form in (payload, bytearray(payload), memoryview(payload)):
        assert_chunks_identical(decode(form).decompress(), chunk)
    buffer = bytearray(payload)
    decoded = decode(buffer)
    buffer[:] = bytes(len(buffer))  # the caller reuses its receive buffer
    assert_chunks_identical(decoded.decompress(), chunk)
    assert not decoded.vectors.flags.writeable
    assert not decoded.actions.flags.writeable


@pytest.mark.parametrize(
    "payload",
    [
        "a str, not bytes",
        None,
        12345,
        [1, 2, 3],
        np.zeros((2, 10), np.uint8)[:, ::2],  # non-contiguous
        np.frombuffer(b"TD3C" + bytes(60), np.uint8),  # an array, even a contiguous one
        memoryview(bytes(64)).cast("B", (8, 8))[::2],  # a non-contiguous view
    ],
    ids=["str", "None", "int", "list", "strided_array", "array", "strided_view"],
)
def test_a_payload_that_is_not_bytes_is_rejected_with_codec_error(payload: object) -> None:
    with pytest.raises(CodecError, match="payload"):
        decode(payload)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="payload"):
        payload_steps(payload)


def test_rewards_at_the_limit_round_trip() -> None:
    chunk = make_chunk(4, first_step=6)
    rewards = np.array([MAX_ABS_REWARD, -MAX_ABS_REWARD, 0.0, MAX_ABS_REWARD], np.float32)
    chunk = dataclasses.replace(chunk, rewards=rewards)
    assert_chunks_identical(decode(encode(chunk)).decompress(), chunk)


def test_payload_steps_reads_the_header_only() -> None:
    payload = encode(make_chunk(7, first_step=3))
    assert payload_steps(payload) == 7
    assert payload_steps(payload[: HEADER.size]) == 7  # the rest is not looked at
    with pytest.raises(CodecError, match="shorter than the header"):
        payload_steps(payload[:10])
    with pytest.raises(CodecError, match="bad magic"):
        payload_steps(b"X" * HEADER.size)


def test_encoding_is_deterministic_and_pack_reproduces_the_payload() -> None:
    chunk = make_chunk(7, first_step=20, end="truncated")
    payload = encode(chunk)
    assert encode(chunk) == payload
    assert pack(decode(payload)) == payload
    assert pack(compress(chunk)) == payload


def test_payload_follows_the_documented_layout() -> None:
    chunk = make_chunk(6, first_step=11, episode_id=42)
    payload = encode(chunk)
    fields, arrays_blob, frames_blob = split_payload(payload)
    magic, version, reserved, steps, episode_id, first_step, arrays_len, frames_len = fields
    assert (magic, version, reserved) == (MAGIC, FORMAT_VERSION, 0)
    assert (steps, episode_id, first_step) == (6, 42, 11)
    assert len(payload) == FIXED + arrays_len + frames_len
    # The CRC covers the header and everything after the CRC.
    assert raw_payload(arrays_blob, frames_blob, steps=6, episode_id=42, first_step=11) == payload
    # Frames: T + 5 u32 offsets, then T + 4 independent LZ4 blocks.
    offsets = np.frombuffer(frames_blob[: 4 * 11], dtype="<u4")
    data = frames_blob[4 * 11 :]
    assert offsets[0] == 0 and offsets[-1] == len(data)
    for i in range(10):
        raw = lz4.block.decompress(data[offsets[i] : offsets[i + 1]], uncompressed_size=FRAME_BYTES)
        assert np.array_equal(np.frombuffer(raw, np.uint8).reshape(FRAME, FRAME), chunk.frames[i])


def test_equals_notices_any_difference() -> None:
    chunk = make_chunk(4, first_step=8)
    assert chunk.equals(chunk)
    changed: list[Chunk] = [
        dataclasses.replace(chunk, episode_id=chunk.episode_id + 1),
        dataclasses.replace(chunk, first_step=chunk.first_step + 1),
        dataclasses.replace(chunk, versions=chunk.versions.astype(np.int32)),
    ]
    for name, array in chunk_arrays(chunk).items():
        for index in (0, -1):
            other = np.array(array)
            flat = other.reshape(-1)
            if other.dtype.kind == "f":
                flat[index] += 0.5
            else:
                flat[index] ^= 1  # bool or integer
            change: dict[str, Any] = {name: other}
            changed.append(dataclasses.replace(chunk, **change))
    for other_chunk in changed:
        assert not chunk.equals(other_chunk)


# --------------------------------------------------------------------------- 2. from_transitions


def _replace_obs(obs: Obs, key: str, index: tuple[int, ...], value: float) -> Obs:
    return {**obs, key: with_value(obs[key], index, value)}


def _bad_transitions() -> dict[str, tuple[Callable[[list[Transition]], list[Transition]], str]]:
    def at(index: int, **changes: Any) -> Callable[[list[Transition]], list[Transition]]:
        def mutate(ts: list[Transition]) -> list[Transition]:
            out = list(ts)
            out[index] = dataclasses.replace(out[index], **changes)
            return out

        return mutate

    def obs_of(
        index: int, side: str, key: str, where: tuple[int, ...]
    ) -> Callable[[list[Transition]], list[Transition]]:
        def mutate(ts: list[Transition]) -> list[Transition]:
            out = list(ts)
            obs = _replace_obs(getattr(out[index], side), key, where, 99.0)
            change: dict[str, Any] = {side: obs}
            out[index] = dataclasses.replace(out[index], **change)
            return out

        return mutate

    return {
        "empty": (lambda ts: [], "at least one transition"),
        "other_episode": (at(3, episode_id=99), "step 3 does not follow step 2"),
        "skipped_step": (at(3, step=999), "step 3 does not follow step 2"),
        "repeated_step": (at(3, step=14), "step 3 does not follow step 2"),  # steps start at 12
        "next_vector_differs": (
            obs_of(2, "next_obs", "vector", (0,)),
            r"next_obs\['vector'\] of step 2 differs from obs of 3",
        ),
        "next_image_differs": (
            obs_of(2, "next_obs", "image", (3, 40, 40)),
            r"next_obs\['image'\] of step 2 differs from obs of 3",
        ),
        "first_stack_does_not_slide": (
            obs_of(0, "obs", "image", (2, 10, 10)),
            "frame stack of step 0 does not slide",
        ),
        "last_stack_does_not_slide": (
            obs_of(5, "next_obs", "image", (0, 10, 10)),
            "frame stack of step 5 does not slide",
        ),
        "terminated_early": (at(2, terminated=True), "step 2 ends the episode"),
        "truncated_early": (at(0, truncated=True), "step 0 ends the episode"),
        "terminated_second_to_last": (at(4, terminated=True), "step 4 ends the episode"),
    }


BAD_TRANSITIONS = _bad_transitions()


@pytest.mark.parametrize("case", list(BAD_TRANSITIONS), ids=list(BAD_TRANSITIONS))
def test_from_transitions_rejects(case: str) -> None:
    transitions, _ = make_transitions(6, first_step=12)
    Chunk.from_transitions(transitions)  # the unaltered steps are fine
    mutate, match = BAD_TRANSITIONS[case]
    with pytest.raises(CodecError, match=match):
        Chunk.from_transitions(mutate(transitions))


def test_from_transitions_rejects_a_stack_that_does_not_slide_in_a_single_step() -> None:
    (step,), _ = make_transitions(1, first_step=4)
    shifted = {**step.next_obs, "image": np.roll(step.next_obs["image"], 1, axis=0)}
    with pytest.raises(CodecError, match="frame stack of step 0 does not slide"):
        Chunk.from_transitions([dataclasses.replace(step, next_obs=shifted)])


# --------------------------------------------------------------------------- 3. validate_chunk


JUST_ABOVE_LIMIT = float(np.nextafter(np.float32(MAX_ABS_REWARD), np.float32(np.inf)))


def _bad_chunks() -> dict[str, tuple[Callable[[Chunk], Chunk], str]]:
    steps = 4
    rep = dataclasses.replace

    def arr(name: str, value: Callable[[np.ndarray], np.ndarray]) -> Callable[[Chunk], Chunk]:
        return lambda c: rep(c, **{name: value(getattr(c, name))})

    return {
        "frames_dtype": (arr("frames", lambda a: a.astype(np.float32)), "frames: expected dtype"),
        "frames_shape_8_per_step": (
            arr("frames", lambda a: np.zeros((2 * STACK * steps, FRAME, FRAME), np.uint8)),
            r"frames: expected shape \[8, 84, 84\]",
        ),
        "frames_not_an_array": (arr("frames", lambda a: a.tolist()), "frames: expected a numpy"),
        "frames_one_missing": (arr("frames", lambda a: a[:-1]), "frames: expected shape"),
        "frames_wrong_size": (arr("frames", lambda a: a[:, :, :80]), "frames: expected shape"),
        "vectors_dtype": (arr("vectors", lambda a: a.astype(np.float64)), "vectors: expected dt"),
        "vectors_big_endian": (arr("vectors", lambda a: a.astype(">f4")), "vectors: expected dt"),
        "vectors_22_columns": (arr("vectors", lambda a: a[:, :22]), "vectors: expected shape"),
        "vectors_one_per_step": (arr("vectors", lambda a: a[:-1]), "vectors: expected shape"),
        "actions_dtype": (arr("actions", lambda a: a.astype(np.float64)), "actions: expected dt"),
        "actions_3_columns": (
            arr("actions", lambda a: np.zeros((steps, 3), np.float32)),
            "actions: expected shape",
        ),
        "rewards_dtype": (arr("rewards", lambda a: a.astype(np.float64)), "rewards: expected dt"),
        "rewards_2d": (arr("rewards", lambda a: a[:, None]), "rewards: expected shape"),
        "terminated_uint8": (
            arr("terminated", lambda a: a.astype(np.uint8)),
            "terminated: expected dtype",
        ),
        "truncated_shape": (arr("truncated", lambda a: a[:-1]), "truncated: expected shape"),
        "versions_int32": (arr("versions", lambda a: a.astype(np.int32)), "versions: expected dt"),
        "vectors_nan": (arr("vectors", lambda a: with_value(a, (2, 5), np.nan)), "vectors: .*NaN"),
        "vectors_inf": (arr("vectors", lambda a: with_value(a, (4, 0), np.inf)), "vectors: .*inf"),
        "actions_nan": (arr("actions", lambda a: with_value(a, (0, 1), np.nan)), "actions: .*NaN"),
        "actions_neg_inf": (
            arr("actions", lambda a: with_value(a, (3, 0), -np.inf)),
            "actions: .*inf",
        ),
        "rewards_nan": (arr("rewards", lambda a: with_value(a, 1, np.nan)), "rewards: .*NaN"),
        "rewards_inf": (arr("rewards", lambda a: with_value(a, 3, np.inf)), "rewards: .*inf"),
        "reward_above_limit": (
            arr(
                "rewards", lambda a: with_value(a, 1, float(np.nextafter(np.float32(1e6), np.inf)))
            ),
            "rewards: .*exceeds codec.MAX_ABS_REWARD",
        ),
        "reward_near_float32_max": (
            arr("rewards", lambda a: with_value(a, 2, -float(np.finfo(np.float32).max))),
            "rewards: .*exceeds codec.MAX_ABS_REWARD",
        ),
        "action_above_1": (
            arr("actions", lambda a: with_value(a, (1, 0), 1.0001)),
            r"actions: values outside \[-1, 1\]",
        ),
        "action_below_minus_1": (
            arr("actions", lambda a: with_value(a, (2, 1), -2.0)),
            r"actions: values outside \[-1, 1\]",
        ),
        "negative_version": (arr("versions", lambda a: with_value(a, 2, -1)), "versions: negative"),
        "negative_episode_id": (lambda c: rep(c, episode_id=-1), "episode_id"),
        "negative_first_step": (lambda c: rep(c, first_step=-5), "first_step"),
        "terminated_early": (
            arr("terminated", lambda a: with_value(a, 1, True)),
            "episode ends before the chunk's last step",
        ),
        "truncated_early": (
            arr("truncated", lambda a: with_value(a, 0, True)),
            "episode ends before the chunk's last step",
        ),
        "zero_steps": (
            lambda c: rep(c, actions=np.zeros((0, 2), np.float32)),
            r"chunk has 0 steps; expected 1\.\.4096",
        ),
        "too_many_steps": (
            lambda c: rep(c, actions=np.zeros((MAX_STEPS + 1, 2), np.float32)),
            "chunk has 4097 steps",
        ),
    }


BAD_CHUNKS = _bad_chunks()


@pytest.mark.parametrize("check", [validate_chunk, compress, encode], ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", list(BAD_CHUNKS), ids=list(BAD_CHUNKS))
def test_invalid_chunks_are_rejected_naming_the_field(
    case: str, check: Callable[[Chunk], object]
) -> None:
    chunk = make_chunk(4, first_step=6)
    validate_chunk(chunk)
    mutate, match = BAD_CHUNKS[case]
    with pytest.raises(CodecError, match=match):
        check(mutate(chunk))


def test_actions_that_are_not_an_array_are_rejected_with_codec_error() -> None:
    chunk = make_chunk(4)
    with pytest.raises(CodecError, match="actions: expected a numpy array"):
        validate_chunk(dataclasses.replace(chunk, actions=chunk.actions.tolist()))


@pytest.mark.parametrize("field", ["episode_id", "first_step"])
def test_ids_that_do_not_fit_int64_are_rejected_with_codec_error(field: str) -> None:
    change: dict[str, Any] = {field: 2**63}
    chunk = dataclasses.replace(make_chunk(2), **change)
    with pytest.raises(CodecError, match=field):
        encode(chunk)


# --------------------------------------------------------------------------- 4. decode rejects


@functools.cache
def sample_chunk() -> Chunk:
    return make_chunk(4, first_step=10, episode_id=5)


@functools.cache
def sample_payload() -> bytes:
    return encode(sample_chunk())


def test_every_truncation_is_rejected() -> None:
    payload = sample_payload()
    arrays_len = HEADER.unpack_from(payload)[6]
    named = [0, 1, HEADER.size - 1, HEADER.size, FIXED - 1, FIXED, FIXED + 1]
    named += [FIXED + arrays_len, len(payload) // 2, len(payload) - 1]
    assert all(0 <= n < len(payload) for n in named)
    for n in range(len(payload)):  # every prefix, the named ones included
        with pytest.raises(CodecError) as info:
            decode(payload[:n])
        if n < FIXED:
            assert f"payload of {n} bytes is shorter than the 40-byte header" in str(info.value), n
        else:
            assert "truncated or padded" in str(info.value), n


@pytest.mark.parametrize("extra", [1, 3, 4096])
def test_trailing_bytes_are_rejected(extra: int) -> None:
    with pytest.raises(CodecError, match="truncated or padded"):
        decode(sample_payload() + bytes(extra))


def _set_header(payload: bytes, **fields: object) -> bytes:
    names = (
        "magic",
        "version",
        "reserved",
        "steps",
        "episode_id",
        "first_step",
        "arrays_len",
        "frames_len",
    )
    values = dict(zip(names, HEADER.unpack_from(payload), strict=True))
    values.update(fields)
    return HEADER.pack(*values.values()) + payload[HEADER.size :]


def test_wrong_magic_is_rejected() -> None:
    with pytest.raises(CodecError, match="bad magic b'TD3X'"):
        decode(_set_header(sample_payload(), magic=b"TD3X"))
    with pytest.raises(CodecError, match="bad magic"):  # even with a valid checksum
        decode(recrc(_set_header(sample_payload(), magic=b"\x00" * 4)))


def test_wrong_format_version_is_rejected() -> None:
    payload = dataclasses.replace(Parts.of(sample_chunk()), version=2).payload()
    with pytest.raises(CodecError, match="format version 2; this decoder reads 1"):
        decode(payload)


@pytest.mark.parametrize(
    "position",
    [HEADER.size, HEADER.size + 3, 13, 21, FIXED, FIXED + 10, -200, -1],
    ids=["crc0", "crc3", "episode_id", "first_step", "arrays0", "arrays10", "frame", "last"],
)
def test_checksum_mismatch_is_rejected(position: int) -> None:
    data = bytearray(sample_payload())
    data[position] ^= 0x01
    with pytest.raises(CodecError, match="checksum mismatch: payload corrupted"):
        decode(bytes(data))


def test_checksum_mismatch_when_section_lengths_shift_but_sum_matches() -> None:
    arrays_len, frames_len = HEADER.unpack_from(sample_payload())[6:]
    payload = _set_header(sample_payload(), arrays_len=arrays_len + 1, frames_len=frames_len - 1)
    with pytest.raises(CodecError, match="checksum mismatch"):
        decode(payload)


def _bad_parts() -> dict[str, tuple[Callable[[Parts], Parts], str]]:
    rep = dataclasses.replace

    def a(name: str) -> Callable[[Parts], np.ndarray]:
        return lambda p: p.arrays[name]

    def swap(first: str, second: str) -> Callable[[Parts], Parts]:
        def mutate(p: Parts) -> Parts:
            order = [second if n == first else first if n == second else n for n in p.arrays]
            return rep(p, arrays={n: p.arrays[n] for n in order})

        return mutate

    def rename(old: str, new: str) -> Callable[[Parts], Parts]:
        return lambda p: rep(p, arrays={(new if n == old else n): v for n, v in p.arrays.items()})

    def offsets(change: Callable[[np.ndarray], None]) -> Callable[[Parts], Parts]:
        def mutate(p: Parts) -> Parts:
            o = p.default_offsets()
            change(o)
            return rep(p, offsets=o)

        return mutate

    def set_o(index: int, delta: int) -> Callable[[np.ndarray], None]:
        def change(o: np.ndarray) -> None:
            o[index] = int(o[index]) + delta

        return change

    def swap_o(o: np.ndarray) -> None:
        o[2], o[3] = o[3], o[2]

    def equal_o(o: np.ndarray) -> None:
        o[3] = o[2]

    return {
        # wrong shapes: a size change is caught by the section size, a same-size one by shape
        "vectors_22_columns": (
            lambda p: p.with_arrays(vectors=a("vectors")(p)[:, :22]),
            r"arrays section claims \d+ bytes; 4 steps need \d+",
        ),
        "vectors_transposed": (
            lambda p: p.with_arrays(vectors=np.ascontiguousarray(a("vectors")(p).T)),
            r"vectors: expected shape \[5, 23\], got \[23, 5\]",
        ),
        "actions_transposed": (
            lambda p: p.with_arrays(actions=np.ascontiguousarray(a("actions")(p).T)),
            r"actions: expected shape \[4, 2\], got \[2, 4\]",
        ),
        "rewards_2d": (
            lambda p: p.with_arrays(rewards=a("rewards")(p)[:, None]),
            r"rewards: expected shape \[4\], got \[4, 1\]",
        ),
        "versions_one_missing": (
            lambda p: p.with_arrays(versions=a("versions")(p)[:-1]),
            "arrays section claims",
        ),
        # wrong dtypes
        "rewards_float64": (
            lambda p: p.with_arrays(rewards=a("rewards")(p).astype(np.float64)),
            "arrays section claims",
        ),
        "rewards_int32": (
            lambda p: p.with_arrays(rewards=a("rewards")(p).astype(np.int32)),
            "rewards: expected dtype <f4, got b'<i4",
        ),
        "vectors_big_endian": (
            lambda p: p.with_arrays(vectors=a("vectors")(p).astype(">f4")),
            "vectors: expected dtype <f4, got b'>f4",
        ),
        "terminated_bool": (
            lambda p: p.with_arrays(terminated=a("terminated")(p).astype(bool)),
            r"terminated: expected dtype \|u1, got b'\|b1",
        ),
        "versions_uint64": (
            lambda p: p.with_arrays(versions=a("versions")(p).astype("<u8")),
            "versions: expected dtype <i8",
        ),
        # wrong names or order
        "terminated_truncated_swapped": (
            swap("terminated", "truncated"),
            "array 3: expected 'terminated', got b'truncated",
        ),
        "actions_rewards_swapped": (swap("actions", "rewards"), "array 1: expected 'actions'"),
        "rewards_renamed": (rename("rewards", "reward"), "array 2: expected 'rewards'"),
        "vectors_renamed": (rename("vectors", "vectorz"), "array 0: expected 'vectors'"),
        # wrong values
        "rewards_nan": (
            lambda p: p.with_arrays(rewards=with_value(a("rewards")(p), 2, np.nan)),
            "rewards: contains NaN or inf",
        ),
        "reward_near_float32_max": (
            lambda p: p.with_arrays(
                rewards=with_value(a("rewards")(p), 1, float(np.finfo(np.float32).max))
            ),
            "rewards: .*exceeds codec.MAX_ABS_REWARD",
        ),
        "vectors_inf": (
            lambda p: p.with_arrays(vectors=with_value(a("vectors")(p), (4, 22), -np.inf)),
            "vectors: contains NaN or inf",
        ),
        "actions_nan": (
            lambda p: p.with_arrays(actions=with_value(a("actions")(p), (0, 0), np.nan)),
            "actions: contains NaN or inf",
        ),
        "action_2": (
            lambda p: p.with_arrays(actions=with_value(a("actions")(p), (3, 1), 2.0)),
            r"actions: values outside \[-1, 1\]",
        ),
        "terminated_not_last": (
            lambda p: p.with_arrays(terminated=with_value(a("terminated")(p), 1, 1)),
            "episode ends before the chunk's last step",
        ),
        "truncated_not_last": (
            lambda p: p.with_arrays(truncated=with_value(a("truncated")(p), 0, 1)),
            "episode ends before the chunk's last step",
        ),
        "terminated_2": (
            lambda p: p.with_arrays(terminated=with_value(a("terminated")(p), 3, 2)),
            "terminated/truncated: values other than 0 and 1",
        ),
        "truncated_255": (
            lambda p: p.with_arrays(truncated=with_value(a("truncated")(p), 3, 255)),
            "terminated/truncated: values other than 0 and 1",
        ),
        "negative_version": (
            lambda p: p.with_arrays(versions=with_value(a("versions")(p), 0, -3)),
            "versions: negative policy version",
        ),
        "negative_episode_id": (lambda p: rep(p, episode_id=-1), "episode_id and first_step"),
        "negative_first_step": (lambda p: rep(p, first_step=-1), "episode_id and first_step"),
        # frames
        "frame_not_lz4": (lambda p: p.with_block(2, b"\xff" * 20), "frame 2 is not valid LZ4"),
        "frame_empty_lz4": (lambda p: p.with_block(0, b"\x00"), "frame 0 decompressed to 0 bytes"),
        "frame_100_bytes": (
            lambda p: p.with_block(1, lz4.block.compress(bytes(100), store_size=False)),
            "frame 1 decompressed to 100 bytes, not 7056",
        ),
        "frame_too_large": (
            lambda p: p.with_block(7, lz4.block.compress(bytes(FRAME_BYTES + 1), store_size=False)),
            "frame 7 is not valid LZ4",
        ),
        "frame_with_size_prefix": (
            lambda p: p.with_block(
                4, lz4.block.compress(sample_chunk().frames[4].tobytes(), store_size=True)
            ),
            "frame 4 ",
        ),
        "offsets_swapped": (offsets(swap_o), "frame offsets are not increasing"),
        "offsets_equal": (offsets(equal_o), "frame offsets are not increasing"),
        "offsets_first_not_0": (offsets(set_o(0, 1)), "frame offsets are not increasing"),
        "offsets_last_short": (offsets(set_o(-1, -1)), "frame offsets are not increasing"),
        "offsets_last_long": (offsets(set_o(-1, 1)), "frame offsets are not increasing"),
        "one_frame_missing": (
            lambda p: rep(p, blocks=p.blocks[:-1]),
            "frame offsets are not increasing",
        ),
        "no_frames": (
            lambda p: rep(p, blocks=(), offsets=np.zeros(0, np.uint32)),
            "frame section is shorter than its offset table",
        ),
        # header
        "more_than_max_steps": (
            lambda p: rep(p, num_steps=MAX_STEPS + 1),
            r"header claims 4097 steps; expected 1\.\.4096",
        ),
        "max_u32_steps": (lambda p: rep(p, num_steps=2**32 - 1), "header claims 4294967295 st"),
        "zero_steps": (lambda p: rep(p, num_steps=0), "header claims 0 steps"),
        "one_step_more": (lambda p: rep(p, num_steps=5), "arrays section claims"),
        "one_step_less": (lambda p: rep(p, num_steps=3), "arrays section claims"),
    }


BAD_PARTS = _bad_parts()


def test_parts_helper_reproduces_a_valid_payload() -> None:
    assert Parts.of(sample_chunk()).payload() == sample_payload()
    assert_chunks_identical(decode(Parts.of(sample_chunk()).payload()).decompress(), sample_chunk())


@pytest.mark.parametrize("case", list(BAD_PARTS), ids=list(BAD_PARTS))
def test_well_checksummed_payload_with_wrong_contents_is_rejected(case: str) -> None:
    mutate, match = BAD_PARTS[case]
    payload = mutate(Parts.of(sample_chunk())).payload()
    assert payload != sample_payload()
    with pytest.raises(CodecError, match=match):
        decode(payload)


def _section(payload: bytes) -> tuple[int, bytes, bytes]:
    fields, arrays_blob, frames_blob = split_payload(payload)
    return int(fields[3]), arrays_blob, frames_blob


def test_arrays_section_that_is_not_lz4_is_rejected() -> None:
    steps, arrays_blob, frames_blob = _section(sample_payload())
    garbage = arrays_blob[:4] + b"\xff" * (len(arrays_blob) - 4)  # right size prefix
    with pytest.raises(CodecError, match="arrays section is not valid LZ4"):
        decode(raw_payload(garbage, frames_blob, steps=steps, episode_id=5, first_step=10))


def test_arrays_section_shorter_than_its_size_prefix_is_rejected() -> None:
    steps, _, frames_blob = _section(sample_payload())
    with pytest.raises(CodecError, match="arrays section is truncated"):
        decode(raw_payload(b"\x01\x02", frames_blob, steps=steps, episode_id=5, first_step=10))


def test_arrays_section_with_a_directory_entry_of_ndim_3_is_rejected() -> None:
    steps, arrays_blob, frames_blob = _section(sample_payload())
    raw = bytearray(lz4.block.decompress(arrays_blob))
    raw[16] = 3  # ndim byte of entry 0 (12s name, 4s dtype, then B ndim)
    blob = lz4.block.compress(bytes(raw), store_size=True)
    with pytest.raises(CodecError, match="vectors: expected shape"):
        decode(raw_payload(blob, frames_blob, steps=steps, episode_id=5, first_step=10))


def test_nonzero_reserved_field_is_rejected() -> None:
    steps, arrays_blob, frames_blob = _section(sample_payload())
    payload = raw_payload(
        arrays_blob, frames_blob, steps=steps, episode_id=5, first_step=10, reserved=1
    )
    with pytest.raises(CodecError):
        decode(payload)


# --------------------------------------------------------------------------- 5. fuzz


def check_mutant(mutant: bytes, original: bytes, chunk: Chunk) -> bool:
    """Assert ``decode(mutant)`` raises CodecError, or, only for an identical payload,
    returns ``chunk``. Returns whether it was rejected."""
    try:
        decoded = decode(mutant)
    except CodecError:
        assert mutant != original, "decode rejected the original payload"
        return True
    except Exception as exc:  # any other exception type is a bug
        pytest.fail(f"decode raised {type(exc).__name__}: {exc!r} (not CodecError)")
    assert mutant == original, "decode accepted a corrupted payload"
    assert_chunks_identical(decoded.decompress(), chunk)
    return False


def mutate(payload: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(payload)
    kind = rng.integers(4)
    if kind in (0, 3):  # 1-8 byte flips, positions drawn with replacement (may cancel)
        for pos in rng.integers(0, len(data), rng.integers(1, 9)):
            data[pos] ^= int(rng.integers(1, 256))
    if kind in (1, 3):  # truncate
        del data[len(data) - int(rng.integers(1, 65)) :]
    if kind == 2:  # extend
        data += rng.integers(0, 256, int(rng.integers(1, 65)), dtype=np.uint8).tobytes()
    return bytes(data)


def test_seeded_fuzz_rejects_every_mutated_payload() -> None:
    payload, chunk = sample_payload(), sample_chunk()
    rng = np.random.default_rng(20240611)
    rejected = sum(check_mutant(mutate(payload, rng), payload, chunk) for _ in range(2000))
    assert rejected >= 1990  # only flips that cancel out leave the payload intact


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    flips=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=8
    ),
    cut=st.integers(0, 64),
    tail=st.binary(max_size=16),
)
def test_hypothesis_fuzz_rejects_every_mutated_payload(
    flips: list[tuple[int, int]], cut: int, tail: bytes
) -> None:
    payload, chunk = sample_payload(), sample_chunk()
    data = bytearray(payload)
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    mutant = bytes(data[: len(data) - cut]) + tail
    check_mutant(mutant, payload, chunk)


def test_seeded_fuzz_with_valid_checksums_never_raises_anything_but_codec_error() -> None:
    """Corruption the CRC cannot see (checksum recomputed): decode must reject it with
    CodecError or return a chunk that satisfies the contract."""
    payload = sample_payload()
    rng = np.random.default_rng(7)
    accepted = 0
    for _ in range(1500):
        data = bytearray(payload)
        for pos in rng.integers(0, len(data), rng.integers(1, 4)):
            if not HEADER.size <= pos < FIXED:  # leave the CRC to recrc
                data[pos] ^= int(rng.integers(1, 256))
        try:
            decoded = decode(recrc(data))
        except CodecError:
            continue
        except Exception as exc:
            pytest.fail(f"decode raised {type(exc).__name__}: {exc!r} (not CodecError)")
        validate_chunk(decoded.decompress())
        accepted += 1
    assert accepted < 1500


# --------------------------------------------------------------------------- 6. no pickle


def test_a_pickled_chunk_is_not_decoded() -> None:
    chunk = sample_chunk()
    for obj in (chunk, compress(chunk)):
        for protocol in (2, pickle.HIGHEST_PROTOCOL):
            with pytest.raises(CodecError, match="bad magic"):
                decode(pickle.dumps(obj, protocol=protocol))


def test_codec_source_uses_no_pickle_or_other_object_deserializer() -> None:
    """Statically: no pickle-like module, no ``np.load``/``allow_pickle``, no eval/exec.

    (Docstrings may say "No pickle", so this inspects code, not text.)
    """
    forbidden = {
        "pickle",
        "cPickle",
        "_pickle",
        "cloudpickle",
        "dill",
        "marshal",
        "shelve",
        "joblib",
        "allow_pickle",
        "load",
        "loads",
        "eval",
        "exec",
        "__import__",
    }
    tree = ast.parse(inspect.getsource(codec))
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            used.update(part for alias in node.names for part in alias.name.split("."))
        elif isinstance(node, ast.ImportFrom):
            used.update((node.module or "").split("."))
            used.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Name):
            used.add(node.id)
        elif isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            used.add(node.arg)
    assert not used & forbidden, used & forbidden
    assert {"struct", "zlib", "frombuffer"} <= used  # the walk did see the code


# --------------------------------------------------------------------------- 7. compressed frames


def test_compressed_chunk_frames_and_size() -> None:
    chunk = make_chunk(16, first_step=30)
    raw_bytes = chunk.frames.nbytes
    assert raw_bytes == 20 * FRAME_BYTES
    for compressed in (compress(chunk), decode(encode(chunk))):
        assert isinstance(compressed, CompressedChunk)
        assert compressed.num_steps == 16
        assert compressed.frame_offsets.shape == (21,)
        for i in range(chunk.num_steps + STACK):
            frame = compressed.frame(i)
            assert frame.dtype == np.uint8 and frame.shape == (FRAME, FRAME)
            assert np.array_equal(frame, chunk.frames[i]), i
        assert 0 < compressed.nbytes < raw_bytes / 2
        assert compressed.nbytes >= len(compressed.frame_data) + compressed.vectors.nbytes
        assert len(encode(chunk)) < raw_bytes / 2


def test_incompressible_frames_still_round_trip_frame_by_frame() -> None:
    chunk = make_chunk(3, first_step=7, noise=True)
    compressed = decode(encode(chunk))
    for i in range(chunk.num_steps + STACK):
        assert np.array_equal(compressed.frame(i), chunk.frames[i])
    assert compressed.nbytes > 0

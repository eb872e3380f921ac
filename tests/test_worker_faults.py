"""Rollout worker faults: failed pushes, restarts, learner restarts,
environments that cannot be built, and Ray's constructor-argument warning.

In-process tests drive a :class:`RolloutWorker` with a push that fails and
a small environment with the contract's spaces; Ray tests use a real local
instance, real actor classes and a real SIGKILL of a worker's process.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import ray
import torch

from buffer_service.ray_actor import remote_shard_class
from buffer_service.snapshot import read_latest
from learner.td3 import TD3Learner
from rollout_workers.ray_actor import (
    remote_evaluator_class,
    remote_weights_board_class,
    remote_worker_class,
)
from rollout_workers.worker import (
    MAX_WORKER_INDEX,
    EnvironmentSpecError,
    PushError,
    RolloutWorker,
    check_environment,
    episode_id,
)
from td3drive.contracts import spec
from td3drive.contracts.codec import Chunk, decode
from td3drive.contracts.config import LearnerConfig, RolloutConfig, TD3DriveConfig, config_from_dict
from td3drive.contracts.weights import Published, WeightsBoard

REPO = Path(__file__).resolve().parents[1]
LEARNER = LearnerConfig(
    device="cpu", features_dim=64, actor_hidden=(32,), critic_hidden=(32,), random_shift_pad=0
)
CHUNK = 4
EPISODE = 10  # ContractEnv episodes: chunks of 4, 4 and 2 steps, the last terminated
WAIT_S = 120  # generous: only a real hang reaches it


# ------------------------------------------------------------ helpers
class ContractEnv(gym.Env[dict[str, np.ndarray], np.ndarray]):
    """The contract's spaces, episodes of ``length`` steps that end ``terminated``.

    Frame ``k`` of the environment's life is all ``k % 251``; the image is the
    last 4 frames, so frame stacks slide as the codec requires. Counts steps
    taken after an episode ended and before the next reset.
    """

    def __init__(self, length: int = EPISODE) -> None:
        self.observation_space = spec.observation_space()
        self.action_space = spec.action_space()
        self.length = length
        self.frame = 0
        self.t = 0
        self.ended = True
        self.steps_after_end = 0
        self.stack: list[np.ndarray] = []

    def _obs(self) -> dict[str, np.ndarray]:
        return {
            "image": np.stack(self.stack),
            "vector": np.full(spec.VECTOR_DIM, self.t, dtype=np.float32),
        }

    def _next_frame(self) -> np.ndarray:
        self.frame += 1
        return np.full((spec.FRAME_SIZE, spec.FRAME_SIZE), self.frame % 251, dtype=np.uint8)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        super().reset(seed=seed)
        self.t, self.ended = 0, False
        self.stack = [self._next_frame() for _ in range(spec.FRAME_STACK)]
        return self._obs(), {}

    def step(self, action: np.ndarray) -> Any:
        if self.ended:
            self.steps_after_end += 1
        self.t += 1
        self.stack = [*self.stack[1:], self._next_frame()]
        terminated = self.t >= self.length
        self.ended = self.ended or terminated
        return self._obs(), 1.0, terminated, False, {}


class FlakyPush:
    """Appends payloads; raises on the listed 1-based call numbers (or always)."""

    def __init__(self, fail_on_calls: set[int] | None = None, always: bool = False) -> None:
        self.fail_on_calls = fail_on_calls or set()
        self.always = always
        self.calls = 0
        self.payloads: list[bytes] = []

    def __call__(self, payload: bytes) -> None:
        self.calls += 1
        if self.always or self.calls in self.fail_on_calls:
            raise TimeoutError(f"no push slot freed (simulated, call {self.calls})")
        self.payloads.append(payload)


def contract_worker(
    push: Callable[[bytes], Any], env: ContractEnv | None = None, **kwargs: Any
) -> tuple[RolloutWorker, ContractEnv]:
    env = env or ContractEnv()
    fields = {"warmup_steps": 0, "weights_poll_steps": 8, **kwargs.pop("rollout", {})}
    rollout = RolloutConfig(**fields)
    worker = RolloutWorker(
        rollout=rollout,
        chunk_steps=CHUNK,
        learner=LEARNER,
        push=push,
        env_factory=lambda: env,
        **kwargs,
    )
    return worker, env


def decoded(payloads: list[bytes]) -> list[Chunk]:
    return [decode(p).decompress() for p in payloads]


def assert_episodes_whole(chunks: list[Chunk], episodes: int) -> None:
    """Every episode's chunks cover steps 0..EPISODE-1 once, in order, the last terminated."""
    assert all(1 <= c.num_steps <= CHUNK for c in chunks)
    by_episode: dict[int, list[Chunk]] = {}
    for chunk in chunks:
        by_episode.setdefault(chunk.episode_id, []).append(chunk)
    assert len(by_episode) == episodes
    for parts in by_episode.values():
        steps = [chunk.first_step + t for chunk in parts for t in range(chunk.num_steps)]
        assert steps == list(range(EPISODE))
        assert parts[-1].terminated[-1] and not any(c.terminated[:-1].any() for c in parts)
        for previous, current in itertools.pairwise(parts):  # frames continue across chunks
            np.testing.assert_array_equal(current.frames[:4], previous.frames[-4:])


# ------------------------------------------------------------ failed pushes (item 3)
@pytest.mark.parametrize(
    ("failing_call", "where", "steps_before"),
    [
        (3, "episode end", EPISODE),
        (4, "chunk boundary", EPISODE + CHUNK),
        (1, "first chunk", CHUNK),
    ],
)
def test_a_failed_push_is_sent_again_and_never_poisons_later_chunks(
    failing_call: int, where: str, steps_before: int
) -> None:
    push = FlakyPush({failing_call})
    worker, env = contract_worker(push)

    first = worker.run(4 * EPISODE)
    # The call stopped right after the failed push; its steps still count.
    assert first["steps"] == steps_before == worker.total_steps
    assert first["push_error"] is not None and "TimeoutError" in first["push_error"]
    assert first["unsent_chunks"] == 1 and first["push_failures"] == 1
    if where == "episode end":
        assert len(first["episodes"]) == 1  # the episode end was recorded anyway

    second = worker.run(4 * EPISODE - first["steps"])
    worker.flush()
    assert second["push_error"] is None and second["unsent_chunks"] == 0
    assert worker.total_steps == 4 * EPISODE
    assert env.steps_after_end == 0, "stepped a finished episode"

    chunks = decoded(push.payloads)
    assert_episodes_whole(chunks, episodes=4)
    assert sum(c.num_steps for c in chunks) == 4 * EPISODE
    assert len(first["episodes"]) + len(second["episodes"]) == 4
    counters = worker.counters
    assert counters["push_failures"] == 1
    assert counters["chunks_pushed"] == len(push.payloads) == push.calls - 1
    assert counters["chunks_dropped"] == counters["transitions_dropped"] == 0


def test_a_push_that_keeps_failing_holds_one_chunk_and_close_counts_the_loss() -> None:
    push = FlakyPush(always=True)
    worker, _ = contract_worker(push)
    first = worker.run(100)
    assert first["steps"] == CHUNK and first["unsent_chunks"] == 1
    again = worker.run(100)  # sends the held chunk first; it fails again: no step taken
    assert again["steps"] == 0 and worker.total_steps == CHUNK
    assert again["push_failures"] == 2 and again["push_error"] is not None
    with pytest.raises(PushError, match="could not be pushed"):
        worker.flush()
    worker.close()  # drops the chunk: counted, not raised
    assert worker.counters["chunks_dropped"] == 1
    assert worker.counters["transitions_dropped"] == CHUNK
    assert push.payloads == []


def test_a_failed_push_after_an_environment_crash_keeps_the_truncated_chunk() -> None:
    class CrashingEnv(ContractEnv):
        def step(self, action: np.ndarray) -> Any:
            if self.t == 2:
                raise RuntimeError("simulated simulator crash")
            return super().step(action)

    push = FlakyPush({1})
    worker, _ = contract_worker(push, env=CrashingEnv())
    stats = worker.run(3)
    assert stats["steps"] == 2 and stats["env_restarts"] == 1 and stats["unsent_chunks"] == 1
    worker.flush()
    (chunk,) = decoded(push.payloads)
    assert chunk.num_steps == 2 and chunk.truncated[-1] and not chunk.terminated.any()


# ------------------------------------------------------------ episode ids and warm-up (item 12)
def test_episode_ids_carry_the_worker_and_its_incarnation() -> None:
    assert episode_id(0, 0, 1) == 1
    assert episode_id(3, 1, 5) == (3 << 48) | (1 << 32) | 5
    assert episode_id(MAX_WORKER_INDEX, 2**16 - 1, 2**32 - 1) == 2**63 - 1
    for bad in [(-1, 0, 0), (MAX_WORKER_INDEX + 1, 0, 0), (0, 2**16, 0), (0, 0, 2**32)]:
        with pytest.raises(ValueError, match="must be in"):
            episode_id(*bad)

    lives = []
    for incarnation in (0, 1):
        push = FlakyPush()
        worker, _ = contract_worker(push, worker_index=3, incarnation=incarnation)
        worker.run(3 * EPISODE)
        lives.append({c.episode_id for c in decoded(push.payloads)})
    assert len(lives[0]) == len(lives[1]) == 3
    assert not lives[0] & lives[1]


def test_a_worker_without_warmup_acts_with_the_policy_from_the_first_weights() -> None:
    learner = TD3Learner(LEARNER)
    version, weights = learner.policy_weights()

    def source(generation: int, held: int) -> tuple[int, int, Any] | None:
        return (0, version, weights) if held < version else None

    actions = {}
    for warmup in (True, False):
        push = FlakyPush()
        worker, _ = contract_worker(
            push,
            weights_source=source,
            warmup=warmup,
            rollout={"warmup_steps": 1000, "exploration_noise": 0.0},
        )
        worker.run(EPISODE)
        chunks = decoded(push.payloads)
        policy = np.stack(
            [worker.policy_action(c.obs(t)) for c in chunks for t in range(c.num_steps)]
        )
        actions[warmup] = (np.concatenate([c.actions for c in chunks]), policy)
    acted, policy = actions[False]
    np.testing.assert_array_equal(acted, policy)  # no noise, no warm-up: the policy's action
    acted, policy = actions[True]
    assert not np.allclose(acted, policy)  # warming up: random actions


# ------------------------------------------------------------ environments (item 4)
def test_check_environment_accepts_the_default_environment() -> None:
    check_environment(TD3DriveConfig())


@pytest.mark.parametrize(
    ("env_id", "expected"),
    [
        # CarRacing: pixels of another shape (or, without Box2D, not buildable).
        ("CarRacing-v3", r"observation space .* is not the contract's|cannot be built"),
        ("CartPole-v1", r"observation space Box\(.*\) is not the contract's Dict\("),
        ("td3drive/NoSuchEnv-v0", "no such gymnasium environment"),
        ("NoSuchEnv-v0", "no such gymnasium environment"),
    ],
)
def test_check_environment_names_what_is_wrong_in_one_line(env_id: str, expected: str) -> None:
    config = config_from_dict({"rollout": {"env_id": env_id}})
    with pytest.raises(EnvironmentSpecError, match=expected) as caught:
        check_environment(config)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert message.startswith(f"rollout.env_id={env_id!r}: ") and "\n" not in message


# ------------------------------------------------------------ the weights board (item 8)
def test_the_board_orders_by_generation_then_version() -> None:
    board = WeightsBoard()
    assert board.newer(0, -1) is None and board.newer_than(-1) is None
    assert board.publish(130, "dead learner's", generation=0)
    assert not board.publish(130, "again", generation=0)
    assert not board.publish(120, "older", generation=0)
    assert board.newer(0, 129) == Published(0, 130, "dead learner's")
    assert board.newer(0, 130) is None
    # The rebuilt learner counts from its checkpoint: a lower version, a newer generation.
    assert board.publish(100, "rebuilt learner's", generation=1)
    assert (board.generation(), board.version()) == (1, 100)
    assert board.newer(0, 130) == Published(1, 100, "rebuilt learner's")
    assert board.newer(1, 100) is None
    assert not board.publish(131, "late publish of the dead one", generation=0)
    assert board.newer(1, 99) == Published(1, 100, "rebuilt learner's")
    # The original forms still work.
    assert board.newer_than(-1) == (100, "rebuilt learner's")
    assert board.newer_than(100, generation=1) is None
    with pytest.raises(ValueError, match="generation"):
        board.publish(1, "x", generation=-1)


# ------------------------------------------------------------ Ray
@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run_config(**rollout: object) -> TD3DriveConfig:
    return config_from_dict(
        {
            "learner": {
                "device": "cpu",
                "features_dim": 64,
                "actor_hidden": [32],
                "critic_hidden": [32],
                "batch_size": 16,
            },
            "replay": {
                "num_shards": 2,
                "chunk_steps": 16,
                "min_size_to_sample": 32,
                "replay_ratio": None,
                "rate_limit_timeout_s": 60,
            },
            "rollout": {"num_workers": 1, "warmup_steps": 0, "weights_poll_steps": 8, **rollout},
        }
    )


class Publisher:
    """Stands in for a learner process: publishes weights it owns, then can die."""

    def publish(
        self, board: Any, version: int, weights: dict[str, np.ndarray], generation: int, form: str
    ) -> bool:
        if form == "ref":  # the original form: the publisher's own object
            return bool(ray.get(board.publish.remote(version, [ray.put(weights)])))
        return bool(ray.get(board.publish.remote(version, weights, generation=generation)))


PublisherActor: Any = ray.remote(num_cpus=0)(Publisher)


def policy_weights(config: TD3DriveConfig, seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return TD3Learner(config.learner.model_copy(update={"seed": seed})).policy_weights()[1]


def expected_action(weights: dict[str, np.ndarray], config: TD3DriveConfig, obs: Any) -> Any:
    from td3drive.contracts.networks import load_policy_weights, policy_for

    policy = policy_for(config.learner)
    load_policy_weights(policy, weights)
    with torch.no_grad():
        return policy(
            torch.from_numpy(obs["image"].copy())[None],
            torch.from_numpy(obs["vector"].copy())[None],
        )[0].numpy()


def test_workers_take_a_restarted_learners_weights_after_its_publisher_died(
    ray_instance: None,
) -> None:
    config = run_config()
    shards = [remote_shard_class(num_cpus=0).remote(config.replay, 16, i) for i in range(2)]
    board = remote_weights_board_class().remote()
    worker = remote_worker_class(num_cpus=0).remote(config, shards, board, 0)
    evaluator = remote_evaluator_class(num_cpus=0).remote(config, board)
    old, new = policy_weights(config, 1), policy_weights(config, 2)
    obs = {
        "image": np.random.default_rng(0).integers(0, 256, spec.IMAGE_SHAPE, dtype=np.uint8),
        "vector": np.zeros(spec.VECTOR_DIM, dtype=np.float32),
    }

    # The first learner publishes version 130 in the original form, then dies.
    first = PublisherActor.remote()
    assert ray.get(first.publish.remote(board, 130, old, 0, "ref"), timeout=WAIT_S)
    ray.kill(first)
    stats = ray.get(worker.run.remote(16), timeout=WAIT_S)
    assert (stats["policy_generation"], stats["policy_version"]) == (0, 130)
    np.testing.assert_array_equal(
        ray.get(worker.policy_action.remote(obs)), expected_action(old, config, obs)
    )

    # Rebuilt from a checkpoint at update 100: a lower version, generation 1.
    second = PublisherActor.remote()
    assert ray.get(second.publish.remote(board, 100, new, 1, "weights"), timeout=WAIT_S)
    ray.kill(second)  # the board owns the weights: they outlive their publisher
    stats = ray.get(worker.run.remote(16), timeout=WAIT_S)
    assert (stats["policy_generation"], stats["policy_version"]) == (1, 100)
    assert stats["weight_updates"] == 2
    np.testing.assert_array_equal(
        ray.get(worker.policy_action.remote(obs)), expected_action(new, config, obs)
    )
    evaluated = ray.get(evaluator.evaluate.remote(1), timeout=WAIT_S)
    assert (evaluated["policy_generation"], evaluated["policy_version"]) == (1, 100)
    for actor in (worker, evaluator, board, *shards):
        ray.kill(actor)


def test_a_lost_weights_object_is_logged_and_asked_for_again(ray_instance: None) -> None:
    """A board that does not own the weights (the plain class as an actor):
    their owner dies, reading them fails; the call goes on with the old weights."""
    config = run_config()
    shards = [remote_shard_class(num_cpus=0).remote(config.replay, 16, i) for i in range(2)]
    plain_board_class: Any = ray.remote(num_cpus=0)(WeightsBoard)
    board = plain_board_class.remote()
    worker = remote_worker_class(num_cpus=0).remote(config, shards, board, 0)
    publisher = PublisherActor.remote()
    assert ray.get(publisher.publish.remote(board, 3, policy_weights(config, 1), 0, "ref"))
    ray.kill(publisher)
    published = ray.get(board.newer.remote(0, -1))
    deadline = time.monotonic() + WAIT_S
    while True:  # the owner's death reaches the node's object store asynchronously
        try:
            ray.get(published.ref[0], timeout=WAIT_S)
        except ray.exceptions.ObjectLostError:
            break
        assert time.monotonic() < deadline, "the dead publisher's weights stayed readable"
        time.sleep(0.5)
    # The board still points at the dead publisher's object: the call goes on.
    stats = ray.get(worker.run.remote(16), timeout=WAIT_S)
    assert stats["policy_version"] == -1 and stats["steps"] == 16
    assert ray.get(board.publish.remote(4, [ray.put(policy_weights(config, 2))]))
    stats = ray.get(worker.run.remote(16), timeout=WAIT_S)
    assert stats["policy_version"] == 4  # asked again, and got the readable version
    for actor in (worker, board, *shards):
        ray.kill(actor)


def wait_for_restart(worker: Any, old_pid: int) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            identity = ray.get(worker.identity.remote(), timeout=WAIT_S)
        except ray.exceptions.RayActorError:
            time.sleep(0.5)
            continue
        if identity["pid"] != old_pid:
            return dict(identity)
        time.sleep(0.5)
    raise AssertionError(f"the worker was not restarted within {WAIT_S} s")


def replay_chunks(shards: list[Any], directory: Path) -> list[Chunk]:
    chunks = []
    for index, shard in enumerate(shards):
        ray.get(shard.save.remote(str(directory / f"shard-{index}")), timeout=WAIT_S)
        latest = read_latest(directory / f"shard-{index}")
        assert latest is not None
        chunks += [compressed.decompress() for _, compressed in latest[1].chunks]
    return chunks


def test_a_killed_worker_comes_back_with_fresh_episode_ids_and_no_warmup(
    ray_instance: None, tmp_path: Path
) -> None:
    # Warm-up longer than the test: the first life acts randomly throughout;
    # no exploration noise: a life without warm-up acts exactly as the policy.
    config = run_config(warmup_steps=10_000, exploration_noise=0.0)
    shards = [
        remote_shard_class(num_cpus=0)
        .options(name=f"faults-shard-{i}")
        .remote(config.replay, 16, i)
        for i in range(2)
    ]
    board = remote_weights_board_class().options(name="faults-board").remote()
    assert ray.get(board.publish.remote(0, policy_weights(config, 1)))
    worker = remote_worker_class(num_cpus=0).remote(
        config.model_dump(mode="json"), ["faults-shard-0", "faults-shard-1"], "faults-board", 0
    )
    before = ray.get(worker.identity.remote(), timeout=WAIT_S)
    assert (before["incarnation"], before["actor_restarts"]) == (0, 0)
    assert before["warmup_steps"] == 10_000
    stats = ray.get(worker.run.remote(48), timeout=WAIT_S)
    ray.get(worker.flush.remote(), timeout=WAIT_S)
    assert (stats["incarnation"], stats["actor_restarts"], stats["restarted"]) == (0, 0, False)

    os.kill(before["pid"], signal.SIGKILL)
    after = wait_for_restart(worker, before["pid"])
    assert (after["incarnation"], after["actor_restarts"], after["warmup_steps"]) == (1, 1, 0)
    stats = ray.get(worker.run.remote(48), timeout=WAIT_S)
    ray.get(worker.flush.remote(), timeout=WAIT_S)
    assert (stats["incarnation"], stats["actor_restarts"], stats["restarted"]) == (1, 1, True)
    assert stats["policy_version"] == 0

    chunks = replay_chunks(shards, tmp_path)
    starts = [(c.episode_id, c.first_step) for c in chunks]
    assert len(starts) == len(set(starts)), "duplicate chunk starts in the replay"
    lives: dict[int, list[Chunk]] = {0: [], 1: []}
    for chunk in chunks:
        assert chunk.episode_id >> 48 == 0  # worker 0
        lives[(chunk.episode_id >> 32) & 0xFFFF].append(chunk)
    assert sum(c.num_steps for c in lives[0]) == sum(c.num_steps for c in lives[1]) == 48
    assert not {c.episode_id for c in lives[0]} & {c.episode_id for c in lives[1]}

    def policy_share(life: list[Chunk]) -> float:
        steps = [(c, t) for c in life for t in range(c.num_steps)]
        policy = ray.get([worker.policy_action.remote(c.obs(t)) for c, t in steps])
        same = [np.array_equal(c.actions[t], a) for (c, t), a in zip(steps, policy, strict=True)]
        return float(np.mean(same))

    assert policy_share(lives[1]) == 1.0  # the restarted life acts with the policy
    assert policy_share(lives[0]) == 0.0  # the first life was warming up
    for actor in (worker, board, *shards):
        ray.kill(actor)


# ------------------------------------------------------------ Ray's warning (item 11)
WARNING = "has constructor arguments in the object store"

START_LIKE_THE_DRIVER = textwrap.dedent(
    """
    import json, sys
    import ray
    from buffer_service.ray_actor import remote_shard_class
    from rollout_workers.ray_actor import (
        remote_evaluator_class, remote_weights_board_class, remote_worker_class)
    from td3drive.contracts.config import config_from_dict

    address, by, raw = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    ray.init(address=address, log_to_driver=False)
    cfg = config_from_dict(raw)
    shards = [
        remote_shard_class(num_cpus=0).options(name=f"warn-shard-{i}").remote(
            cfg.replay, cfg.learner.batch_size, i, None, cfg.learner.seed)
        for i in range(cfg.replay.num_shards)
    ]
    board = remote_weights_board_class().options(name="warn-board").remote()
    if by == "name":
        shard_args = [f"warn-shard-{i}" for i in range(cfg.replay.num_shards)]
        board_arg = "warn-board"
    else:
        shard_args, board_arg = shards, board
    workers = [
        remote_worker_class(num_cpus=0).remote(cfg, shard_args, board_arg, i)
        for i in range(cfg.rollout.num_workers)
    ]
    evaluator = remote_evaluator_class(num_cpus=0).remote(cfg, board_arg)
    ray.get([w.policy_version.remote() for w in workers], timeout=120)
    ray.get(evaluator.__ray_ready__.remote(), timeout=120)
    print("STARTED", flush=True)
    """
)


def start_like_the_driver(by: str, config: TD3DriveConfig) -> str:
    """Start shards, board, workers and evaluator in a fresh driver process
    connected to the running instance (Ray logs the warning once per process);
    returns that process's stderr."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            START_LIKE_THE_DRIVER,
            ray.get_runtime_context().gcs_address,
            by,
            json.dumps(config.model_dump(mode="json")),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "STARTED" in result.stdout, result.stderr[-3000:]
    return result.stderr


def test_actors_started_with_names_do_not_make_ray_warn_about_restarts(
    ray_instance: None,
) -> None:
    config = run_config(num_workers=2)
    # The check sees the warning when it is there: actor handles as arguments.
    assert WARNING in start_like_the_driver("handle", config)
    assert WARNING not in start_like_the_driver("name", config)

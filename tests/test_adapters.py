"""Any pixel env, not only ours: :mod:`rollout_workers.adapters`, ``module:EnvId``
ids, the space check before workers start, and ``import td3drive`` registering
the environments.

CarRacing-v3 (gymnasium's, on Box2D) is the real foreign environment; it needs
``box2d`` (a dev dependency). ``tests.pixel_env_fixture`` is a user's own module.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import ray

from rollout_workers.adapters import PixelEnvAdapter, car_racing_action
from rollout_workers.worker import (
    EnvironmentSpecError,
    RolloutWorker,
    check_environment,
    env_kwargs_for,
    split_env_id,
)
from td3drive import CAR_RACING_PIXELS_ID
from td3drive.app.driver import TrainingRun
from td3drive.contracts import spec
from td3drive.contracts.config import ConfigError, LearnerConfig, RolloutConfig, config_from_dict
from tests import pixel_env_fixture
from tests.pixel_env_fixture import SquareEnv
from tests.test_train import tiny_config

REPO = Path(__file__).resolve().parents[1]
FIXTURE_ID = f"tests.pixel_env_fixture:{pixel_env_fixture.ADAPTED_ID}"
FIXTURE_RAW_ID = f"tests.pixel_env_fixture:{pixel_env_fixture.RAW_ID}"


def distinct_values(frame: np.ndarray) -> int:
    return len(np.unique(frame))


# ------------------------------------------------------------ the adapter on CarRacing-v3
def test_car_racing_pixels_has_the_contract_spaces() -> None:
    env = gym.make(CAR_RACING_PIXELS_ID)
    try:
        assert env.observation_space == spec.observation_space()
        assert env.action_space == spec.action_space()
        obs, _ = env.reset(seed=0)
        assert obs in spec.observation_space()
        assert obs["image"].dtype == np.uint8 and obs["image"].shape == (4, 84, 84)
        assert obs["vector"].dtype == np.float32 and obs["vector"].shape == (23,)
        assert not obs["vector"].any()  # no vector_fn: zeros
    finally:
        env.close()


def test_car_racing_frames_have_content_and_the_stack_shifts() -> None:
    env = gym.make(CAR_RACING_PIXELS_ID)
    try:
        obs, _ = env.reset(seed=0)
        image = obs["image"]
        # A reset fills the stack with its first frame: track and grass, not blank.
        assert all(np.array_equal(frame, image[0]) for frame in image)
        assert distinct_values(image[0]) > 10 and image[0].std() > 10.0
        changed = 0
        for _ in range(10):
            previous = image
            obs, *_ = env.step(np.array([0.0, 0.6], dtype=np.float32))
            image = obs["image"]
            np.testing.assert_array_equal(image[:-1], previous[1:])  # oldest first, shifted
            assert distinct_values(image[-1]) > 10
            changed += int(not np.array_equal(image[-1], image[-2]))
        assert changed > 0  # the newest frame is new (CarRacing zooms in, the car moves)
    finally:
        env.close()


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        ([0.3, 0.8], [0.3, 0.8, 0.0]),  # throttle_brake > 0: gas
        ([-1.0, -0.5], [-1.0, 0.0, 0.5]),  # < 0: brake, its magnitude
        ([0.0, 0.0], [0.0, 0.0, 0.0]),
        ([2.0, -3.0], [1.0, 0.0, 1.0]),  # clipped to [-1, 1]
    ],
)
def test_car_racing_action_is_steer_gas_brake(action: list[float], expected: list[float]) -> None:
    mapped = car_racing_action(np.array(action, dtype=np.float32))
    assert mapped.dtype == np.float32
    np.testing.assert_allclose(mapped, expected)
    assert mapped in gym.make("CarRacing-v3").action_space


def test_car_racing_pixels_steps_carracing_with_the_mapped_action() -> None:
    adapter = gym.make(CAR_RACING_PIXELS_ID)
    try:
        adapter.reset(seed=1)
        car_racing = adapter.unwrapped  # CarRacing itself, under the adapter
        for _ in range(30):
            adapter.step(np.array([-0.5, 1.0], dtype=np.float32))
        speed = float(np.linalg.norm(car_racing.car.hull.linearVelocity))  # type: ignore[attr-defined]
        assert speed > 1.0  # full gas moved the car
        for _ in range(60):
            adapter.step(np.array([0.0, -1.0], dtype=np.float32))
        braked = float(np.linalg.norm(car_racing.car.hull.linearVelocity))  # type: ignore[attr-defined]
        assert braked < speed  # full brake slowed it
    finally:
        adapter.close()


# ------------------------------------------------------------ the adapter's parts
def test_the_default_action_map_is_linear_onto_the_bounds() -> None:
    raw = SquareEnv(action_low=(0.0, -2.0), action_high=(1.0, 2.0))
    env = PixelEnvAdapter(raw)
    env.reset(seed=0)
    env.step(np.array([-1.0, 1.0], dtype=np.float32))
    env.step(np.array([0.0, -0.5], dtype=np.float32))
    np.testing.assert_allclose(raw.actions[0], [0.0, 2.0])
    np.testing.assert_allclose(raw.actions[1], [0.5, -1.0])
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        env.step(np.zeros(3, dtype=np.float32))


def test_a_user_action_fn_and_vector_fn_are_used() -> None:
    seen: list[Any] = []

    def vector_fn(env: gym.Env, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        seen.append((env, obs.shape, dict(info)))
        return np.arange(spec.VECTOR_DIM, dtype=np.float64)  # converted to float32

    raw = SquareEnv()
    env = PixelEnvAdapter(raw, vector_fn=vector_fn, action_fn=lambda a: a * 0.5)
    obs, _ = env.reset(seed=0)
    obs, *_ = env.step(np.array([1.0, -1.0], dtype=np.float32))
    assert obs["vector"].dtype == np.float32
    np.testing.assert_array_equal(obs["vector"], np.arange(spec.VECTOR_DIM))
    np.testing.assert_allclose(raw.actions[0], [0.5, -0.5])
    # vector_fn sees the wrapped env, its own RGB observation and its info.
    assert seen[-1][0] is raw and seen[-1][1] == (48, 64, 3) and "position" in seen[-1][2]


def test_vector_fn_by_import_path() -> None:
    env = PixelEnvAdapter(SquareEnv(), vector_fn="tests.pixel_env_fixture:position_vector")
    obs, info = env.reset(seed=3)
    np.testing.assert_allclose(obs["vector"][:2], info["position"] / 100.0, rtol=1e-6)
    with pytest.raises(ValueError, match="no callable 'missing'"):
        PixelEnvAdapter(SquareEnv(), vector_fn="tests.pixel_env_fixture:missing")


def test_a_wrong_vector_is_refused() -> None:
    env = PixelEnvAdapter(SquareEnv(), vector_fn=lambda *_: np.zeros(5, np.float32))
    with pytest.raises(ValueError, match=r"vector_fn returned shape \(5,\), expected \(23,\)"):
        env.reset(seed=0)


def test_the_adapter_reports_episode_metrics_at_the_end() -> None:
    env = PixelEnvAdapter(SquareEnv(episode_steps=5))
    env.reset(seed=0)
    total = 0.0
    for step in range(5):
        _, reward, terminated, truncated, info = env.step(np.zeros(2, np.float32))
        total += reward
        assert ("episode_metrics" in info) == (step == 4)
    assert truncated and not terminated
    assert info["episode_metrics"] == {"return": pytest.approx(total), "length": 5}


def test_the_adapter_refuses_what_it_cannot_adapt() -> None:
    with pytest.raises(ValueError, match=r"needs an observation space Box\(0, 255, \(H, W, 3\)"):
        PixelEnvAdapter(gym.make("CartPole-v1"))
    car_racing_discrete = gym.make("CarRacing-v3", continuous=False)
    with pytest.raises(ValueError, match="not a bounded 2-d Box; pass action_fn"):
        PixelEnvAdapter(car_racing_discrete)
    car_racing_discrete.close()


# ------------------------------------------------------------ module:EnvId and the space check
def test_split_env_id_reads_ids_as_gymnasium_does() -> None:
    assert split_env_id("td3drive/Racetrack-v0") == (None, "td3drive/Racetrack-v0")
    assert split_env_id("pkg.mod:ns/Env-v1") == ("pkg.mod", "ns/Env-v1")


@pytest.mark.parametrize("env_id", ["a:b:c", "1mod:Env-v0", "mod:", ":Env-v0", "Env v0"])
def test_the_config_refuses_a_malformed_env_id(env_id: str) -> None:
    with pytest.raises(ConfigError, match="is not a gymnasium id 'EnvId' or 'module:EnvId'"):
        config_from_dict({"rollout": {"env_id": env_id}})


def test_a_module_prefix_keeps_td3drive_envs_reading_the_task_section() -> None:
    config = config_from_dict(
        {
            "rollout": {"env_id": "rollout_workers:td3drive/Racetrack-v0"},
            "task": {"max_episode_steps": 77},
        }
    )
    assert env_kwargs_for(config, 0)["task"]["max_episode_steps"] == 77


@pytest.mark.parametrize("env_id", [CAR_RACING_PIXELS_ID, FIXTURE_ID])
def test_check_environment_accepts_adapted_pixel_envs(env_id: str) -> None:
    check_environment(config_from_dict({"rollout": {"env_id": env_id}}))


@pytest.mark.parametrize(
    ("env_id", "expected"),
    [
        (
            "CarRacing-v3",
            "environment observation space Box(0, 255, (96, 96, 3), uint8) is not the "
            "contract's Dict(image uint8[4,84,84], vector float32[23]) (an RGB or grayscale "
            "image); wrap it with rollout_workers.adapters.PixelEnvAdapter",
        ),
        (
            FIXTURE_RAW_ID,
            "environment observation space Box(0, 255, (48, 64, 3), uint8) is not the "
            "contract's Dict(image uint8[4,84,84], vector float32[23]) (an RGB or grayscale "
            "image); wrap it with rollout_workers.adapters.PixelEnvAdapter",
        ),
        (
            "td3drive_no_such_module:Env-v0",
            "cannot import module 'td3drive_no_such_module' (No module named "
            "'td3drive_no_such_module'); it must be importable by the driver and by every "
            "Ray worker",
        ),
        (
            "tests.pixel_env_fixture:td3drive_tests/NoSuch-v0",
            "no such gymnasium environment; importing 'tests.pixel_env_fixture' did not "
            "register 'td3drive_tests/NoSuch-v0'",
        ),
    ],
)
def test_check_environment_says_what_is_wrong_in_one_line(env_id: str, expected: str) -> None:
    with pytest.raises(EnvironmentSpecError) as caught:
        check_environment(config_from_dict({"rollout": {"env_id": env_id}}))
    message = str(caught.value)
    assert message.startswith(f"rollout.env_id={env_id!r}: ") and "\n" not in message
    assert expected in message


def test_a_module_whose_import_fails_is_named(tmp_path: Path, monkeypatch: Any) -> None:
    (tmp_path / "td3drive_broken_env_module.py").write_text("import td3drive_missing_dep\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    env_id = "td3drive_broken_env_module:Env-v0"
    with pytest.raises(EnvironmentSpecError) as caught:
        check_environment(config_from_dict({"rollout": {"env_id": env_id}}))
    assert str(caught.value) == (
        f"rollout.env_id={env_id!r}: importing module 'td3drive_broken_env_module' failed: "
        "ModuleNotFoundError: No module named 'td3drive_missing_dep'"
    )


def test_a_worker_that_cannot_import_the_module_says_so() -> None:
    rollout = RolloutConfig(env_id="td3drive_no_such_module:Env-v0")
    with pytest.raises(EnvironmentSpecError, match="rollout worker 3 cannot import module"):
        RolloutWorker(rollout, 32, LearnerConfig(device="cpu"), push=lambda _: None, worker_index=3)


# ------------------------------------------------------------ import td3drive registers the envs
def test_import_td3drive_registers_the_envs_without_importing_the_services() -> None:
    code = (
        "import sys, td3drive, gymnasium\n"
        "services = ('rollout_workers', 'learner', 'buffer_service', 'ray', 'torch')\n"
        "loaded = [m for m in services if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "env = gymnasium.make('td3drive/Racetrack-v0')\n"
        "obs, _ = env.reset(seed=0)\n"
        "assert obs['image'].shape == (4, 84, 84)\n"
        "env.close()\n"
        "import rollout_workers\n"  # registering again is a no-op
        "assert rollout_workers.RACETRACK_ID == td3drive.RACETRACK_ID\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ------------------------------------------------------------ training through the driver
@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize(
    ("env_id", "env_kwargs"),
    [
        # max_steps keeps the final evaluation episode short (CarRacing's own limit is 1000).
        (CAR_RACING_PIXELS_ID, {"max_steps": 150}),
        # A user's module, imported by gymnasium in the driver and in each Ray worker
        # (on their sys.path: Ray adds the driver's working directory, the repo root).
        (FIXTURE_ID, {"vector_fn": "tests.pixel_env_fixture:position_vector"}),
    ],
)
def test_training_on_a_foreign_pixel_env(
    ray_instance: None, tmp_path: Path, env_id: str, env_kwargs: dict[str, Any]
) -> None:
    budget = 300
    config = config_from_dict(
        tiny_config(
            rollout={"env_id": env_id, "env_kwargs": env_kwargs},
            run={"total_env_steps": budget},
        )
    )
    summary = TrainingRun(config, tmp_path / "run", log_line=lambda _: None).run()
    assert summary["status"] == "completed"
    assert summary["env_steps"] >= budget
    assert summary["learner_updates"] > 0
    # Some worker took >= budget / 2 steps, past an episode end (150 or 40 steps).
    assert summary["episodes"] >= 1
    assert summary["eval"]["episodes"] == 1 and summary["eval"]["return_mean"] is not None

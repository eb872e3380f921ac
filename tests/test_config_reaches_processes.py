"""Every config section reaches the process that uses it (DESIGN.md §6).

The reference system's ``task:`` section validated and was never read, and
td3drive's own was the same until these tests: workers built their
environment from ``rollout.env_kwargs`` only. Each section here changes a
field and the test observes its *effect* in the process that uses it: the
rollout workers' and the evaluator's environments (``task``), the workers'
warm-up policy (``rollout``), the learner's optimizers (``learner``), the
replay shards' n-step targets and capacities (``replay``) and the driver's
budget and evaluation (``run``). ``carla`` needs a server to take effect; its
plumbing into each worker's environment kwargs is checked without one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import ray

import rollout_workers
from rollout_workers.worker import env_kwargs_for
from td3drive.app.driver import TrainingRun
from td3drive.contracts import metric_names as M
from td3drive.contracts.config import ConfigError, config_from_dict
from tests.test_train import tiny_config

MAX_EPISODE_STEPS = 6


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainingRun]:
    """One tiny training run with a changed field in every section; its
    actors stay up for inspection until the module's tests are done."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    config = config_from_dict(
        tiny_config(
            task={"max_episode_steps": MAX_EPISODE_STEPS, "observation_vector": "speed_only"},
            rollout={
                # The lane follower acts for the whole run, without noise: its
                # throttle is a function of the stored speed (checked below).
                "warmup_policy": "lane_follower",
                "warmup_action_noise": 0.0,
                "warmup_steps": 10_000,
            },
            learner={"actor_lr": 3e-4, "critic_lr": 2e-4},
            replay={"gamma": 0.9, "n_step": 2, "capacity_transitions": 10_000},
            run={
                "total_env_steps": 256,
                "eval_episodes": 2,
                "learner_torch_threads": 2,
                "worker_torch_threads": 2,
            },
        )
    )
    run = TrainingRun(config, tmp_path_factory.mktemp("sections") / "run", log_line=lambda _: None)
    run.summary = run.run()  # type: ignore[attr-defined]
    try:
        yield run
    finally:
        run.shutdown()
        ray.shutdown()


def _sample(run: TrainingRun, count: int = 64) -> list:
    return ray.get([shard.sample.remote(count) for shard in run.shards], timeout=120)


def test_task_reaches_the_workers_environments(finished_run: TrainingRun) -> None:
    lengths = [episode["length"] for episode in finished_run.progress.recent]
    assert lengths and max(lengths) <= MAX_EPISODE_STEPS  # the env's own default is 1000
    for sampled in _sample(finished_run):
        vectors = sampled.batch.obs_vector
        assert np.all(vectors[:, 1:] == 0.0)  # speed_only: lane geometry never stored
        assert np.any(vectors[:, 0] != 0.0)


def test_task_reaches_the_evaluators_environment(finished_run: TrainingRun) -> None:
    result = json.loads((finished_run.run_dir / "eval.json").read_text())
    assert [e["length"] <= MAX_EPISODE_STEPS for e in result["episodes"]] == [True, True]


def test_rollout_reaches_the_workers_warmup_policy(finished_run: TrainingRun) -> None:
    task = finished_run.config.task
    for sampled in _sample(finished_run):
        speed = sampled.batch.obs_vector[:, 0] * task.target_speed_mps
        # rollout_workers.scripted.lane_follower's throttle at the target speed;
        # uniform random actions would not follow it.
        expected = np.clip(0.5 * (task.target_speed_mps - speed), -1.0, 1.0)
        np.testing.assert_allclose(sampled.batch.action[:, 1], expected, atol=1e-5)


def test_learner_reaches_the_learners_optimizers(finished_run: TrainingRun) -> None:
    metrics = finished_run.learner_stats["metrics"]
    assert metrics[M.ACTOR_LR] == pytest.approx(3e-4)
    assert metrics[M.CRITIC_LR] == pytest.approx(2e-4)


def test_replay_reaches_the_shards(finished_run: TrainingRun) -> None:
    discounts = np.concatenate([s.batch.discount for s in _sample(finished_run, 256)])
    # n_step 2, gamma 0.9: 0.81 for two steps, 0.9 where a chunk ends, 0 after a crash.
    allowed = np.array([0.0, 0.9, 0.81], dtype=np.float32)
    assert np.isclose(discounts[:, None], allowed[None]).any(axis=1).all()
    assert np.isclose(discounts, 0.81).any()
    stats = ray.get([shard.stats.remote() for shard in finished_run.shards])
    assert [s["capacity_transitions"] for s in stats] == [5_000, 5_000]


def test_run_reaches_the_driver(finished_run: TrainingRun) -> None:
    summary = finished_run.summary  # type: ignore[attr-defined]
    assert summary["env_steps"] >= 256
    assert summary["eval"]["episodes"] == 2
    # Thread counts are set in each process (Ray alone would give 1 thread to
    # these actors of fewer than 2 CPUs).
    assert ray.get(finished_run.learner.torch_threads.remote()) == 2
    assert ray.get([w.torch_threads.remote() for w in finished_run.workers]) == [2, 2]


def test_carla_section_reaches_each_workers_environment_kwargs() -> None:
    config = config_from_dict(
        {
            "rollout": {"env_id": rollout_workers.CARLA_ID, "num_workers": 2},
            "carla": {"port": 3000, "tm_port": 9000, "town": "Town05"},
            "task": {"target_speed_mps": 6.0},
        }
    )
    second = env_kwargs_for(config, worker_index=1)
    assert (second["carla"]["port"], second["carla"]["tm_port"]) == (3003, 9001)
    assert second["carla"]["town"] == "Town05"
    assert second["task"]["target_speed_mps"] == 6.0
    carla_env = pytest.importorskip("rollout_workers.carla.env")
    env = carla_env.CarlaEnv(**second)  # construction validates and never connects
    try:
        assert env.address.endswith(":3003")
        assert env.task_config.target_speed_mps == 6.0
    finally:
        env.close()


def test_a_section_repeated_in_env_kwargs_is_refused() -> None:
    with pytest.raises(ConfigError, match="repeats the task section"):
        config_from_dict({"rollout": {"env_kwargs": {"task": {"max_episode_steps": 5}}}})


def test_other_environments_get_only_their_env_kwargs() -> None:
    config = config_from_dict(
        {"rollout": {"env_id": "td3drive/Faulty-v0", "env_kwargs": {"fail_on_steps": [3]}}}
    )
    assert env_kwargs_for(config, worker_index=0) == {"fail_on_steps": [3]}

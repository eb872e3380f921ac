"""Resuming a learner from its checkpoint: rebuilt learners, changed hyperparameters,
GPU checkpoints on a CPU, bad files.

* The run's current learner config applies on resume: changed learning rates
  reach the optimizers, every non-architectural field takes effect and is
  reported, an architectural change is refused by name.
* A checkpoint written on a GPU loads on a CPU: the generator state of
  another device type is re-seeded instead of restored, and the policy alone
  loads through ``load_policy_checkpoint``.
* Empty, truncated and garbage files fail in one line, without torch's advice
  to load with ``weights_only=False``.
* The learner actor on a real Ray instance: a rebuild whose checkpoint is
  missing fails instead of starting from scratch, the resume's changes are
  reported, and policy lag never goes negative.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch

from learner.ray_actor import policy_lag_updates, remote_learner_actor_class
from learner.td3 import (
    ARCHITECTURE_FIELDS,
    RESUME_APPLIED_FIELDS,
    CheckpointError,
    TD3Learner,
    load_checkpoint,
    load_policy_checkpoint,
    validate_checkpoint,
)
from rollout_workers.ray_actor import remote_weights_board_class
from td3drive.contracts import metric_names as M
from td3drive.contracts.config import LearnerConfig, TD3DriveConfig
from td3drive.contracts.networks import load_policy_weights, policy_for
from tests.conftest import random_batch

SMALL: dict[str, Any] = {
    "device": "cpu",
    "features_dim": 32,
    "actor_hidden": (32,),
    "critic_hidden": (32,),
    "random_shift_pad": 0,
}


def small_config(**overrides: Any) -> LearnerConfig:
    return LearnerConfig(**{**SMALL, **overrides})


def trained_checkpoint(path: Path, updates: int = 1, **overrides: Any) -> Path:
    """A checkpoint of a small learner after ``updates`` updates (so the Adam
    moments exist)."""
    learner = TD3Learner(small_config(**overrides))
    for seed in range(updates):
        learner.update(random_batch(size=8, seed=seed))
    return learner.save_checkpoint(path)


def lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {group["name"]: group["lr"] for group in optimizer.param_groups}


# ------------------------------------------------ item 9: hyperparameters on resume
def test_every_learner_field_is_classified() -> None:
    fields = set(LearnerConfig.model_fields)
    architecture, applied = set(ARCHITECTURE_FIELDS), set(RESUME_APPLIED_FIELDS)
    assert not architecture & applied
    assert architecture | applied == fields, (
        f"unclassified: {sorted(fields - architecture - applied)}; "
        f"unknown: {sorted((architecture | applied) - fields)}"
    )


def test_resume_applies_a_changed_learning_rate(tmp_path: Path) -> None:
    path = trained_checkpoint(tmp_path / "learner.pt", critic_lr=1e-3)
    saved = TD3Learner.from_checkpoint(path)
    assert lrs(saved.critic_optimizer) == {"head": 1e-3, "encoder": 1e-3}

    resumed = TD3Learner.from_checkpoint(path, small_config(critic_lr=1e-4))

    assert resumed.resume_changes == {"critic_lr": (1e-3, 1e-4)}
    assert resumed.config.critic_lr == 1e-4
    # The optimizer's state came back (Adam moments), its lr did not.
    assert lrs(resumed.critic_optimizer) == {"head": 1e-4, "encoder": 1e-4}
    moments = resumed.critic_optimizer.state_dict()["state"]
    assert moments and all(int(s["step"]) == 1 for s in moments.values())
    assert lrs(resumed.actor_optimizer) == {"head": 1e-4}  # unchanged default
    metrics = resumed.update(random_batch(size=8, seed=5))
    assert metrics[M.CRITIC_LR] == 1e-4 and metrics[M.ENCODER_LR] == 1e-4
    # Resuming under the checkpoint's own values changes nothing.
    same = TD3Learner.from_checkpoint(path, small_config(critic_lr=1e-3))
    assert same.resume_changes == {}


def test_resume_applies_the_encoder_lr_to_the_encoder_groups(tmp_path: Path) -> None:
    path = trained_checkpoint(tmp_path / "learner.pt", encoder="separate")
    resumed = TD3Learner.from_checkpoint(
        path, small_config(encoder="separate", encoder_lr=3e-5, actor_lr=2e-4)
    )
    assert resumed.resume_changes == {"encoder_lr": (None, 3e-5), "actor_lr": (1e-4, 2e-4)}
    assert lrs(resumed.actor_optimizer) == {"head": 2e-4, "encoder": 3e-5}
    assert lrs(resumed.critic_optimizer) == {"head": 1e-4, "encoder": 3e-5}


NEW_VALUES: dict[str, Any] = {
    "device": "auto",
    "actor_lr": 3e-4,
    "critic_lr": 3e-4,
    "encoder_lr": 5e-5,
    "batch_size": 32,
    "tau": 0.01,
    "policy_noise": 0.1,
    "noise_clip": 0.3,
    "policy_delay": 3,
    "action_preactivation_penalty": 0.0,
    "actor_max_grad_norm": None,
    "critic_max_grad_norm": 5.0,
    "random_shift_pad": 2,
    "seed": 7,
    "channels_last": True,
    "compile": "default",
    "amp_bf16": True,
    "fused_adam": True,
}
# Fields whose new value needs more than this machine may have, or takes long.
FIELD_MARKS: dict[str, Any] = {
    "amp_bf16": pytest.mark.skipif(not torch.cuda.is_available(), reason="amp_bf16 needs CUDA"),
    "compile": pytest.mark.slow,  # inductor compiles for tens of seconds
}


@pytest.mark.parametrize(
    "field",
    [pytest.param(f, marks=FIELD_MARKS.get(f, ())) for f in sorted(RESUME_APPLIED_FIELDS)],
)
def test_resume_applies_and_reports_each_non_architectural_field(
    field: str, tmp_path: Path
) -> None:
    old = getattr(small_config(), field)
    new = NEW_VALUES[field]
    assert new != old
    overrides = {field: new}
    if field == "amp_bf16":  # CUDA only: the device changes with it
        overrides["device"] = "cuda"
    path = trained_checkpoint(tmp_path / "learner.pt")
    resumed = TD3Learner.from_checkpoint(path, small_config(**overrides))
    assert getattr(resumed.config, field) == new
    assert resumed.resume_changes == {
        name: (getattr(small_config(), name), value) for name, value in overrides.items()
    }
    assert resumed.updates == 1
    resumed.update(random_batch(size=8, seed=3))  # and it trains under it


def test_a_changed_policy_delay_decides_the_next_actor_step(tmp_path: Path) -> None:
    # Saved after 1 update with d = 3: update 2 would be critic-only; d = 1 steps the actor.
    path = trained_checkpoint(tmp_path / "learner.pt", policy_delay=3)
    kept = TD3Learner.from_checkpoint(path)
    assert kept.update(random_batch(size=8, seed=4))[M.ACTOR_UPDATED] == 0.0
    resumed = TD3Learner.from_checkpoint(path, small_config(policy_delay=1))
    assert resumed.update(random_batch(size=8, seed=4))[M.ACTOR_UPDATED] == 1.0


def test_a_changed_seed_reseeds_the_generator_an_unchanged_one_restores_it(
    tmp_path: Path,
) -> None:
    learner = TD3Learner(small_config())
    learner.update(random_batch(size=8))
    path = learner.save_checkpoint(tmp_path / "learner.pt")
    saved_state = learner._generator.get_state()
    kept = TD3Learner.from_checkpoint(path, small_config())
    assert torch.equal(kept._generator.get_state(), saved_state)
    reseeded = TD3Learner.from_checkpoint(path, small_config(seed=7))
    assert not torch.equal(reseeded._generator.get_state(), saved_state)


ARCHITECTURE_CHANGES: dict[str, Any] = {
    "encoder": "separate",
    "cnn": "pooled",
    "encoder_output": "relu",
    "features_dim": 48,
    "actor_hidden": (16,),
    "critic_hidden": (16, 16),
}


@pytest.mark.parametrize("field", ARCHITECTURE_FIELDS)
def test_an_architectural_change_is_refused_by_name(field: str, tmp_path: Path) -> None:
    path = trained_checkpoint(tmp_path / "learner.pt")
    config = small_config(**{field: ARCHITECTURE_CHANGES[field]})
    for load in (
        lambda: TD3Learner.from_checkpoint(path, config),
        lambda: validate_checkpoint(path, config),
        lambda: TD3Learner(config).load_state_dict(load_checkpoint(path)),
    ):
        with pytest.raises(CheckpointError, match=rf"learner\.{field} ") as error:
            load()
        message = str(error.value)
        assert "\n" not in message
        others = [f for f in ARCHITECTURE_FIELDS if f != field]
        assert not any(f"learner.{other} " in message for other in others), message


def test_every_changed_architecture_field_is_named_at_once(tmp_path: Path) -> None:
    path = trained_checkpoint(tmp_path / "learner.pt")
    config = small_config(features_dim=48, critic_hidden=(16,), critic_lr=1e-3)
    with pytest.raises(CheckpointError) as error:
        TD3Learner.from_checkpoint(path, config)
    message = str(error.value)
    assert "learner.features_dim 32 -> 48" in message
    assert "learner.critic_hidden (32,) -> (16,)" in message
    assert "critic_lr" not in message and str(path) in message


def test_validate_checkpoint_reports_the_changes(tmp_path: Path) -> None:
    path = trained_checkpoint(tmp_path / "learner.pt", updates=2, critic_lr=1e-3)
    info = validate_checkpoint(path, small_config(critic_lr=1e-4, tau=0.01))
    assert info.updates == 2
    assert info.config == small_config(critic_lr=1e-3)
    assert info.changes == {"critic_lr": (1e-3, 1e-4), "tau": (0.005, 0.01)}
    assert validate_checkpoint(path).changes == {}


# ------------------------------------------------------ item 10: GPU checkpoints
# A CUDA generator's state is Philox seed + offset, two 64-bit words: 16 bytes.
CUDA_GENERATOR_STATE = torch.tensor(
    list((1234).to_bytes(8, "little") + (64).to_bytes(8, "little")), dtype=torch.uint8
)


def write_as_if_saved_on_cuda(state: dict[str, Any], path: Path) -> Path:
    """``torch.save(state)`` as a CUDA learner would have written it, without a GPU.

    The generator state is a CUDA generator's 16 bytes, and every tensor's
    storage is tagged ``cuda:0`` (the location string torch pickles with each
    storage), so loading it without ``map_location`` fails on a CPU-only
    machine exactly as a real GPU checkpoint does.
    """
    state = {**state, "generator": CUDA_GENERATOR_STATE.clone()}
    if "generator_device" in state:  # older checkpoints lack it
        state["generator_device"] = "cuda"
    state["config"] = {**state["config"], "device": "cuda"}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    cpu = b"X\x03\x00\x00\x00cpu"  # BINUNICODE 'cpu'
    cuda = b"X\x06\x00\x00\x00cuda:0"
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source,
        zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target,
    ):
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                assert cpu in data
                data = data.replace(cpu, cuda)
            target.writestr(info.filename, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.getvalue())
    # Only the storages' locations changed ('cpu' strings elsewhere would share
    # the pickle's memo entry and change with them).
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["config"] == state["config"]
    assert loaded.get("generator_device") == state.get("generator_device")
    return path


@pytest.fixture
def trained() -> TD3Learner:
    learner = TD3Learner(small_config(random_shift_pad=4))
    for seed in range(2):
        learner.update(random_batch(size=8, seed=seed))
    return learner


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "inferred-from-size"])
def test_a_cuda_checkpoint_loads_on_a_cpu_learner(
    trained: TD3Learner, tmp_path: Path, recorded: bool
) -> None:
    state = trained.state_dict()
    if recorded:
        state["generator_device"] = "cuda"
    else:
        del state["generator_device"]  # written before the device type was recorded
    path = write_as_if_saved_on_cuda(state, tmp_path / "learner.pt")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)  # the tensors really are tagged cuda:0
    # What the old load_state_dict did with it:
    with pytest.raises(RuntimeError, match="5056"):
        torch.Generator().set_state(load_checkpoint(path)["generator"].cpu())

    with pytest.warns(RuntimeWarning, match="saved on cuda and this learner runs on cpu"):
        resumed = TD3Learner.from_checkpoint(path, small_config(random_shift_pad=4))
    assert resumed.updates == 2
    assert resumed.resume_changes == {"device": ("cuda", "cpu")}
    for a, b in zip(trained.actor.parameters(), resumed.actor.parameters(), strict=True):
        assert torch.equal(a, b)
    assert np.isfinite(resumed.update(random_batch(size=8, seed=9))[M.CRITIC_LOSS])
    # The evaluation path: the policy alone, mapped to the CPU.
    policy = load_policy_checkpoint(path)
    assert policy.version == 2 and policy.config.device == "cuda"
    expected = {k: v.numpy() for k, v in trained.actor.state_dict().items()}
    assert policy.weights.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(policy.weights[name], value)
    assert validate_checkpoint(path).updates == 2


def test_the_generator_device_is_recorded_and_restored_on_the_same_type(
    trained: TD3Learner, tmp_path: Path
) -> None:
    state = trained.state_dict()
    assert state["generator_device"] == "cpu"
    path = trained.save_checkpoint(tmp_path / "learner.pt")
    resumed = TD3Learner.from_checkpoint(path)
    assert torch.equal(resumed._generator.get_state(), trained._generator.get_state())


def test_load_policy_checkpoint_acts_as_the_learner(trained: TD3Learner, tmp_path: Path) -> None:
    path = trained.save_checkpoint(tmp_path / "learner.pt")
    config, version, weights = load_policy_checkpoint(path)
    assert config == trained.config and version == trained.updates == 2
    policy = policy_for(config)
    load_policy_weights(policy, weights)
    probe = random_batch(size=4, seed=11)
    image, vector = torch.from_numpy(probe.obs_image), torch.from_numpy(probe.obs_vector)
    with torch.no_grad():
        assert torch.equal(policy(image, vector), trained.actor(image, vector))


# --------------------------------------------------- item 14: unreadable files
def one_line_error(load: Any, path: Path) -> str:
    with pytest.raises(CheckpointError) as error:
        load(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message
    assert "weights_only" not in message, message
    return message


LOADERS = {
    "load_checkpoint": load_checkpoint,
    "validate_checkpoint": validate_checkpoint,
    "from_checkpoint": TD3Learner.from_checkpoint,
    "load_policy_checkpoint": load_policy_checkpoint,
}


@pytest.mark.parametrize("loader", LOADERS)
def test_an_empty_file_says_so(loader: str, tmp_path: Path) -> None:
    path = tmp_path / "learner.pt"
    path.touch()
    assert "empty file (0 bytes)" in one_line_error(LOADERS[loader], path)


@pytest.mark.parametrize("loader", LOADERS)
def test_a_truncated_file_says_so(loader: str, tmp_path: Path) -> None:
    path = trained_checkpoint(tmp_path / "learner.pt")
    data = path.read_bytes()
    for keep in (len(data) // 2, len(data) - 10, 100):
        path.write_bytes(data[:keep])
        assert "truncated or corrupt" in one_line_error(LOADERS[loader], path)


def test_validate_checkpoint_finds_a_file_damaged_in_place(tmp_path: Path) -> None:
    path = trained_checkpoint(tmp_path / "learner.pt")
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # inside the tensor data: torch.load does not notice
    path.write_bytes(bytes(damaged))
    load_checkpoint(path)
    assert "truncated or corrupt" in one_line_error(validate_checkpoint, path)


@pytest.mark.parametrize("loader", LOADERS)
def test_a_garbage_file_is_not_a_checkpoint(loader: str, tmp_path: Path) -> None:
    path = tmp_path / "learner.pt"
    for garbage in (b"run: {seed: 1}\n" * 20, os.urandom(4096), b"PK\x03\x04" + bytes(200)):
        path.write_bytes(garbage)
        message = one_line_error(LOADERS[loader], path)
        assert "not a td3drive checkpoint (unreadable: " in message or (
            "truncated or corrupt" in message and garbage.startswith(b"PK")
        ), message


class _NotAllowed:
    """A pickled object ``weights_only=True`` refuses (torch then advises
    ``weights_only=False``, which would run the file's code)."""


def test_torchs_advice_to_load_unsafely_is_not_passed_on(tmp_path: Path) -> None:
    path = tmp_path / "learner.pt"
    torch.save({"format": "td3drive.learner/1", "payload": _NotAllowed()}, path)
    with pytest.raises(Exception, match="weights_only"):
        torch.load(path, weights_only=True)  # torch's own message has the advice
    for loader in LOADERS.values():
        message = one_line_error(loader, path)
        assert "not a td3drive checkpoint (unreadable: " in message
        assert "_NotAllowed" in message  # the short reason: what torch refused


def test_a_readable_file_of_something_else_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "learner.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    assert "not a td3drive checkpoint (format None" in one_line_error(load_checkpoint, path)
    torch.save([1, 2], path)
    assert "not a td3drive checkpoint (a list" in one_line_error(load_checkpoint, path)
    state = TD3Learner(small_config()).state_dict()
    del state["critic"]
    torch.save(state, path)
    assert "missing: critic" in one_line_error(validate_checkpoint, path)


def test_a_missing_file_and_a_directory(tmp_path: Path) -> None:
    assert "no such checkpoint" in one_line_error(load_checkpoint, tmp_path / "none.pt")
    assert "is a directory" in one_line_error(validate_checkpoint, tmp_path)


# ------------------------------------------------------ item 8: the policy lag
def test_policy_lag_is_never_negative() -> None:
    # Samples acted on by a dead learner's newer weights (versions 12, 14)
    # next to an older one (version 8), after a rebuild at update 10.
    assert policy_lag_updates(10, np.array([12, 8, 14])) == pytest.approx(2 / 3)
    assert policy_lag_updates(10, np.array([12, 14])) == 0.0
    assert policy_lag_updates(10, np.array([10, 4])) == 3.0


# ------------------------------------------------ the learner actor on real Ray
@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run_config(**learner: Any) -> TD3DriveConfig:
    fields = {**SMALL, "batch_size": 8, **learner}
    return TD3DriveConfig(learner=fields, replay={"min_size_to_sample": 8})


def test_learner_actor_resumes_under_the_runs_config(ray_instance: None, tmp_path: Path) -> None:
    path = trained_checkpoint(tmp_path / "learner.pt", updates=2, critic_lr=1e-3, batch_size=8)
    board = remote_weights_board_class().remote()
    actor_class = remote_learner_actor_class(num_cpus=0)
    learner = actor_class.remote(run_config(critic_lr=1e-4), [], board, str(path))
    try:
        assert ray.get(learner.resume_changes.remote(), timeout=120) == {"critic_lr": (1e-3, 1e-4)}
        assert ray.get(learner.updates.remote()) == 2
        saved = Path(ray.get(learner.save_checkpoint.remote(str(tmp_path / "again.pt"))))
        groups = load_checkpoint(saved)["critic_optimizer"]["param_groups"]
        assert {group["lr"] for group in groups} == {1e-4}
        assert ray.get(board.version.remote()) == 2  # published on start
    finally:
        ray.kill(learner)

    refused = actor_class.remote(run_config(features_dim=48), [], board, str(path))
    with pytest.raises(ray.exceptions.RayActorError, match=r"learner\.features_dim 32 -> 48"):
        ray.get(refused.updates.remote(), timeout=120)
    ray.kill(board)


def test_a_rebuild_without_its_checkpoint_fails(ray_instance: None, tmp_path: Path) -> None:
    board = remote_weights_board_class().remote()
    actor_class = remote_learner_actor_class(num_cpus=0)
    missing = tmp_path / "checkpoints" / "learner.pt"
    rebuilt = actor_class.remote(
        run_config(), [], board, str(missing), require_checkpoint=True, generation=1
    )
    with pytest.raises(ray.exceptions.RayActorError) as error:
        ray.get(rebuilt.updates.remote(), timeout=120)
    assert f"learner checkpoint {missing} not found" in str(error.value)
    assert "cannot be rebuilt" in str(error.value)
    assert ray.get(board.version.remote()) == -1  # nothing published
    # Without require_checkpoint a missing file still means a fresh learner.
    fresh = actor_class.remote(run_config(), [], board, str(missing))
    assert ray.get(fresh.updates.remote(), timeout=120) == 0
    assert ray.get(fresh.resume_changes.remote()) == {}
    for actor in (fresh, board):
        ray.kill(actor)


def test_a_rebuilt_learner_publishes_as_a_new_generation(
    ray_instance: None, tmp_path: Path
) -> None:
    """The dead learner (generation 0) had published version 5; its last
    checkpoint is at update 2. The rebuilt one's version 2 must reach the board."""
    path = trained_checkpoint(tmp_path / "learner.pt", updates=2, batch_size=8)
    board = remote_weights_board_class().remote()
    dead_weights = {"head.net.0.weight": np.zeros((1, 1), np.float32)}
    assert ray.get(board.publish.remote(5, dead_weights, 0))
    actor_class = remote_learner_actor_class(num_cpus=0)
    rebuilt = actor_class.remote(
        run_config(), [], board, str(path), require_checkpoint=True, generation=1
    )
    try:
        assert ray.get(rebuilt.updates.remote(), timeout=120) == 2
        assert ray.get(board.generation.remote()) == 1
        assert ray.get(board.version.remote()) == 2
        published = ray.get(board.newer.remote(0, 5))
        assert published is not None and (published.generation, published.version) == (1, 2)
        weights = ray.get(published.ref[0])
        expected = load_policy_checkpoint(path).weights
        assert weights.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_array_equal(weights[name], value)
        # A late publication of the dead generation is refused.
        assert not ray.get(board.publish.remote(6, dead_weights, 0))
    finally:
        for actor in (rebuilt, board):
            ray.kill(actor)

"""Configuration: validation errors name the field, and YAML values reach the code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learner.td3 import TD3Learner
from td3drive.contracts import metric_names as M
from td3drive.contracts.config import ConfigError, LearnerConfig, RunConfig, load_config
from tests.conftest import random_batch

REPO = Path(__file__).resolve().parents[1]


def test_shipped_local_config_validates() -> None:
    config = load_config(REPO / "deploy" / "local.yaml")
    assert config.learner.encoder == "shared"
    assert config.learner.random_shift_pad == 4
    assert config.learner.encoder_output == "layernorm_tanh"
    assert config.learner.action_preactivation_penalty == 0.01
    assert config.learner.actor_lr == 1e-4


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_values_reach_the_learner(tmp_path: Path) -> None:
    # Acme's TD3 builder once dropped `delay` and `tau` silently; pin both.
    path = _write(
        tmp_path,
        "learner:\n  tau: 0.25\n  policy_delay: 3\n  features_dim: 32\n"
        "  actor_hidden: [16]\n  critic_hidden: [16]\n  random_shift_pad: 0\n  device: cpu\n",
    )
    learner = TD3Learner(load_config(path).learner)
    batch = random_batch()
    flags = [learner.update(batch)[M.ACTOR_UPDATED] for _ in range(2)]
    assert flags == [0.0, 0.0]
    old = {k: v.clone() for k, v in learner.target_actor_head.state_dict().items()}
    assert learner.update(batch)[M.ACTOR_UPDATED] == 1.0
    online = learner.actor.head.state_dict()
    for name, value in learner.target_actor_head.state_dict().items():
        expected = old[name] + 0.25 * (online[name] - old[name])
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-7)


def test_overrides_apply_and_parse_as_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, "learner:\n  tau: 0.01\n")
    config = load_config(path, ["learner.tau=0.02", "learner.actor_hidden=[64, 64]"])
    assert config.learner.tau == 0.02
    assert config.learner.actor_hidden == (64, 64)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learner:\n  tua: 0.01\n", r"learner\.tua"),
        ("learner:\n  tau: fast\n", r"learner\.tau"),
        ("learner:\n  tau: 2.0\n", r"learner\.tau"),
        ("learner:\n  encoder: both\n", r"learner\.encoder"),
        ("learner:\n  encoder: frozen\n  encoder_lr: 0.001\n", "encoder_lr"),
        ("learner:\n  encoder_output: sigmoid\n", r"learner\.encoder_output"),
        ("learner:\n  action_preactivation_penalty: -1\n", r"learner\.action_preactivation"),
        ("learnr: {}\n", "learnr"),
        ("learner: [1, 2\n", "not valid YAML"),
        ("- 1\n- 2\n", "mapping"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        load_config(_write(tmp_path, text))
    assert "run.yaml" in str(error.value)


def test_missing_file_and_bad_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")
    path = _write(tmp_path, "")
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config(path, ["tau"])
    with pytest.raises(ConfigError, match=r"learner\.policy_delay"):
        load_config(path, ["learner.policy_delay=0"])


def test_config_is_frozen() -> None:
    config = LearnerConfig()
    with pytest.raises(ValueError, match="frozen"):
        config.tau = 0.1  # type: ignore[misc]


def test_replay_section_validates_and_splits_over_shards(tmp_path: Path) -> None:
    config = load_config(REPO / "deploy" / "local.yaml")
    replay = config.replay
    assert replay.per_shard(replay.capacity_transitions) == 50_000
    assert replay.replay_ratio is not None
    assert replay.tolerance_for(64) == 64 + replay.replay_ratio * replay.chunk_steps
    with pytest.raises(ConfigError, match=r"batch_size \(256\) exceeds replay\.min_size_to_sample"):
        load_config(
            _write(tmp_path, "learner:\n  batch_size: 256\nreplay:\n  min_size_to_sample: 100\n")
        )
    with pytest.raises(ConfigError, match=r"replay\.replay_ratio"):
        load_config(_write(tmp_path, "replay:\n  replay_ratio: -1\n"))


# Ports a Ray head node already uses: GCS, Serve, dashboard, client, dashboard
# agent, the autoscaler's and the dashboard's metrics (44217, 44227), and 8080, which
# KubeRay gives Ray's own metrics export on every pod; plus the Prometheus stack
# (server, Pushgateway, Alertmanager, node and DCGM exporters).
RAY_PORTS = {6379, 8000, 8265, 10001, 52365, 44217, 44227, 8080}
MONITORING_PORTS = {9090, 9091, 9093, 9100, 9400}


def test_default_metrics_port_avoids_ray_and_kuberay() -> None:
    """The old default, 8080, is Ray's metrics export port on every KubeRay pod."""
    port = RunConfig().metrics_port
    assert port is not None and port not in RAY_PORTS | MONITORING_PORTS
    assert not 10002 <= port <= 19999  # `ray start`'s default worker ports
    assert port < 32768  # below Linux's ephemeral range (Ray's random ports)
    assert "8080" in (RunConfig.model_fields["metrics_port"].description or "")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run.metrics_linger_s=-1", r"run\.metrics_linger_s"),
        ("run.metrics_linger_s=.inf", r"run\.metrics_linger_s"),
        ("run.metrics_port=65536", r"run\.metrics_port"),
    ],
)
def test_metrics_settings_are_validated(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, ""), [override])


def test_metrics_linger_and_port_can_be_turned_off(tmp_path: Path) -> None:
    config = load_config(
        _write(tmp_path, ""), ["run.metrics_linger_s=0", "run.metrics_port=null"]
    ).run
    assert config.metrics_linger_s == 0.0 and config.metrics_port is None
    assert RunConfig().metrics_linger_s == 30.0

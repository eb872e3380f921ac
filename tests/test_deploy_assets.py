"""The files in deploy/: run configs validate, the dashboard and the alert rules
use only metric names the exporter exports, Prometheus accepts its files
(promtool), the alert rules fire on the failures they describe and stay quiet on
a healthy run, and the KubeRay manifest matches deploy/cluster.yaml."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from rollout_workers.worker import env_kwargs_for
from td3drive.config import CarlaConfig, RunConfig, load_config
from td3drive.prometheus import COUNTERS, GAUGES, LABELS

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
RAYJOB = DEPLOY / "kuberay" / "rayjob.yaml"

EXPORTED = {f"{name}_total" for name in COUNTERS} | set(GAUGES)
METRIC = re.compile(r"\btd3drive_\w+")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not on PATH")


def _exported_labels(name: str) -> set[str]:
    base = name.removesuffix("_total") if name.endswith("_total") else name
    return set(LABELS.get(base, ())) | {"job", "instance"}


# --- run configurations --------------------------------------------------------


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda p: p.name)
def test_run_config_validates(path: Path) -> None:
    config = load_config(path)
    assert config.run.metrics_port == RunConfig().metrics_port


def test_cluster_config_is_the_scaled_gpu_run() -> None:
    config = load_config(DEPLOY / "cluster.yaml")
    assert config.rollout.env_id == "td3drive/Racetrack-v0"
    assert config.rollout.num_workers == 16 and config.replay.num_shards == 4
    assert config.learner.device == "cuda" and config.run.learner_num_gpus == 1
    assert config.learner.batch_size == 256
    assert config.run.total_env_steps > load_config(DEPLOY / "local.yaml").run.total_env_steps


def test_carla_config_reaches_the_environment() -> None:
    config = load_config(DEPLOY / "carla.yaml")
    assert config.rollout.env_id == "td3drive/Carla-v0"
    # The sections themselves reach the environment (no copy in env_kwargs).
    assert "carla" not in config.rollout.env_kwargs and "task" not in config.rollout.env_kwargs
    kwargs = env_kwargs_for(config, worker_index=0)
    assert CarlaConfig.model_validate(kwargs["carla"]) == config.carla
    assert kwargs["task"] == config.task.model_dump()
    carla_env = pytest.importorskip("rollout_workers.carla_env")
    env = carla_env.CarlaEnv(**kwargs)  # construction validates and never connects
    try:
        assert env.address == f"{config.carla.host}:{config.carla.port}"
    finally:
        env.close()


# --- Grafana dashboard --------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            yield panel, target


def test_dashboard_structure() -> None:
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 36
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Rollout", "Replay", "Learner", "Health"]
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in _panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


def test_dashboard_exprs_use_exported_metrics_and_labels() -> None:
    dashboard = _dashboard()
    used: set[str] = set()
    for panel, target in _targets(dashboard):
        expr = target["expr"]
        names = set(METRIC.findall(expr))
        assert names <= EXPORTED, f"{panel['title']}: unknown {names - EXPORTED}"
        used |= names
        labels = set().union(*(_exported_labels(n) for n in names)) if names else set()
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
        assert legend <= labels, f"{panel['title']}: legend labels {legend - labels}"
        if panel["type"] == "timeseries":
            counters = [n for n in METRIC.findall(expr) if n.endswith("_total")]
            wrapped = re.findall(r"(?:rate|increase)\(\s*(td3drive_\w+_total)", expr)
            assert counters == wrapped, f"{panel['title']}: counters outside rate()/increase()"
    for variable in dashboard["templating"]["list"]:
        assert set(METRIC.findall(json.dumps(variable))) <= EXPORTED
    # Every exported family is on the dashboard somewhere.
    assert used == EXPORTED, f"not on the dashboard: {EXPORTED - used}"


@needs_promtool
def test_dashboard_exprs_are_valid_promql(tmp_path: Path) -> None:
    """Grafana's macros replaced by values, each expr checked as a recording rule."""
    rules = []
    for panel, target in _targets(_dashboard()):
        expr = (
            target["expr"]
            .replace("$__rate_interval", "5m")
            .replace("$__range", "1h")
            .replace("$instance", ".*")
        )
        rules.append({"record": f"dashboard:panel{panel['id']}_{target['refId']}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _promtool("check", "rules", str(path))


# --- Prometheus ---------------------------------------------------------------


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alert_rules_are_complete_and_use_exported_metrics() -> None:
    rules = _alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        unknown = set(METRIC.findall(rule["expr"])) - EXPORTED
        assert not unknown, f"{rule['alert']}: unknown {unknown}"
        assert "for" in rule, rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    # The failures that stalled the reference system are all covered.
    for expected in (
        "TD3DriveNonFiniteLoss",
        "TD3DriveEncodersNotLearning",
        "TD3DriveQValuesOutOfRange",
        "TD3DriveGradNormAboveClip",
        "TD3DriveLearnerStarved",
        "TD3DriveLearnerStalled",
        "TD3DriveWorkersStalled",
        "TD3DrivePolicyLagHigh",
    ):
        assert expected in names


def test_prometheus_config_scrapes_the_driver() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "td3drive"]
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert f"localhost:{RunConfig().metrics_port}" in targets
    # The alert rules and the dashboard select this job name.
    assert 'job="td3drive"' in ALERTS.read_text()
    for _, target in _targets(_dashboard()):
        if METRIC.search(target["expr"]):
            assert 'job="td3drive"' in target["expr"], target["expr"]


def _promtool(*args: str, cwd: Path | None = None) -> str:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@needs_promtool
def test_promtool_accepts_rules_and_config() -> None:
    assert "SUCCESS" in _promtool("check", "rules", str(ALERTS))
    assert "SUCCESS" in _promtool("check", "config", str(PROMETHEUS))


# Alert-rule unit tests (promtool test rules). One sample a minute for 90 min.
MINUTES = 90
WHERE = 'job="td3drive", instance="driver:8080"'
TARGET = {"job": "td3drive", "instance": "driver:8080"}


def _ramp(start: float, per_minute: float = 0.0) -> str:
    return " ".join(f"{start + per_minute * i:g}" for i in range(MINUTES + 1))


def _s(name: str, **labels: str) -> str:
    """A series selector of the test target: ``name{job, instance, labels}``."""
    extra = "".join(f', {key}="{value}"' for key, value in labels.items())
    return f"{name}{{{WHERE}{extra}}}"


def _healthy() -> dict[str, str]:
    """A run that trains: 400 env steps/s, 10 updates/s, clipping active, Q rising slowly."""
    return {
        _s("up"): _ramp(1),
        _s("td3drive_env_steps_total"): _ramp(0, 24_000),
        _s("td3drive_env_steps_per_second", worker="0"): _ramp(200),
        _s("td3drive_env_steps_per_second", worker="1"): _ramp(200),
        _s("td3drive_learner_updates_total"): _ramp(0, 600),
        _s("td3drive_learner_non_finite_loss"): _ramp(0),
        _s("td3drive_learner_loss", network="critic"): _ramp(0.5),
        _s("td3drive_learner_loss", network="actor"): _ramp(-3),
        _s("td3drive_learner_q_value", head="q1"): _ramp(0, 0.5),
        _s("td3drive_learner_q_value", head="q2"): _ramp(0, 0.5),
        _s("td3drive_learner_q_value", head="target"): _ramp(0, 0.5),
        _s("td3drive_learner_grad_norm", network="actor", stage="preclip"): _ramp(20),
        _s("td3drive_learner_grad_norm", network="actor", stage="postclip"): _ramp(10),
        _s("td3drive_learner_grad_norm", network="critic", stage="preclip"): _ramp(5),
        _s("td3drive_learner_grad_norm", network="critic", stage="postclip"): _ramp(5),
        _s("td3drive_learner_encoder_weight_delta_ratio", network="actor"): _ramp(0, 0.001),
        _s("td3drive_learner_encoder_weight_delta_ratio", network="critic"): _ramp(0, 0.001),
        _s("td3drive_learner_actor_saturation_ratio"): _ramp(0.05),
        _s("td3drive_rate_limiter_wait_seconds_total", shard="0", side="sample"): _ramp(0, 6),
        _s("td3drive_rate_limiter_wait_seconds_total", shard="0", side="insert"): _ramp(0, 6),
        _s("td3drive_replay_size_transitions", shard="0"): _ramp(50_000),
        _s("td3drive_replay_size_transitions", shard="1"): _ramp(50_000),
        # Expected from replay age: 100k x 10 / 400 = 2,500 updates.
        _s("td3drive_policy_lag_updates"): _ramp(1_300),
        _s("td3drive_worker_restarts_total"): _ramp(0),
        _s("td3drive_env_restarts_total"): _ramp(0),
        _s("td3drive_replay_rejected_payloads_total", shard="0"): _ramp(0),
    }


NAN_FROM_MINUTE_60 = " ".join(["0.5"] * 60 + ["NaN"] * (MINUTES - 59))

# (alert, series overrides, expected alerts' labels besides job/instance/severity)
FAILURES: list[tuple[str, dict[str, str], list[dict[str, str]]]] = [
    (
        "TD3DriveNonFiniteLoss",
        {
            _s("td3drive_learner_loss", network="critic"): NAN_FROM_MINUTE_60,
            _s("td3drive_learner_non_finite_loss"): _ramp(1),
        },
        [{}, {"network": "critic"}],
    ),
    (
        "TD3DriveEncodersNotLearning",
        {_s("td3drive_learner_encoder_weight_delta_ratio", network="actor"): _ramp(0)},
        [{"network": "actor"}],
    ),
    (
        "TD3DriveActorSaturated",
        {_s("td3drive_learner_actor_saturation_ratio"): _ramp(1.0)},
        [{}],
    ),
    (
        "TD3DriveQValuesOutOfRange",
        {_s("td3drive_learner_q_value", head="q1"): _ramp(0, 5)},
        [{"head": "q1"}],
    ),
    (
        "TD3DriveQValuesGrowingFast",
        {_s("td3drive_learner_q_value", head="q2"): _ramp(-100, 2.5)},
        [{"head": "q2"}],
    ),
    (
        "TD3DriveGradNormAboveClip",
        {
            _s("td3drive_learner_grad_norm", network="actor", stage="postclip"): _ramp(15),
            _s("td3drive_learner_grad_norm", network="critic", stage="postclip"): _ramp(8),
        },
        # above the clip (keeps stage) / above its own pre-clip norm (matched ignoring stage)
        [{"network": "actor", "stage": "postclip"}, {"network": "critic"}],
    ),
    (
        "TD3DriveGradNormExploding",
        {_s("td3drive_learner_grad_norm", network="critic", stage="preclip"): _ramp(500)},
        [{"network": "critic", "stage": "preclip"}],
    ),
    ("TD3DriveLearnerStalled", {_s("td3drive_learner_updates_total"): _ramp(6_000)}, [{}]),
    (
        "TD3DriveLearnerStarved",
        {_s("td3drive_rate_limiter_wait_seconds_total", shard="0", side="sample"): _ramp(0, 50)},
        [{}],
    ),
    (
        "TD3DriveRolloutThrottledByLearner",
        {_s("td3drive_rate_limiter_wait_seconds_total", shard="0", side="insert"): _ramp(0, 50)},
        [{}],
    ),
    ("TD3DrivePolicyLagHigh", {_s("td3drive_policy_lag_updates"): _ramp(10_000)}, [{}]),
    ("TD3DriveEndpointDown", {_s("up"): _ramp(0)}, [{}]),
    ("TD3DriveWorkersStalled", {_s("td3drive_env_steps_total"): _ramp(1_000)}, [{}]),
    (
        "TD3DriveWorkerStalled",
        {_s("td3drive_env_steps_per_second", worker="1"): _ramp(0)},
        [{"worker": "1"}],
    ),
    ("TD3DriveWorkersRestarting", {_s("td3drive_worker_restarts_total"): _ramp(0, 1)}, [{}]),
    (
        "TD3DriveReplayRejectsPayloads",
        {_s("td3drive_replay_rejected_payloads_total", shard="0"): _ramp(0, 1)},
        [{"shard": "0"}],
    ),
]


def _test_group(series: dict[str, str], checks: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series.items()],
        "alert_rule_test": checks,
    }


@needs_promtool
def test_alert_rules_fire_on_failures_and_not_on_a_healthy_run(tmp_path: Path) -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    severity = {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")  # promtool compares annotations verbatim; labels suffice
            severity[rule["alert"]] = rule["labels"]["severity"]
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    assert {name for name, _, _ in FAILURES} == set(severity), "every alert has a failure case"

    at = f"{MINUTES}m"
    quiet = [{"eval_time": at, "alertname": name, "exp_alerts": []} for name in severity]
    groups = [_test_group(_healthy(), quiet)]
    for name, overrides, expected in FAILURES:
        alerts = [
            {"exp_labels": {**TARGET, "severity": severity[name], **labels}} for labels in expected
        ]
        check = {"eval_time": at, "alertname": name, "exp_alerts": alerts}
        groups.append(_test_group({**_healthy(), **overrides}, [check]))
    tests = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": groups}
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    _promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)


# --- KubeRay ------------------------------------------------------------------


def _cpus(value: str | int) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_rayjob_manifest_matches_the_cluster_config() -> None:
    docs = list(yaml.safe_load_all(RAYJOB.read_text()))
    kinds = {doc["kind"]: doc for doc in docs}
    job, service = kinds["RayJob"], kinds["Service"]
    assert job["apiVersion"] == "ray.io/v1"
    assert "td3drive train --config deploy/cluster.yaml" in job["spec"]["entrypoint"]
    config = load_config(DEPLOY / "cluster.yaml")

    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]
    head_ports = {p["containerPort"] for c in head["spec"]["containers"] for p in c["ports"]}
    assert config.run.metrics_port in head_ports
    assert service["spec"]["ports"][0]["port"] == config.run.metrics_port
    assert service["spec"]["selector"].items() <= head["metadata"]["labels"].items()

    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    rollout, learner = groups["rollout"], groups["learner"]

    def ray_cpus(group: dict[str, Any]) -> float:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        cpus = group["rayStartParams"].get("num-cpus", limits["cpu"])
        return float(group["replicas"]) * _cpus(cpus)

    run = config.run
    needed = (
        config.rollout.num_workers * run.worker_num_cpus
        + config.replay.num_shards * run.shard_num_cpus
    )
    assert ray_cpus(rollout) >= needed
    assert ray_cpus(learner) >= run.learner_num_cpus
    gpu_limits = learner["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) >= run.learner_num_gpus
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"

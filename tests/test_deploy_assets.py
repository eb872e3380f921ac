"""The files in deploy/: run configs validate, the dashboard and the alert rules
use only metric names the exporter exports, Prometheus accepts its files
(promtool), the alert rules fire on the failures they describe and stay quiet on
a healthy run (and on a run that finished). Also the endpoint itself
(td3drive/app/prometheus.py): bound first with a one-line error for a taken port,
run_id on every series, the run status, and a close that lingers until a real
Prometheus has scraped the end. The KubeRay manifests and the Dockerfile are
checked in tests/test_kuberay_manifests.py."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from rollout_workers.worker import env_kwargs_for
from td3drive.app.prometheus import (
    COUNTERS,
    GAUGES,
    LABELS,
    RUN_ID_LABEL,
    RUN_STATUSES,
    MetricsEndpoint,
    MetricsPortError,
    RunMetrics,
)
from td3drive.contracts.config import CarlaConfig, ConfigError, RunConfig, load_config
from tests.conftest import wait_until
from tests.test_train import _prometheus_binary, _start_prometheus

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"

EXPORTED = {f"{name}_total" for name in COUNTERS} | set(GAUGES)
METRIC = re.compile(r"\btd3drive_\w+")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not on PATH")


def _exported_labels(name: str) -> set[str]:
    base = name.removesuffix("_total") if name.endswith("_total") else name
    return set(LABELS.get(base, ())) | {"job", "instance", RUN_ID_LABEL}


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
    carla_env = pytest.importorskip("rollout_workers.carla.env")
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
    assert "run_id" in variables["run_id"]["query"]["query"]
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
            .replace("$run_id", ".*")
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
            # every td3drive selector also picks the runs of the $run_id variable
            selectors = re.findall(r"td3drive_\w+\{[^}]*\}", target["expr"])
            assert all('run_id=~"$run_id"' in sel for sel in selectors), target["expr"]


def test_linger_covers_two_scrapes() -> None:
    """run.metrics_linger_s must let Prometheus scrape the final status twice at
    prometheus.yml's interval (the alert rules read it after the target is down)."""
    config = yaml.safe_load(PROMETHEUS.read_text())
    interval = _seconds(config["global"]["scrape_interval"])
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "td3drive"]
    assert RunConfig().metrics_linger_s >= 2 * interval + _seconds(job["scrape_timeout"])
    for path in sorted(DEPLOY.glob("*.yaml")):
        assert load_config(path).run.metrics_linger_s >= 2 * interval, path.name


def _seconds(duration: str) -> float:
    value, unit = re.fullmatch(r"(\d+)(ms|s|m)", duration).groups()  # type: ignore[union-attr]
    return float(value) * {"ms": 0.001, "s": 1.0, "m": 60.0}[unit]


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
TARGET = {"job": "td3drive", "instance": "driver:9810"}
RUN = {"run_id": "r1"}
RUN_START = 1_700_000_000  # td3drive_run_start_time_seconds of run r1


def _ramp(start: float, per_minute: float = 0.0) -> str:
    return " ".join(f"{start + per_minute * i:g}" for i in range(MINUTES + 1))


def _s(name: str, run_id: str = "r1", **labels: str) -> str:
    """A series selector of the test target: ``name{job, instance, run_id, labels}``
    (``up`` is Prometheus's own and has no run_id)."""
    extra = {**TARGET, **({} if name == "up" else {RUN_ID_LABEL: run_id}), **labels}
    return name + "{" + ", ".join(f'{key}="{value}"' for key, value in extra.items()) + "}"


def _r(**labels: str) -> dict[str, str]:
    """Expected alert labels of a rule that keeps the run's labels."""
    return {**RUN, **labels}


def _status(current: str, run_id: str = "r1") -> dict[str, str]:
    """td3drive_run_status series of a run whose status is ``current`` throughout."""
    return {
        _s("td3drive_run_status", run_id, status=status): _ramp(1 if status == current else 0)
        for status in RUN_STATUSES
    }


def _healthy() -> dict[str, str]:
    """A run that trains: 400 env steps/s, 10 updates/s, clipping active, Q rising slowly."""
    return {
        _s("up"): _ramp(1),
        **_status("running"),
        _s("td3drive_run_start_time_seconds"): " ".join([str(RUN_START)] * (MINUTES + 1)),
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
        [_r(), _r(network="critic")],
    ),
    (
        "TD3DriveEncodersNotLearning",
        {_s("td3drive_learner_encoder_weight_delta_ratio", network="actor"): _ramp(0)},
        [_r(network="actor")],
    ),
    (
        "TD3DriveActorSaturated",
        {_s("td3drive_learner_actor_saturation_ratio"): _ramp(1.0)},
        [_r()],
    ),
    (
        "TD3DriveQValuesOutOfRange",
        {_s("td3drive_learner_q_value", head="q1"): _ramp(0, 5)},
        [_r(head="q1")],
    ),
    (
        "TD3DriveQValuesGrowingFast",
        {_s("td3drive_learner_q_value", head="q2"): _ramp(-100, 2.5)},
        [_r(head="q2")],
    ),
    (
        "TD3DriveGradNormAboveClip",
        {
            _s("td3drive_learner_grad_norm", network="actor", stage="postclip"): _ramp(15),
            _s("td3drive_learner_grad_norm", network="critic", stage="postclip"): _ramp(8),
        },
        # above the clip (keeps stage) / above its own pre-clip norm (matched ignoring stage)
        [_r(network="actor", stage="postclip"), _r(network="critic")],
    ),
    (
        "TD3DriveGradNormExploding",
        {_s("td3drive_learner_grad_norm", network="critic", stage="preclip"): _ramp(500)},
        [_r(network="critic", stage="preclip")],
    ),
    ("TD3DriveLearnerStalled", {_s("td3drive_learner_updates_total"): _ramp(6_000)}, [_r()]),
    (
        "TD3DriveLearnerStarved",
        {_s("td3drive_rate_limiter_wait_seconds_total", shard="0", side="sample"): _ramp(0, 50)},
        [_r()],
    ),
    (
        "TD3DriveRolloutThrottledByLearner",
        {_s("td3drive_rate_limiter_wait_seconds_total", shard="0", side="insert"): _ramp(0, 50)},
        [_r()],
    ),
    ("TD3DrivePolicyLagHigh", {_s("td3drive_policy_lag_updates"): _ramp(10_000)}, [_r()]),
    # The target is down while the run's last status is running: a dead driver.
    ("TD3DriveEndpointDown", {_s("up"): _ramp(0)}, [{}]),
    ("TD3DriveRunFailed", _status("failed"), [_r(status="failed")]),
    ("TD3DriveWorkersStalled", {_s("td3drive_env_steps_total"): _ramp(1_000)}, [_r()]),
    (
        "TD3DriveWorkerStalled",
        {_s("td3drive_env_steps_per_second", worker="1"): _ramp(0)},
        [_r(worker="1")],
    ),
    ("TD3DriveWorkersRestarting", {_s("td3drive_worker_restarts_total"): _ramp(0, 1)}, [_r()]),
    (
        "TD3DriveReplayRejectsPayloads",
        {_s("td3drive_replay_rejected_payloads_total", shard="0"): _ramp(0, 1)},
        [_r(shard="0")],
    ),
]


def _test_group(series: dict[str, str], checks: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series.items()],
        "alert_rule_test": checks,
    }


def _rules_without_annotations(tmp_path: Path) -> dict[str, str]:
    """alerts.yml copied to tmp_path without annotations (promtool compares them
    verbatim; labels suffice); returns each alert's severity."""
    rules = yaml.safe_load(ALERTS.read_text())
    severity = {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")
            severity[rule["alert"]] = rule["labels"]["severity"]
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    return severity


def _run_promtool_tests(tmp_path: Path, groups: list[dict[str, Any]]) -> None:
    tests = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": groups}
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    _promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)


@needs_promtool
def test_alert_rules_fire_on_failures_and_not_on_a_healthy_run(tmp_path: Path) -> None:
    severity = _rules_without_annotations(tmp_path)
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
    _run_promtool_tests(tmp_path, groups)


# --- the end of a run: finished vs dead ------------------------------------------
END = 60  # minute of the driver's last scrape (the linger); the target is down after


def _ends_at(values: str, minute: int, last: float | None = None) -> str:
    """``values`` up to ``minute`` (the last one replaced by ``last``), then the
    staleness marker Prometheus writes when the target goes away, then nothing."""
    kept = values.split()[: minute + 1]
    if last is not None:
        kept[-1] = f"{last:g}"
    return " ".join([*kept, "stale", *["_"] * (MINUTES - minute - 1)])


def _run_that_ends(final_status: str | None, **final: float) -> dict[str, str]:
    """The healthy run whose driver went away after minute END. ``final_status``:
    the status it reported in its last scrape (None: it vanished while running);
    ``final``: other gauges' last values by metric name."""
    series = _healthy()
    ended = {}
    for selector, values in series.items():
        if selector.startswith("up{"):
            ended[selector] = " ".join(["1"] * (END + 1) + ["0"] * (MINUTES - END))
            continue
        name = selector.split("{")[0]
        last = final.get(name)
        if name == "td3drive_run_status" and final_status is not None:
            last = 1.0 if f'status="{final_status}"' in selector else 0.0
        ended[selector] = _ends_at(values, END, last)
    return ended


def _checks(
    severity: dict[str, str], expected: dict[str, dict[int, list[dict[str, str]]]]
) -> list[dict[str, Any]]:
    """promtool checks: ``{alert: {minute: [expected labels]}}``."""
    return [
        {
            "eval_time": f"{minute}m",
            "alertname": name,
            "exp_alerts": [
                {"exp_labels": {**TARGET, "severity": severity[name], **labels}}
                for labels in alerts
            ],
        }
        for name, by_minute in expected.items()
        for minute, alerts in by_minute.items()
    ]


@needs_promtool
def test_a_finished_run_does_not_page_and_a_dead_one_does(tmp_path: Path) -> None:
    """The old rule (`up == 0` for 5 min) paged every run 5 minutes after it
    completed; the NaN gauge, set as the run stopped, was never scraped. Now the
    driver's last scrapes carry the final status: completed or stopped is quiet,
    running-then-gone or failed pages, and the NaN alert outlives the endpoint."""
    severity = _rules_without_annotations(tmp_path)
    after = (END + 6, END + 15, MINUTES)  # EndpointDown's `for: 5m` has run out at END + 6
    down: dict[int, list[dict[str, str]]] = {m: [{}] for m in after}
    quiet: dict[int, list[dict[str, str]]] = {m: [] for m in after}
    groups = []
    for status in ("completed", "stopped"):
        groups.append(
            _test_group(
                _run_that_ends(status),
                _checks(
                    severity,
                    {
                        "TD3DriveEndpointDown": quiet,
                        "TD3DriveRunFailed": quiet,
                        "TD3DriveNonFiniteLoss": quiet,
                    },
                ),
            )
        )
    # Killed (SIGKILL, OOM, node lost): the endpoint vanished while running.
    groups.append(
        _test_group(
            _run_that_ends(None),
            _checks(severity, {"TD3DriveEndpointDown": down, "TD3DriveRunFailed": quiet}),
        )
    )
    # A NaN loss: the driver set the gauge and status failed, and lingered.
    nan_run = _run_that_ends("failed", td3drive_learner_non_finite_loss=1.0)
    failed = [_r(status="failed")]
    groups.append(
        _test_group(
            nan_run,
            _checks(
                severity,
                {
                    "TD3DriveNonFiniteLoss": {END: [_r()], END + 1: [_r()], MINUTES: [_r()]},
                    "TD3DriveRunFailed": {END: failed, END + 1: failed, MINUTES: failed},
                    "TD3DriveEndpointDown": down,
                },
            ),
        )
    )
    _run_promtool_tests(tmp_path, groups)


@needs_promtool
def test_a_completed_rerun_after_a_crash_does_not_page(tmp_path: Path) -> None:
    """Run r1 dies while running at minute 30 (pages); run r2 starts at the same
    target at minute 40 and completes at minute 70: only the newest run's last
    status counts, so r2's end is quiet although r1's last status was running."""
    severity = _rules_without_annotations(tmp_path)
    gap, start, end = 30, 40, 70

    def segment(first: int, last: int, values: list[str]) -> str:
        out = ["_"] * (MINUTES + 1)
        out[first : last + 1] = values
        if last + 1 <= MINUTES:
            out[last + 1] = "stale"
        return " ".join(out)

    def run(run_id: str, first: int, last: int, final: str, started: int) -> dict[str, str]:
        n = last - first + 1
        series = {
            _s("td3drive_run_status", run_id, status=s): segment(
                first,
                last,
                ["1" if s == "running" else "0"] * (n - 1) + ["1" if s == final else "0"],
            )
            for s in RUN_STATUSES
        }
        series[_s("td3drive_run_start_time_seconds", run_id)] = segment(
            first, last, [str(started)] * n
        )
        return series

    up = ["1"] * (gap + 1) + ["0"] * (start - gap - 1) + ["1"] * (end - start + 1)
    up += ["0"] * (MINUTES - end)
    series = {
        _s("up"): " ".join(up),
        **run("r1", 0, gap, "running", RUN_START),
        **run("r2", start, end, "completed", RUN_START + start * 60),
    }
    checks = _checks(
        severity,
        {"TD3DriveEndpointDown": {gap + 7: [{}], start + 5: [], end + 6: [], MINUTES: []}},
    )
    _run_promtool_tests(tmp_path, [_test_group(series, checks)])


# --- the endpoint (td3drive/app/prometheus.py) ---------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _scrape(port: int) -> dict[str, list[Any]]:
    """Samples of ``http://127.0.0.1:port/metrics`` by family name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def _refused(port: int) -> bool:
    with socket.socket() as client:
        return client.connect_ex(("127.0.0.1", port)) != 0


def test_a_taken_port_is_a_one_line_config_error() -> None:
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(MetricsPortError) as raised:
            MetricsEndpoint.bind(RunMetrics(run_id="r1"), port)
    error = raised.value
    assert isinstance(error, ConfigError) and error.port == port and error.in_use
    assert str(error) == (
        f"run.metrics_port {port} is taken (Address already in use); choose another with "
        "--set run.metrics_port=N or null to disable"
    )


def test_every_series_carries_the_run_id_and_the_status_is_an_enum() -> None:
    metrics = RunMetrics(run_id="runs-local")
    metrics.set_counter("td3drive_env_steps", 640)
    metrics.set_gauge("td3drive_replay_size_transitions", 320, "0")
    metrics.update_learner({"losses/critic": 0.5})
    with MetricsEndpoint.bind(metrics, 0, address="127.0.0.1") as endpoint:
        families = _scrape(endpoint.port)
        samples = [sample for family in families.values() for sample in family]
        assert samples and all(s.labels.get("run_id") == "runs-local" for s in samples)
        status = {s.labels["status"]: s.value for s in families["td3drive_run_status"]}
        assert status == {"running": 1.0, "completed": 0.0, "stopped": 0.0, "failed": 0.0}
        (nan_gauge,) = families["td3drive_learner_non_finite_loss"]
        assert nan_gauge.value == 0.0  # exported from the start, so a resume clears the alert
        (started,) = families["td3drive_run_start_time_seconds"]
        assert abs(started.value - time.time()) < 3600

        metrics.set_status("stopped")
        status = {
            s.labels["status"]: s.value for s in _scrape(endpoint.port)["td3drive_run_status"]
        }
        assert status == {"running": 0.0, "completed": 0.0, "stopped": 1.0, "failed": 0.0}
        assert metrics.status == "stopped"
    with pytest.raises(ValueError, match="not one of running, completed, stopped, failed"):
        metrics.set_status("crashed")


def test_close_lingers_then_releases_the_port() -> None:
    """The old endpoint was shut at once when the run ended (the final values
    were never scraped) and its socket was never closed."""
    metrics = RunMetrics(run_id="r1")
    endpoint = MetricsEndpoint.bind(metrics, 0, address="127.0.0.1")
    port = endpoint.port
    metrics.set_status("completed")
    closer = threading.Thread(target=endpoint.close, kwargs={"linger_s": 600.0})
    closer.start()
    wait_until(lambda: endpoint.lingering, "close() lingers")
    # Still served after the run ended, with its final status.
    (completed,) = [
        s for s in _scrape(port)["td3drive_run_status"] if s.labels["status"] == "completed"
    ]
    assert completed.value == 1.0 and not endpoint.closed
    endpoint.stop_lingering()
    closer.join(timeout=120)
    assert not closer.is_alive() and endpoint.closed and _refused(port)
    endpoint.close(0.0)  # idempotent
    # The port is free again: a new endpoint binds it.
    MetricsEndpoint.bind(RunMetrics(run_id="r2"), port, address="127.0.0.1").close(0.0)

    short = MetricsEndpoint.bind(RunMetrics(run_id="r3"), 0, address="127.0.0.1")
    started = time.monotonic()
    short.close(0.2)
    assert time.monotonic() - started >= 0.2 and _refused(short.port)
    with pytest.raises(ValueError, match="linger_s"):
        short.close(-1.0)


def _prometheus_query(prometheus: str, expression: str) -> list[dict[str, Any]]:
    url = f"{prometheus}/api/v1/query?query={urllib.parse.quote(expression)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
    except (OSError, urllib.error.URLError):
        return []  # Prometheus still starting
    return list(body["data"]["result"])


def _alert_rule(prometheus: str, name: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{prometheus}/api/v1/rules?type=alert", timeout=10) as response:
        groups = json.loads(response.read())["data"]["groups"]
    (rule,) = [r for g in groups for r in g["rules"] if r["name"] == name]
    return dict(rule)


def _last_evaluation(prometheus: str, name: str) -> float:
    """Unix time of the rule's last evaluation (RFC 3339 with nanoseconds)."""
    stamp = _alert_rule(prometheus, name)["lastEvaluation"]
    match = re.fullmatch(r"(.+?)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", stamp)
    assert match is not None, stamp
    whole, fraction, zone = match.groups()
    parsed = datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone))
    return parsed.timestamp() + float(f"0.{fraction or 0}")


def test_a_real_prometheus_sees_the_nan_gauge_of_a_run_that_stopped(tmp_path: Path) -> None:
    """A run that stopped on a NaN loss: the driver sets the gauge and status
    failed, then closes the endpoint with a linger. Prometheus, started only
    after the run ended, scrapes both; TD3DriveNonFiniteLoss (deploy's rules)
    fires with the run_id, and keeps firing after the endpoint is gone.
    Before, the endpoint was shut at once and Prometheus never saw the gauge."""
    _prometheus_binary()  # skips (or fails under CI) without the server
    metrics = RunMetrics(run_id="nan-run")
    endpoint = MetricsEndpoint.bind(metrics, 0, address="127.0.0.1")
    metrics.set_gauge("td3drive_learner_non_finite_loss", 1.0)
    metrics.set_status("failed")
    # The run has ended: close with a linger (long; cut short once Prometheus has seen it).
    closer = threading.Thread(target=endpoint.close, kwargs={"linger_s": 600.0})
    closer.start()
    wait_until(lambda: endpoint.lingering, "close() lingers")

    server, prometheus = _start_prometheus(tmp_path, endpoint.port, rule_files=[str(ALERTS)])

    def firing(alert: str) -> list[dict[str, Any]]:
        return _prometheus_query(prometheus, f'ALERTS{{alertname="{alert}", alertstate="firing"}}')

    try:
        gauge = 'td3drive_learner_non_finite_loss{job="td3drive"} == 1'
        wait_until(lambda: _prometheus_query(prometheus, gauge), "Prometheus sees the NaN gauge")
        (series,) = _prometheus_query(prometheus, gauge)
        assert series["metric"]["run_id"] == "nan-run" and float(series["value"][1]) == 1.0
        (status,) = _prometheus_query(prometheus, 'td3drive_run_status{status="failed"} == 1')
        assert status["metric"]["run_id"] == "nan-run"
        wait_until(lambda: firing("TD3DriveNonFiniteLoss"), "TD3DriveNonFiniteLoss fires")
        assert firing("TD3DriveNonFiniteLoss")[0]["metric"]["run_id"] == "nan-run"
        wait_until(lambda: firing("TD3DriveRunFailed"), "TD3DriveRunFailed fires")

        endpoint.stop_lingering()  # the linger ends: the driver exits
        closer.join(timeout=120)
        assert endpoint.closed and _refused(endpoint.port)
        down = 'timestamp(up{job="td3drive"} == 0)'
        wait_until(lambda: _prometheus_query(prometheus, down), "Prometheus sees the target down")
        went_down = float(_prometheus_query(prometheus, down)[0]["value"][1])
        # The alert outlives the endpoint (last_over_time in alerts.yml): its rule,
        # evaluated after the target went down, still fires.
        wait_until(
            lambda: _last_evaluation(prometheus, "TD3DriveNonFiniteLoss") > went_down,
            "the rules are evaluated after the target went down",
        )
        rule = _alert_rule(prometheus, "TD3DriveNonFiniteLoss")
        assert rule["state"] == "firing", "the NaN alert resolved when the endpoint went away"
    finally:
        endpoint.stop_lingering()
        closer.join(timeout=120)
        server.terminate()
        server.wait(timeout=60)

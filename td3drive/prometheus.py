"""The run's Prometheus endpoint (one scrape target, served by the driver).

Metric names follow Prometheus conventions: ``td3drive_`` prefix, base units
in the name, ``_total`` for counters. The driver keeps one
:class:`RunMetrics` up to date from what the workers, shards and learner
report; a custom collector turns it into metric families at scrape time, so
cumulative counters are exported as the services counted them (no
double-counting across restarts of the exporter).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from td3drive import metric_names as M

# name, help, labels  (counters: the name without _total; the family adds it)
COUNTERS: dict[str, str] = {
    "td3drive_env_steps": "Environment steps collected by all rollout workers.",
    "td3drive_episodes": "Episodes finished by all rollout workers.",
    "td3drive_learner_updates": "TD3 updates applied by the learner.",
    "td3drive_worker_restarts": "Rollout worker actors restarted after dying.",
    "td3drive_env_restarts": "Environments rebuilt after raising inside a worker.",
    "td3drive_replay_inserted_transitions": "Transitions inserted, per shard.",
    "td3drive_replay_sampled_transitions": "Transitions sampled, per shard.",
    "td3drive_replay_rejected_payloads": "Chunks rejected as invalid, per shard.",
    "td3drive_replay_evicted_chunks": "Chunks evicted (FIFO), per shard.",
    "td3drive_rate_limiter_wait_seconds": "Seconds inserts/samples waited on the rate limiter.",
}
GAUGES: dict[str, str] = {
    "td3drive_episode_return": "Mean return of recent episodes.",
    "td3drive_episode_success_ratio": "Share of recent episodes that completed the route.",
    "td3drive_episode_route_completion_ratio": "Mean route completion of recent episodes.",
    "td3drive_episode_speed_kmh": "Mean speed of recent episodes, km/h.",
    "td3drive_episode_collision_ratio": "Share of recent episodes that ended in a collision.",
    "td3drive_env_steps_per_second": "Environment steps per second, per worker.",
    "td3drive_learner_updates_per_second": "Learner updates per second.",
    "td3drive_learner_loss": "Latest loss, per network (critic, actor).",
    "td3drive_learner_q_value": "Latest mean Q value (q1, q2, target).",
    "td3drive_learner_grad_norm": "Latest gradient L2 norm per network, before/after clipping.",
    "td3drive_learner_encoder_weight_delta_ratio": "||w - w0|| / ||w0|| of each encoder.",
    "td3drive_learner_actor_saturation_ratio": "Share of actions at the tanh bounds (|a|>0.99).",
    "td3drive_replay_size_transitions": "Transitions held, per shard.",
    "td3drive_replay_bytes": "Bytes held, per shard.",
    "td3drive_replay_compression_ratio": "Uncompressed / held bytes, per shard.",
    "td3drive_policy_lag_updates": "Mean learner updates between acting and training on a sample.",
    "td3drive_policy_version": "Latest published policy version (learner updates).",
    "td3drive_learner_non_finite_loss": "1 after the run stopped on a NaN/inf loss.",
}


@dataclass
class RunMetrics:
    """The current values the endpoint exports; the driver updates them.

    ``counters`` and ``gauges`` map a metric name (from :data:`COUNTERS` /
    :data:`GAUGES`) to ``{labels tuple: value}``; label names are in
    :data:`LABELS`.
    """

    counters: dict[str, dict[tuple[str, ...], float]] = field(default_factory=dict)
    gauges: dict[str, dict[tuple[str, ...], float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set_counter(self, name: str, value: float, *labels: str) -> None:
        with self.lock:
            self.counters.setdefault(name, {})[labels] = float(value)

    def set_gauge(self, name: str, value: float, *labels: str) -> None:
        with self.lock:
            self.gauges.setdefault(name, {})[labels] = float(value)

    def update_learner(self, metrics: dict[str, float]) -> None:
        """Map one learner metrics dict (:mod:`td3drive.metric_names`) onto gauges."""
        pairs = [
            ("td3drive_learner_loss", M.CRITIC_LOSS, ("critic",)),
            ("td3drive_learner_loss", M.ACTOR_LOSS, ("actor",)),
            ("td3drive_learner_actor_saturation_ratio", M.ACTOR_SATURATION, ()),
            ("td3drive_learner_q_value", M.Q1_MEAN, ("q1",)),
            ("td3drive_learner_q_value", M.Q2_MEAN, ("q2",)),
            ("td3drive_learner_q_value", M.TARGET_Q_MEAN, ("target",)),
            ("td3drive_learner_grad_norm", M.CRITIC_GRAD_NORM_PRECLIP, ("critic", "preclip")),
            ("td3drive_learner_grad_norm", M.CRITIC_GRAD_NORM_POSTCLIP, ("critic", "postclip")),
            ("td3drive_learner_grad_norm", M.ACTOR_GRAD_NORM_PRECLIP, ("actor", "preclip")),
            ("td3drive_learner_grad_norm", M.ACTOR_GRAD_NORM_POSTCLIP, ("actor", "postclip")),
            (
                "td3drive_learner_encoder_weight_delta_ratio",
                M.ACTOR_ENCODER_WEIGHT_DELTA,
                ("actor",),
            ),
            (
                "td3drive_learner_encoder_weight_delta_ratio",
                M.CRITIC_ENCODER_WEIGHT_DELTA,
                ("critic",),
            ),
        ]
        for family, key, labels in pairs:
            if key in metrics:
                self.set_gauge(family, metrics[key], *labels)


LABELS: dict[str, tuple[str, ...]] = {
    "td3drive_replay_inserted_transitions": ("shard",),
    "td3drive_replay_sampled_transitions": ("shard",),
    "td3drive_replay_rejected_payloads": ("shard",),
    "td3drive_replay_evicted_chunks": ("shard",),
    "td3drive_rate_limiter_wait_seconds": ("shard", "side"),
    "td3drive_env_steps_per_second": ("worker",),
    "td3drive_learner_loss": ("network",),
    "td3drive_learner_q_value": ("head",),
    "td3drive_learner_grad_norm": ("network", "stage"),
    "td3drive_learner_encoder_weight_delta_ratio": ("network",),
    "td3drive_replay_size_transitions": ("shard",),
    "td3drive_replay_bytes": ("shard",),
    "td3drive_replay_compression_ratio": ("shard",),
}


class _Collector(Collector):
    def __init__(self, metrics: RunMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        with self.metrics.lock:
            counters = {k: dict(v) for k, v in self.metrics.counters.items()}
            gauges = {k: dict(v) for k, v in self.metrics.gauges.items()}
        for name, help_text in COUNTERS.items():
            family = CounterMetricFamily(name, help_text, labels=list(LABELS.get(name, ())))
            for labels, value in counters.get(name, {}).items():
                family.add_metric(list(labels), value)
            yield family
        for name, help_text in GAUGES.items():
            gauge = GaugeMetricFamily(name, help_text, labels=list(LABELS.get(name, ())))
            for labels, value in gauges.get(name, {}).items():
                gauge.add_metric(list(labels), value)
            yield gauge


def serve(metrics: RunMetrics, port: int, address: str = "0.0.0.0") -> Any:
    """Start the scrape endpoint ``http://address:port/metrics`` in a thread.

    Returns:
        The server object (``.shutdown()`` stops it).

    Raises:
        OSError: the port is taken.
    """
    registry = CollectorRegistry()
    registry.register(_Collector(metrics))
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server

"""The run's Prometheus endpoint (one scrape target, served by the driver).

Metric names follow Prometheus conventions: ``td3drive_`` prefix, base units
in the name, ``_total`` for counters. The driver keeps one
:class:`RunMetrics` up to date from what the workers, shards and learner
report; a custom collector turns it into metric families at scrape time, so
cumulative counters are exported as the services counted them (no
double-counting across restarts of the exporter).

Every series carries a ``run_id`` label, and ``td3drive_run_status`` says
whether the run is ``running``, ``completed``, ``stopped`` or ``failed`` (one
series per status, 1 for the current one: the usual enum-as-gauge pattern).
The endpoint lifecycle is :class:`MetricsEndpoint`: bind it before anything
else starts (a taken port is a one-line :class:`MetricsPortError`), and at the
end :meth:`MetricsEndpoint.close` with a linger, so that Prometheus scrapes the
final status (and a NaN gauge) before the target disappears. The alert rules
in ``deploy/prometheus/alerts.yml`` use both to tell a finished run from a
dead one.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from td3drive.contracts import metric_names as M
from td3drive.contracts.config import ConfigError

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
    "td3drive_learner_non_finite_loss": "1 after the run stopped on a NaN/inf loss, else 0.",
    "td3drive_run_status": "1 for the run's current status (label status: running, "
    "completed, stopped, failed), 0 for the others.",
    "td3drive_run_start_time_seconds": "Unix time the driver started (or resumed) this run; "
    "the newest value per instance is its current run.",
}

RUN_STATUSES: tuple[str, ...] = ("running", "completed", "stopped", "failed")
"""Values of ``td3drive_run_status``'s ``status`` label. ``completed`` and
``stopped`` are finished runs (their endpoint going away is expected);
``running`` then nothing, or ``failed``, is a dead run."""

RUN_ID_LABEL = "run_id"
"""The label every exported series carries (:attr:`RunMetrics.run_id`)."""


@dataclass
class RunMetrics:
    """The current values the endpoint exports; the driver updates them.

    ``counters`` and ``gauges`` map a metric name (from :data:`COUNTERS` /
    :data:`GAUGES`) to ``{labels tuple: value}``; label names are in
    :data:`LABELS`. Every exported series also gets ``run_id=<run_id>`` (a
    constant label, not part of the tuples).

    A new instance starts as status ``running``, with
    ``td3drive_learner_non_finite_loss`` at 0 and
    ``td3drive_run_start_time_seconds`` at the current Unix time.

    Args:
        run_id: the ``run_id`` label value; stable across ``--resume`` when
            it is the run directory's name, so a resumed run continues its
            series.

    Raises:
        TypeError: ``run_id`` is not a string.
    """

    run_id: str = ""
    counters: dict[str, dict[tuple[str, ...], float]] = field(default_factory=dict)
    gauges: dict[str, dict[tuple[str, ...], float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _status: str = field(default="running", init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str):
            raise TypeError(f"run_id must be a string, got {type(self.run_id).__name__}")
        self.set_status("running")
        self.set_gauge("td3drive_learner_non_finite_loss", 0.0)
        self.set_gauge("td3drive_run_start_time_seconds", time.time())

    @property
    def status(self) -> str:
        """The current ``td3drive_run_status`` (one of :data:`RUN_STATUSES`)."""
        return self._status

    def set_status(self, status: str) -> None:
        """Make ``status`` the current one: its series 1, the others 0.

        Raises:
            ValueError: ``status`` is not one of :data:`RUN_STATUSES`.
        """
        if status not in RUN_STATUSES:
            raise ValueError(f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        with self.lock:
            series = self.gauges.setdefault("td3drive_run_status", {})
            for name in RUN_STATUSES:
                series[(name,)] = 1.0 if name == status else 0.0
            self._status = status

    def set_counter(self, name: str, value: float, *labels: str) -> None:
        with self.lock:
            self.counters.setdefault(name, {})[labels] = float(value)

    def set_gauge(self, name: str, value: float, *labels: str) -> None:
        with self.lock:
            self.gauges.setdefault(name, {})[labels] = float(value)

    def update_learner(self, metrics: dict[str, float]) -> None:
        """Map one learner metrics dict (:mod:`td3drive.contracts.metric_names`) onto gauges."""
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
    "td3drive_run_status": ("status",),
}


class _Collector(Collector):
    def __init__(self, metrics: RunMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        with self.metrics.lock:
            counters = {k: dict(v) for k, v in self.metrics.counters.items()}
            gauges = {k: dict(v) for k, v in self.metrics.gauges.items()}
        run_id = self.metrics.run_id
        for name, help_text in COUNTERS.items():
            family = CounterMetricFamily(name, help_text, labels=_label_names(name))
            for labels, value in counters.get(name, {}).items():
                family.add_metric([*labels, run_id], value)
            yield family
        for name, help_text in GAUGES.items():
            gauge = GaugeMetricFamily(name, help_text, labels=_label_names(name))
            for labels, value in gauges.get(name, {}).items():
                gauge.add_metric([*labels, run_id], value)
            yield gauge


def _label_names(name: str) -> list[str]:
    return [*LABELS.get(name, ()), RUN_ID_LABEL]


class MetricsPortError(ConfigError):
    """The metrics endpoint cannot listen on ``run.metrics_port`` (taken, or
    not allowed). A configuration problem, raised before anything starts.

    Attributes:
        port: the port asked for.
        address: the address asked for.
        reason: the system's reason (``"Address already in use"``).
        in_use: True when another process holds the port.
    """

    def __init__(self, port: int, address: str, reason: str, in_use: bool) -> None:
        where = "" if address in ("0.0.0.0", "") else f" on {address}"
        problem = "is taken" if in_use else f"cannot be bound{where}"
        super().__init__(
            f"run.metrics_port {port} {problem} ({reason}); choose another with "
            "--set run.metrics_port=N or null to disable"
        )
        self.port = port
        self.address = address
        self.reason = reason
        self.in_use = in_use

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (Ray, multiprocessing)
        return (type(self), (self.port, self.address, self.reason, self.in_use))


class MetricsEndpoint:
    """The run's scrape endpoint ``http://address:port/metrics``, served from a
    daemon thread. Make one with :meth:`bind`; end it with :meth:`close`.

    The collector reads :class:`RunMetrics` at each scrape, so values set after
    :meth:`bind` (a final status, the NaN gauge) are what Prometheus sees
    while the endpoint lingers.
    """

    def __init__(self, server: Any, thread: threading.Thread, metrics: RunMetrics) -> None:
        self._server = server
        self._thread = thread
        self.metrics = metrics
        self._stop_lingering = threading.Event()
        self._lingering = threading.Event()
        self._closed = threading.Event()
        self._close_lock = threading.Lock()

    @classmethod
    def bind(cls, metrics: RunMetrics, port: int, address: str = "0.0.0.0") -> MetricsEndpoint:
        """Listen on ``address:port`` and serve ``metrics`` at ``/metrics``.

        Args:
            metrics: what to export.
            port: TCP port, 0 for any free one (read :attr:`port` after).
            address: interface to bind (``"0.0.0.0"``: all IPv4 interfaces).

        Raises:
            MetricsPortError: the port is taken (``EADDRINUSE``), not allowed
                (``EACCES``, a port < 1024 without privileges) or the address
                is not local; one line naming ``run.metrics_port``.
        """
        registry = CollectorRegistry()
        registry.register(_Collector(metrics))
        try:
            server, thread = start_http_server(port, addr=address, registry=registry)
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise MetricsPortError(port, address, reason, exc.errno == errno.EADDRINUSE) from exc
        return cls(server, thread, metrics)

    @property
    def port(self) -> int:
        """The port it listens on (the chosen one when bound with port 0)."""
        return int(self._server.server_port)

    @property
    def address(self) -> str:
        """The address it listens on."""
        return str(self._server.server_address[0])

    @property
    def lingering(self) -> bool:
        """True while :meth:`close` waits out its linger (still serving)."""
        return self._lingering.is_set()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has stopped the server and released the port."""
        return self._closed.is_set()

    def close(self, linger_s: float = 0.0) -> None:
        """Keep serving for ``linger_s`` seconds, then stop and release the port.

        Blocks the caller for the linger (the driver's process must stay alive
        for Prometheus to scrape the final values); :meth:`stop_lingering`
        from another thread, or an exception in this one (KeyboardInterrupt),
        ends the wait early, and the server is stopped either way. Calling it
        again, or concurrently, returns once the endpoint is closed.

        Args:
            linger_s: seconds to keep serving; 0 closes at once. Two scrape
                intervals are enough for Prometheus to record the final status
                (``run.metrics_linger_s``).

        Raises:
            ValueError: ``linger_s`` is negative or not finite.
        """
        if not (linger_s >= 0.0 and linger_s != float("inf")):
            raise ValueError(f"linger_s must be a finite number >= 0, got {linger_s!r}")
        if not self._close_lock.acquire(blocking=False):
            self._closed.wait()
            return
        try:
            if self._closed.is_set():
                return
            if linger_s > 0:
                self._lingering.set()
                self._stop_lingering.wait(linger_s)
        finally:
            self._lingering.clear()
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=30)
            self._closed.set()
            self._close_lock.release()

    def stop_lingering(self) -> None:
        """End a :meth:`close` linger now (e.g. a second Ctrl-C); thread-safe."""
        self._stop_lingering.set()

    def __enter__(self) -> MetricsEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(0.0)

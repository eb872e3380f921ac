"""The connection to one CARLA server, and the typed errors it raises.

* :class:`CarlaConnectionError`, :class:`CarlaTimeoutError`, :class:`CarlaSpawnError`:
  the errors of the adapter (picklable across Ray's process boundary);
* :class:`CarlaConnection`: connects with back-off, loads the town, switches the
  server and the Traffic Manager to synchronous mode, ticks, restores the server.

Nothing here ever lets the ``RuntimeError`` that the ``carla`` client raises
on every time-out escape untranslated: ``world.tick`` time-outs become
:class:`CarlaTimeoutError`, failed requests :class:`CarlaConnectionError`; both
name ``host:port``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import carla

from td3drive.contracts.config import CarlaConfig

logger = logging.getLogger(__name__)

LOAD_WORLD_TIMEOUT_S = 120.0
"""Client time-out while the server loads a town (loading takes tens of seconds)."""


# ------------------------------------------------------------------ errors
class CarlaConnectionError(ConnectionError):
    """The CARLA server cannot be reached or refused a request.

    The message names ``host:port`` and the call that failed.

    Attributes:
        address: ``"host:port"``.
        retryable: ``False`` for failures that a retry cannot fix (an unknown town).
    """

    def __init__(self, address: str, message: str, *, retryable: bool = True) -> None:
        super().__init__(f"CARLA server {address}: {message}")
        self.address = address
        self.message = message
        self.retryable = retryable

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Ray's process boundary
        return (_rebuild_connection_error, (self.address, self.message, self.retryable))


class CarlaTimeoutError(TimeoutError):
    """``world.tick`` or a sensor did not answer in time.

    Attributes:
        address: ``"host:port"`` (empty when raised by a buffer without a server).
    """

    def __init__(self, address: str, message: str) -> None:
        super().__init__(f"CARLA server {address}: {message}" if address else message)
        self.address = address
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Ray's process boundary
        return (type(self), (self.address, self.message))


def _rebuild_connection_error(address: str, message: str, retryable: bool) -> CarlaConnectionError:
    return CarlaConnectionError(address, message, retryable=retryable)


class CarlaSpawnError(RuntimeError):
    """No free spawn point with a long enough route was found."""


# ------------------------------------------------------------------ the connection
class CarlaConnection:
    """One client's connection to one CARLA server (``host:port`` of ``config``).

    Nothing connects at construction. :meth:`connect` creates the client, loads
    ``config.town`` if another map is loaded, and :meth:`configure_world`
    switches the world to synchronous mode with ``fixed_delta_seconds`` and the
    Traffic Manager (on ``tm_port``) to synchronous mode; :meth:`restore`
    undoes both. ``broken`` is set by every failed tick or request (and by the
    environment after a sensor time-out); the environment then checks
    :meth:`alive` before it reuses the connection.

    Args:
        config: server settings (host, ports, time-outs, town, seed).

    Attributes:
        address: ``"host:port"``.
        client, world, map, traffic_manager: the ``carla`` objects, ``None``
            while not connected.
        server_version: the server's version string, once connected.
        broken: a tick or request failed since the last (re)configuration.
    """

    def __init__(self, config: CarlaConfig) -> None:
        self.config = config
        self.address = f"{config.host}:{config.port}"
        self.client: Any = None
        self.world: Any = None
        self.map: Any = None
        self.traffic_manager: Any = None
        self.original_settings: Any = None
        self.broken = False
        self.server_version: str | None = None

    def alive(self) -> bool:
        """Whether the server still answers ``get_server_version`` (needs a client)."""
        try:
            self.client.get_server_version()
        except RuntimeError:
            return False
        return True

    def drop(self) -> None:
        """Forget the client, world, map and Traffic Manager (no request is made)."""
        self.client = self.world = self.map = self.traffic_manager = None

    def connect(self) -> None:
        """Connect with exponential back-off.

        Raises:
            CarlaConnectionError: after ``1 + reconnect_attempts`` failed tries
                (at once for an unknown town).
        """
        cfg = self.config
        attempts = 1 + cfg.reconnect_attempts
        delay = cfg.reconnect_backoff_s
        last: CarlaConnectionError | None = None
        for attempt in range(1, attempts + 1):
            try:
                self._connect_once()
            except CarlaConnectionError as exc:
                last = exc
                if not exc.retryable:
                    raise
                logger.warning("connect attempt %d/%d failed: %s", attempt, attempts, exc)
            else:
                self.broken = False
                return
            if attempt < attempts:
                time.sleep(delay)
                delay *= 2
        assert last is not None
        raise CarlaConnectionError(
            self.address, f"gave up after {attempts} attempt(s); last error: {last}"
        ) from last

    def _connect_once(self) -> None:
        cfg = self.config
        what = "creating the client"
        try:
            client = carla.Client(cfg.host, cfg.port)
            client.set_timeout(cfg.timeout_s)
            what = "get_server_version"
            self.server_version = client.get_server_version()
            client_version = client.get_client_version()
            if self.server_version != client_version:
                logger.warning(
                    "CARLA server %s runs %s, client is %s",
                    self.address,
                    self.server_version,
                    client_version,
                )
            what = "get_world"
            world = client.get_world()
            what = f"loading {cfg.town}"
            world = self._load_town(client, world)
            self.client, self.world = client, world
            what = "configuring synchronous mode and the Traffic Manager"
            self.configure_world()
        except CarlaConnectionError:
            self.client = self.world = None
            raise
        except (RuntimeError, CarlaTimeoutError) as exc:
            if self.world is not None and self.original_settings is not None:
                # Best effort: do not leave a half-configured server synchronous.
                with contextlib.suppress(RuntimeError):
                    self.world.apply_settings(self.original_settings)
            self.client = self.world = None
            raise CarlaConnectionError(self.address, f"{what} failed: {exc}") from exc

    def _load_town(self, client: Any, world: Any) -> Any:
        town = self.config.town.rsplit("/", 1)[-1]
        if _map_basename(world.get_map().name) == town:
            return world
        available = list(client.get_available_maps())
        if not any(_map_basename(m) == town for m in available):
            names = ", ".join(sorted({_map_basename(m) for m in available}))
            raise CarlaConnectionError(
                self.address,
                f"town {town!r} is not on the server (available: {names})",
                retryable=False,
            )
        client.set_timeout(max(self.config.timeout_s, LOAD_WORLD_TIMEOUT_S))
        try:
            world = client.load_world(town)
        finally:
            client.set_timeout(self.config.timeout_s)
        loaded = _map_basename(world.get_map().name)
        if loaded != town:
            raise CarlaConnectionError(self.address, f"asked for {town}, server loaded {loaded}")
        return world

    def configure_world(self) -> None:
        """Synchronous mode with the fixed step, the Traffic Manager in sync mode, one tick.

        Raises:
            RuntimeError: the server refused a request (the carla client's error).
            CarlaTimeoutError: the tick did not come back in time.
        """
        cfg = self.config
        world = self.world
        if self.original_settings is None:  # keep the first: later ones are ours
            self.original_settings = world.get_settings()
            if self.original_settings.synchronous_mode:
                logger.warning(
                    "CARLA server %s was already synchronous (another client, or one that "
                    "died without restoring it); close() will leave it so",
                    self.address,
                )
        settings = world.get_settings()
        settings.synchronous_mode = True
        settings.fixed_delta_seconds = cfg.fixed_delta_seconds
        world.apply_settings(settings)
        self.traffic_manager = self.client.get_trafficmanager(cfg.tm_port)
        self.traffic_manager.set_synchronous_mode(True)
        self.traffic_manager.set_random_device_seed(cfg.seed)
        self.map = world.get_map()
        self.tick()

    def restore(self) -> None:
        """Give the server back its original world settings and the Traffic Manager
        its asynchronous mode. Never raises: failures are logged."""
        if self.client is None:
            return
        if self.traffic_manager is not None:
            try:
                self.traffic_manager.set_synchronous_mode(False)
            except Exception as exc:
                logger.warning("%s: restoring Traffic Manager async mode: %s", self.address, exc)
        if self.world is not None and self.original_settings is not None:
            try:
                self.world.apply_settings(self.original_settings)
            except Exception as exc:
                logger.warning("%s: restoring the original world settings: %s", self.address, exc)
            else:
                self.original_settings = None

    def tick(self) -> int:
        """Advance the world by one fixed step; returns the new frame number.

        Raises:
            CarlaTimeoutError: ``world.tick()`` did not return within ``timeout_s``
                (the connection is marked broken).
        """
        try:
            return int(self.world.tick(self.config.timeout_s))
        except RuntimeError as exc:
            self.broken = True
            raise CarlaTimeoutError(
                self.address,
                f"world.tick() did not return within {self.config.timeout_s} s: {exc}",
            ) from exc

    def translate(self, exc: RuntimeError, what: str) -> Exception:
        """The typed error for a ``carla`` client ``RuntimeError`` raised by ``what``.

        Marks the connection broken. Returns :class:`CarlaTimeoutError` for a
        time-out, else :class:`CarlaConnectionError`.
        """
        self.broken = True
        if "time-out" in str(exc) or "timeout" in str(exc).lower():
            return CarlaTimeoutError(self.address, f"{what}: {exc}")
        return CarlaConnectionError(self.address, f"{what} failed: {exc}")


def _map_basename(name: str) -> str:
    """``"Carla/Maps/Town03"`` → ``"Town03"``."""
    return str(name).rstrip("/").rsplit("/", 1)[-1]

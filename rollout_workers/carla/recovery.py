"""Recovering after a failure: reuse a server that still answers, forget a dead one.

* :func:`ensure_connected`: before an episode, connect, or recover a broken connection;
* :func:`forget_if_server_gone`: after an error, drop the actors of a server that died.

A dead server's actors died with it: they are forgotten rather than destroyed,
so nobody waits ``timeout_s`` per actor for an answer that never comes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from rollout_workers.carla.connection import CarlaConnection, CarlaTimeoutError
from rollout_workers.carla.registry import ActorRegistry

logger = logging.getLogger(__name__)


def ensure_connected(
    connection: CarlaConnection, registry: ActorRegistry, cleanup_actors: Callable[[], None]
) -> None:
    """Leave ``connection`` connected and configured.

    A broken connection to a server that still answers (a slow tick) is kept:
    ``cleanup_actors`` runs and the synchronous settings are reapplied. If the
    server does not answer, or that fails, the registry's actors are forgotten,
    ``cleanup_actors`` runs and the connection is dropped; then (as without a
    connection) :meth:`CarlaConnection.connect`.

    Raises:
        CarlaConnectionError: from :meth:`CarlaConnection.connect`.
    """
    if connection.client is not None and connection.broken:
        alive = connection.alive()
        if alive:  # a slow tick: clean up normally and reapply our settings
            try:
                cleanup_actors()
                connection.configure_world()
                connection.broken = False
            except (RuntimeError, CarlaTimeoutError) as exc:
                logger.warning("%s: recovering the connection failed: %s", connection.address, exc)
                alive = False
        if not alive:
            lost = registry.forget()
            logger.warning(
                "CARLA server %s stopped answering; forgetting %d actors, reconnecting",
                connection.address,
                lost,
            )
            cleanup_actors()
            connection.drop()
    if connection.client is None:
        connection.connect()


def forget_if_server_gone(connection: CarlaConnection, registry: ActorRegistry) -> None:
    """After a failure (``connection.broken``), if the server no longer answers:
    forget the registry's actors and the client (the next reset reconnects)."""
    if connection.broken and connection.client is not None and not connection.alive():
        lost = registry.forget()
        logger.warning("%s: server gone; forgot %d actors", connection.address, lost)
        connection.client = None

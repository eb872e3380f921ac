"""Actor bookkeeping: every actor an environment spawned, so that all get destroyed.

* :class:`ActorRegistry`: records sensors, the ego vehicle and NPCs; destroys them in order;
* :func:`_describe`: an actor's type and id, for log lines.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

logger = logging.getLogger(__name__)

ActorKind = Literal["sensor", "vehicle", "npc"]


class ActorRegistry:
    """Every actor an environment spawned, so that all of them get destroyed.

    :meth:`destroy_all` stops every sensor first (no callback runs into a
    destroyed actor), then destroys the sensors, then the ego vehicle and the
    NPCs, each group in reverse spawn order. A failing ``stop()`` or
    ``destroy()`` (or ``destroy()`` returning ``False``) is logged and the
    rest continue; the registry is empty afterwards.
    """

    def __init__(self) -> None:
        self._actors: list[tuple[ActorKind, Any]] = []

    def add(self, actor: Any, kind: ActorKind) -> Any:
        """Record ``actor`` (returned unchanged); ``kind`` is sensor, vehicle or npc.

        Raises:
            ValueError: another ``kind``.
        """
        if kind not in ("sensor", "vehicle", "npc"):
            raise ValueError(f"unknown actor kind {kind!r}")
        self._actors.append((kind, actor))
        return actor

    def __len__(self) -> int:
        return len(self._actors)

    def actors(self, kind: ActorKind | None = None) -> list[Any]:
        """The recorded actors (of ``kind``), in spawn order."""
        return [a for k, a in self._actors if kind is None or k == kind]

    def destroy_all(self) -> list[str]:
        """Stop and destroy every recorded actor.

        Returns:
            One line per failure (also logged as warnings); empty when all went well.
        """
        failures: list[str] = []
        sensors = [a for k, a in reversed(self._actors) if k == "sensor"]
        others = [a for k, a in reversed(self._actors) if k != "sensor"]
        self._actors = []
        for sensor in sensors:
            try:
                sensor.stop()
            except Exception as exc:
                failures.append(f"stop {_describe(sensor)}: {exc}")
        for actor in [*sensors, *others]:
            try:
                destroyed = actor.destroy()
            except Exception as exc:
                failures.append(f"destroy {_describe(actor)}: {exc}")
                continue
            if destroyed is False:
                failures.append(f"destroy {_describe(actor)}: server reported failure")
        for line in failures:
            logger.warning("actor cleanup: %s", line)
        return failures

    def forget(self) -> int:
        """Drop every record without calling the server (the server died); returns the count."""
        count = len(self._actors)
        self._actors = []
        return count


def _describe(actor: Any) -> str:
    return f"{getattr(actor, 'type_id', type(actor).__name__)} id={getattr(actor, 'id', '?')}"

"""Is a CARLA server there, and does its clock advance? (``td3drive carla-check``)

A read-only probe for operators and start-up scripts: it connects, asks for
the server version and the loaded map, and waits for one world tick. It never
changes the server: no settings are applied, and in particular the server is
never switched to synchronous mode (that would freeze it for every other
client until someone ticks it).

The tick round trip is ``world.wait_for_tick(timeout)``: the time until the
next snapshot arrives. On an asynchronous server that is about one frame. On a
synchronous server it succeeds only while another client (a training run) is
ticking it; if nobody is, it times out and the report says the server is
synchronous with no client ticking, which usually means a client died without
restoring asynchronous mode. Calling ``world.tick()`` instead would advance
another client's simulation, so this probe never does.

Usage::

    python -m rollout_workers.carla.check --host 127.0.0.1 --port 2000 --timeout 5 [--json]

Exit status 0 when the server is reachable and ticks, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import carla

REPORT_FIELDS = (
    "host",
    "port",
    "reachable",
    "server_version",
    "client_version",
    "map",
    "tick_ok",
    "tick_ms",
    "error",
)
"""Keys of :func:`check_server`'s report, in the order :func:`format_report` prints them."""


def _client_version() -> str | None:
    """The version of the installed ``carla`` client library (no connection is made)."""
    try:
        return str(carla.Client("127.0.0.1", 1).get_client_version())
    except Exception:  # informative only
        return None


def check_server(host: str, port: int, timeout_s: float = 5.0) -> dict[str, Any]:
    """Probe a CARLA server without changing it.

    Args:
        host: server host name or address.
        port: RPC port (the one given as ``-carla-rpc-port``).
        timeout_s: client time-out for each request and for the tick, s.

    Returns:
        ``{"host", "port", "reachable": bool, "server_version": str | None,
        "client_version": str | None, "map": str | None, "tick_ok": bool,
        "tick_ms": float | None, "error": str | None}``. ``reachable`` means the
        server answered ``get_server_version``; ``tick_ok`` that a world tick
        arrived within ``timeout_s`` (``tick_ms``: how long it took, ms);
        ``error`` names ``host:port`` and the request that failed.

    Never raises for an unreachable or misbehaving server: the failure goes
    into ``error``.
    """
    address = f"{host}:{port}"
    report: dict[str, Any] = dict.fromkeys(REPORT_FIELDS)
    report.update(host=host, port=port, reachable=False, tick_ok=False)
    report["client_version"] = _client_version()
    what = "creating the client"
    synchronous: bool | None = None
    try:
        client = carla.Client(host, int(port))
        client.set_timeout(float(timeout_s))
        what = "get_server_version"
        report["server_version"] = str(client.get_server_version())
        report["reachable"] = True
        what = "get_world"
        world = client.get_world()
        what = "get_settings"
        synchronous = bool(world.get_settings().synchronous_mode)
        what = "get_map"
        report["map"] = str(world.get_map().name)
        what = "wait_for_tick"
        start = time.perf_counter()
        world.wait_for_tick(float(timeout_s))
        report["tick_ms"] = (time.perf_counter() - start) * 1000.0
        report["tick_ok"] = True
    except Exception as exc:  # RuntimeError on time-outs; anything else is reported too
        message = f"{address}: {what} failed: {exc}"
        if what == "wait_for_tick" and synchronous:
            message += (
                " (the server is in synchronous mode and no client ticked it; "
                "a client may have died without restoring asynchronous mode)"
            )
        report["error"] = message
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as human-readable text, one ``field: value`` line per field."""
    lines = []
    for key in REPORT_FIELDS:
        value = report.get(key)
        if key == "tick_ms" and isinstance(value, float):
            text = f"{value:.1f}"
        elif value is None:
            text = "-"
        else:
            text = str(value)
        if (
            key == "server_version"
            and value
            and report.get("client_version")
            and value != report["client_version"]
        ):
            text += " (differs from the client)"
        lines.append(f"{key:<15} {text}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: probe one server, print the report.

    Returns:
        0 when the server is reachable and a tick arrived, 1 otherwise.
    """
    parser = argparse.ArgumentParser(
        prog="td3drive carla-check",
        description="Check that a CARLA server answers and ticks (read-only).",
    )
    parser.add_argument("--host", default="localhost", help="server host (default localhost)")
    parser.add_argument("--port", type=int, default=2000, help="RPC port (default 2000)")
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds per request and for the tick"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = check_server(args.host, args.port, args.timeout)
    print(json.dumps(report) if args.json else format_report(report))
    return 0 if report["reachable"] and report["tick_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

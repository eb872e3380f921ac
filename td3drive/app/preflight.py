"""Checks ``td3drive train`` runs before anything starts (no Ray, no actor, no file).

Each check raises :class:`PreflightError` with a one-line message that names
the path or setting and what to do; the CLI prints it as ``td3drive: error:
<message>`` and exits 2. A check that fails writes nothing. The only check that
changes anything is :func:`check_run_dir` with ``overwrite=True``, and only
after every other check on the directory passed.

* :func:`check_run_dir`: a fresh run never reuses a run directory (that mixed
  two runs: old replay snapshots and counters next to a fresh learner,
  appended ``metrics.jsonl``); ``--resume`` is the way to continue one and
  ``--overwrite`` the way to start over. The directory (or the parent it will
  be created in) must be writable, tried by creating and removing a probe file
  (``os.access`` says yes to root even on a read-only filesystem). The run
  location may be a URI (``s3://``, ``gs://``, ``file://``,
  :class:`td3drive.contracts.storage.RunStorage`): the same checks then run on the
  storage (listing, a probe object written and removed); an unknown scheme or
  unreachable storage fails here, before Ray starts.
* :func:`check_resume_checkpoint`: ``checkpoints/learner.pt`` of a run to
  resume loads (empty, truncated and foreign files are refused with a reason).
* :func:`check_metrics_port`: ``run.metrics_port`` can be bound.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from td3drive.contracts.storage import RunStorage, StorageError

if TYPE_CHECKING:
    from td3drive.contracts.config import TD3DriveConfig

CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"
LEARNER_CHECKPOINT = "checkpoints/learner.pt"

# What a run writes into its directory (td3drive.app.driver, td3drive report), and
# so what --overwrite removes; anything else in the directory is left alone.
RUN_ENTRIES: tuple[str, ...] = (
    CONFIG_FILE,
    CHECKPOINTS,
    "metrics.jsonl",
    "summary.json",
    "eval.jsonl",
    "eval.json",
    "report",
    "videos",
)

# Files under checkpoints/ that only a td3drive run writes.
_CHECKPOINT_MARKERS = ("learner.pt", "driver.json", "replay")


class PreflightError(ValueError):
    """A run that cannot start as asked; the message is one line and says what
    to do instead."""


def check_run_dir(run_dir: str | Path | RunStorage, resume: bool, overwrite: bool) -> None:
    """Check that ``run_dir`` can take this run; with ``overwrite``, empty it.

    A fresh run (``resume=False``) needs a directory that does not exist yet,
    is empty, or (with ``overwrite``) holds a td3drive run, whose files
    (:data:`RUN_ENTRIES`) are then removed; other files there are kept. A
    directory that is not empty and does not look like a td3drive run (no
    ``config.yaml`` of td3drive sections, no ``checkpoints/`` with a learner,
    driver state or replay snapshots) is refused even with ``overwrite``.
    ``resume=True`` needs a td3drive run directory. Either way the directory,
    or for a new one the nearest existing parent, must be writable.

    Args:
        run_dir: the run location: a local path (relative paths are relative
            to the cwd), a URI or a storage.
        resume: continue the run in ``run_dir`` (``--resume``).
        overwrite: start over in a directory that holds a run (``--overwrite``).

    Raises:
        PreflightError: one line: ``resume`` with ``overwrite``; a path that is
            a file; a run there without ``--resume``/``--overwrite``; a
            non-empty directory that is not a run; ``--resume`` of something
            that is not a run; a directory that cannot be written; a removal
            that failed (``--overwrite``); storage that cannot be opened or
            reached (an unknown URI scheme, missing credentials, no network).
    """
    if resume and overwrite:
        raise PreflightError(
            "--resume continues a run and --overwrite starts it over: give only one"
        )
    storage = _open(run_dir)
    if storage.local_path is None:
        try:
            _check_remote_run_dir(storage, resume, overwrite)
        except StorageError as exc:
            raise PreflightError(
                f"cannot use the run location {storage.display} ({exc.strerror or exc}); "
                "check the URI, the credentials and the network"
            ) from exc
        return
    _check_local_run_dir(storage.local_path, storage.display, resume, overwrite)


def _open(run_dir: str | Path | RunStorage) -> RunStorage:
    """The run location's storage (a relative local path made absolute).

    Raises:
        PreflightError: an unknown scheme, an unparsable URI, storage that
            cannot be set up.
    """
    if isinstance(run_dir, RunStorage):
        return run_dir
    try:
        return RunStorage(run_dir)
    except StorageError as exc:
        raise PreflightError(str(exc)) from exc


def _check_local_run_dir(run_dir: Path, shown: str, resume: bool, overwrite: bool) -> None:
    """:func:`check_run_dir` on a local filesystem; ``shown`` names ``run_dir``
    in messages (its absolute path, or the ``file://`` URI the user gave)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise PreflightError(
            f"{shown} is a file, not a run directory; choose another "
            f"{'path to --resume' if resume else '--run-dir'}"
        )
    if resume:
        _check_resumable(run_dir, shown)
        _check_writable(run_dir)
        if (run_dir / CHECKPOINTS).is_dir():
            _check_writable(run_dir / CHECKPOINTS)
        return
    if not run_dir.exists():
        _check_creatable(run_dir, shown)
        return
    entries = sorted(p.name for p in run_dir.iterdir())
    if not entries:
        _check_writable(run_dir)
        return
    markers = _run_markers(run_dir)
    if not markers:
        raise PreflightError(
            f"{shown} is not empty ({_listing(entries)}) and holds no td3drive run; "
            "choose a new or empty --run-dir"
        )
    if not overwrite:
        raise PreflightError(
            f"{shown} already holds a run ({', '.join(markers)}); continue it with "
            f"`td3drive train --resume {shown}`, or start over with --overwrite"
        )
    _check_writable(run_dir)
    _remove_run(run_dir)


def _check_remote_run_dir(storage: RunStorage, resume: bool, overwrite: bool) -> None:
    """:func:`check_run_dir` on an object store or another remote filesystem.

    Raises:
        PreflightError: as :func:`check_run_dir`.
        StorageError: the storage cannot be reached or refuses a query.
    """
    shown = storage.display
    if storage.is_file(""):
        raise PreflightError(
            f"{shown} is a file, not a run directory; choose another "
            f"{'path to --resume' if resume else '--run-dir'}"
        )
    if resume:
        if not storage.exists():
            raise PreflightError(f"cannot resume {shown}: nothing is stored there")
        if not storage.is_file(CONFIG_FILE):
            raise PreflightError(
                f"cannot resume {shown}: not a td3drive run directory (no {CONFIG_FILE}); "
                f"start a run there with `td3drive train --config FILE --run-dir {shown}`"
            )
        _probe(storage)
        return
    entries = storage.list()
    if not entries:
        _probe(storage, creating=True)
        return
    markers = _storage_run_markers(storage)
    if not markers:
        raise PreflightError(
            f"{shown} is not empty ({_listing(entries)}) and holds no td3drive run; "
            "choose a new or empty --run-dir"
        )
    if not overwrite:
        raise PreflightError(
            f"{shown} already holds a run ({', '.join(markers)}); continue it with "
            f"`td3drive train --resume {shown}`, or start over with --overwrite"
        )
    _probe(storage)
    for name in RUN_ENTRIES:
        try:
            storage.delete(name)
        except StorageError as exc:
            raise PreflightError(
                f"--overwrite could not remove {storage.path(name)} ({exc.strerror or exc}); "
                "remove it yourself or choose another --run-dir"
            ) from exc


def _storage_run_markers(storage: RunStorage) -> list[str]:
    """:func:`_run_markers` on a storage."""
    markers = []
    if storage.is_file(CONFIG_FILE) and _is_td3drive_config(storage.read_text(CONFIG_FILE)):
        markers.append(CONFIG_FILE)
    if any(name in _CHECKPOINT_MARKERS for name in storage.list(CHECKPOINTS)):
        markers.append(f"{CHECKPOINTS}/")
    return markers


def _probe(storage: RunStorage, creating: bool = False) -> None:
    """Write and remove a probe object in ``storage``.

    Raises:
        PreflightError: the write or the removal was refused.
    """
    hint = "choose another --run-dir" if creating else "fix its permissions or credentials"
    probe = f".td3drive-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        storage.write_bytes(probe, b"")
    except StorageError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise PreflightError(f"{storage.display} is not writable ({reason}); {hint}") from exc
    try:
        storage.delete(probe)
    except StorageError as exc:
        raise PreflightError(
            f"{storage.display}: a file written there cannot be removed "
            f"({exc.strerror or exc}); {hint}"
        ) from exc


def check_resume_checkpoint(run_dir: str | Path | RunStorage, config: TD3DriveConfig) -> None:
    """Check that the learner checkpoint of a run to resume will load into
    ``config``'s learner; nothing is built, no device is touched.

    A run directory without ``checkpoints/learner.pt`` passes (the run stopped
    before its first checkpoint; the learner starts fresh). ``run_dir`` is a
    local path, a URI or a storage (a remote checkpoint is read into memory).

    Uses ``learner.td3.validate_checkpoint`` (format, entries, weights and
    architecture) where it exists, else ``learner.td3.load_checkpoint``.

    Raises:
        PreflightError: one line naming the file and the reason (``empty file
            (0 bytes)``, ``truncated or corrupt``, ``not a td3drive
            checkpoint``, another architecture), without torch's advice to
            load with ``weights_only=False`` (that would run the file's code).
    """
    from learner import td3

    storage = _open(run_dir)
    path: str | Path
    if storage.local_path is not None:
        path = storage.local_path / LEARNER_CHECKPOINT
        if not path.exists() and not path.is_symlink():
            return
        if storage.display != str(storage.local_path):  # a file:// URI: name it so
            path = storage.path(LEARNER_CHECKPOINT)
    else:
        try:
            if not storage.exists(LEARNER_CHECKPOINT):
                return
        except StorageError as exc:
            raise PreflightError(f"cannot resume {storage.display}: {exc}") from exc
        path = storage.path(LEARNER_CHECKPOINT)
    validate = getattr(td3, "validate_checkpoint", None)
    try:
        if validate is not None:
            validate(path, config=config.learner)
        else:
            td3.load_checkpoint(path)
    except td3.CheckpointError as exc:
        raise PreflightError(
            f"cannot resume {storage.display}: {_without_torch_advice(str(exc), str(path))}"
        ) from exc


def check_metrics_port(port: int | None, address: str = "0.0.0.0") -> None:
    """Check that ``run.metrics_port`` can be bound (bind, then release it at once).

    ``None`` (endpoint off) and 0 (any free port) always pass.

    Raises:
        td3drive.app.prometheus.MetricsPortError: a ConfigError (ValueError) with
            one line: the port is taken or not allowed.
    """
    if not port:
        return
    from td3drive.app.prometheus import MetricsEndpoint, RunMetrics

    MetricsEndpoint.bind(RunMetrics(), port, address).close(0.0)


# ------------------------------------------------------------------ helpers
def _check_resumable(run_dir: Path, shown: str) -> None:
    if not run_dir.exists():
        raise PreflightError(f"cannot resume {shown}: no such directory")
    if not (run_dir / CONFIG_FILE).is_file():
        raise PreflightError(
            f"cannot resume {shown}: not a td3drive run directory (no {CONFIG_FILE}); "
            f"start a run there with `td3drive train --config FILE --run-dir {shown}`"
        )


def _run_markers(run_dir: Path) -> list[str]:
    """What makes ``run_dir`` a td3drive run: a ``config.yaml`` whose top level
    is td3drive's sections, and/or ``checkpoints/`` with a learner checkpoint,
    driver state or replay snapshots (what the driver writes first)."""

    markers = []
    config = run_dir / CONFIG_FILE
    if config.is_file() and not config.is_symlink():
        try:
            text = config.read_text()
        except (OSError, UnicodeDecodeError):
            text = ""
        if _is_td3drive_config(text):
            markers.append(CONFIG_FILE)
    checkpoints = run_dir / CHECKPOINTS
    if (
        checkpoints.is_dir()
        and not checkpoints.is_symlink()
        and any((checkpoints / name).exists() for name in _CHECKPOINT_MARKERS)
    ):
        markers.append(f"{CHECKPOINTS}/")
    return markers


def _is_td3drive_config(text: str) -> bool:
    """Whether ``text`` is YAML whose top level is td3drive's config sections."""
    from td3drive.contracts.config import TD3DriveConfig

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(raw, dict) and bool(raw) and set(raw) <= set(TD3DriveConfig.model_fields)


def _remove_run(run_dir: Path) -> None:
    """Remove what a run wrote (:data:`RUN_ENTRIES`); symlinks are removed, never
    followed."""
    for name in RUN_ENTRIES:
        entry = run_dir / name
        try:
            if entry.is_symlink() or entry.is_file():
                entry.unlink()
            elif entry.is_dir():
                shutil.rmtree(entry)
        except OSError as exc:
            raise PreflightError(
                f"--overwrite could not remove {entry} ({exc.strerror or exc}); "
                "remove it yourself or choose another --run-dir"
            ) from exc


def _check_creatable(run_dir: Path, shown: str) -> None:
    """The nearest existing ancestor of a new run directory is a writable directory."""
    parent = run_dir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PreflightError(f"cannot create {shown}: {parent} is a file, not a directory")
    _check_writable(parent, creating=shown)


def _check_writable(directory: Path, creating: str | None = None) -> None:
    """Create and remove a probe file in ``directory`` (``os.access`` alone is
    not enough: it says yes to root on a read-only filesystem)."""
    what = f"cannot create {creating}: {directory}" if creating is not None else f"{directory}"
    hint = "choose another --run-dir" if creating is not None else "fix its permissions"
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PreflightError(f"{what} is not writable (permission denied); {hint}")
    probe = directory / f".td3drive-write-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise PreflightError(
            f"{what} is not writable ({(exc.strerror or str(exc)).lower()}); {hint}"
        ) from exc
    os.close(fd)
    try:
        probe.unlink()
    except OSError as exc:
        raise PreflightError(
            f"{what}: a file created there cannot be removed ({exc.strerror}); {hint}"
        ) from exc


def _listing(entries: list[str], limit: int = 3) -> str:
    shown = ", ".join(entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def _without_torch_advice(message: str, path: str) -> str:
    """The checkpoint error on one line, without torch's suggestion to load
    with ``weights_only=False`` (which would execute the file's pickled code)."""
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    advice = [i for i in (line.find("(1)"), line.find("weights_only")) if i >= 0]
    if advice:
        line = line[: min(advice)].rstrip(" .:;,(") + " (not a td3drive learner checkpoint)"
    return line if path in line else f"{path}: {line}"

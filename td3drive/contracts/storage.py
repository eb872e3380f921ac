"""Where a run's files live: a local or shared filesystem path, or a cloud URI.

Ray Train and Tune put a run under ``RunConfig(storage_path=...)``, a path on
storage every node mounts at the same place (NFS, a Kubernetes PVC) or a
``pyarrow.fs`` URI (``s3://bucket/prefix``, ``gs://bucket/prefix``,
``file:///abs/path``), and every worker writes its artefacts there. td3drive
follows that convention: ``run.storage_path`` names the storage, the run
location is ``<storage_path>/<run name>``, and the driver, the learner (its
checkpoint) and every replay shard (its snapshots) open the same location
through :class:`RunStorage`.

The run location travels to actors as a string: an absolute local path or a
URI, never a relative path (an actor's working directory is not the
driver's: ``ray job submit --working-dir`` runs the driver and every actor in
a copy of the directory in Ray's cache, which Ray deletes). The driver turns
what the user typed into such a string with :func:`resolve_location`.

Filesystems come from ``pyarrow.fs`` (:meth:`pyarrow.fs.FileSystem.from_uri`,
``LocalFileSystem``, ``SubTreeFileSystem``): their clients, credentials
(``AWS_*`` variables, instance roles, ``GOOGLE_APPLICATION_CREDENTIALS``) and
URI options (``s3://bucket/prefix?region=eu-west-1&endpoint_override=...``)
are pyarrow's.

Atomicity (what a reader sees after a crash mid-write):

* local filesystems (plain paths and ``file://``): the data goes to a temp file
  in the same directory, is fsynced and renamed over the target
  (:func:`td3drive.contracts.atomic_file.atomic_write`), streamed, never held in memory;
* object stores (``s3://``, ``gs://``): one upload per file, which the store
  makes visible only when it completes; the file is built in memory first
  (a replay snapshot therefore needs its size in RAM while it uploads);
* other pyarrow filesystems (HDFS, a custom one): the file is uploaded under a
  temp name and moved over the target.

Appending a line (``metrics.jsonl``, ``eval.jsonl``) appends on a local
filesystem. Object stores cannot append: :class:`RunStorage` keeps the file's
content in memory and re-uploads the whole file at most every
``append_flush_s`` seconds and on :meth:`RunStorage.flush` (the driver flushes
at every checkpoint and at the end). The cost grows with the file: a
``metrics.jsonl`` line is ~2 KB, so at the default 10 s report interval a
24-hour run's file reaches ~17 MB, uploaded at most every 30 s (~0.6 MB/s at
the end of such a run); lines appended since the last upload are lost if the
driver dies (a resume drops lines after the last checkpoint anyway).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import pyarrow.fs as pafs

from td3drive.contracts.atomic_file import atomic_write

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")

OBJECT_STORES = frozenset({"s3", "gcs"})
"""``pyarrow.fs`` type names of filesystems where one upload is atomic (a put
or a completed multipart/resumable upload) and a rename is a copy."""

RAY_CACHE_MARKERS = ("runtime_resources",)
"""Path components of Ray's runtime-env cache (``working_dir`` and
``py_modules`` copies live under ``<session>/runtime_resources/``), which Ray
deletes when it needs the space or the job ends."""


class StorageError(OSError):
    """A storage operation that failed; the message is one line,
    ``<location>: <reason>``.

    An ``OSError``, so code that handles I/O errors handles it too. Attributes
    ``filename`` (the location) and ``strerror`` (the reason) are set for
    callers that format ``OSError`` themselves.
    """

    def __init__(self, message: str, *, location: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.filename = location
        self.strerror = reason

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Ray's process boundary
        return (type(self), (str(self),))


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The file or directory does not exist."""


class StoragePermissionError(StorageError, PermissionError):
    """The storage refused the operation (file permissions, credentials)."""


def is_uri(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a URI (``scheme://...``) rather than a local path."""
    return bool(_SCHEME.match(os.fspath(location)))


def _split_query(location: str) -> tuple[str, str]:
    """``("s3://b/p", "?region=x")`` from ``"s3://b/p?region=x"`` (URIs only)."""
    if is_uri(location) and "?" in location:
        path, query = location.split("?", 1)
        return path, "?" + query
    return location, ""


def resolve_location(
    location: str | os.PathLike[str], base: str | os.PathLike[str] | None = None
) -> str:
    """What a run location string must be before it leaves the driver.

    Args:
        location: a local path (absolute, relative or ``~``) or a URI.
        base: the directory relative paths are relative to; ``None`` = this
            process's working directory.

    Returns:
        A URI unchanged except for trailing ``/`` of its path; a local path
        made absolute and normalised (symlinks are kept as they are).

    Raises:
        StorageError: an empty location.
    """
    text = os.fspath(location).strip()
    if not text:
        raise StorageError("the storage location is empty: give a path or a URI")
    if is_uri(text):
        path, query = _split_query(text)
        prefix = _SCHEME.match(path).group(0)  # type: ignore[union-attr]
        rest = path[len(prefix) :]
        while len(rest) > 1 and rest.endswith("/"):
            rest = rest[:-1]
        return prefix + rest + query
    path = os.path.expanduser(text)
    return os.path.abspath(os.path.join(os.fspath(base) if base is not None else os.getcwd(), path))


def join_location(location: str, *parts: str) -> str:
    """``location/part/...`` for a local path or a URI (a URI's query string
    stays at the end): ``join_location("s3://b/runs?region=x", "r1")`` is
    ``"s3://b/runs/r1?region=x"``."""
    path, query = _split_query(os.fspath(location))
    tail = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
    if not tail:
        return path + query
    return (path if path.endswith("/") else path + "/") + tail + query


def split_location(location: str | os.PathLike[str]) -> tuple[str, str]:
    """``(parent location, file name)`` of a file's location.

    Raises:
        StorageError: the location names no file (a bucket, ``/``).
    """
    resolved = resolve_location(location)
    path, query = _split_query(resolved)
    match = _SCHEME.match(path)
    prefix = match.group(0) if match else ""
    head, sep, name = path[len(prefix) :].rpartition("/")
    if not sep or not name:
        raise StorageError(f"{resolved}: not the location of a file", location=resolved)
    return prefix + (head or "/") + query, name


def require_absolute(location: str | os.PathLike[str], what: str) -> str:
    """``location`` as a string, checked to be an absolute path or a URI (for
    an actor, whose working directory is not the driver's).

    Raises:
        StorageError: a relative path.
    """
    text = os.fspath(location)
    if not is_uri(text) and not os.path.isabs(text):
        raise StorageError(
            f"{what} {text!r} is a relative path; an actor's working directory is not the "
            "driver's, so the driver must pass an absolute path or a URI"
        )
    return text


def ray_cache_warning(storage: RunStorage) -> str | None:
    """A warning when ``storage`` lies in Ray's runtime-env cache (what a
    relative ``./runs`` becomes under ``ray job submit --working-dir``),
    else ``None``."""
    local = storage.local_path
    if local is None or not any(part in RAY_CACHE_MARKERS for part in local.parts):
        return None
    return (
        f"the run location {storage.display} is inside Ray's runtime-env cache, which Ray "
        "deletes; set run.storage_path (or --run-dir) to shared storage or a URI "
        "(deploy/README.md, 'Where runs are stored')"
    )


def _reason(exc: BaseException) -> str:
    """An exception's reason on one line: the errno's text when there is one,
    else the first line of the message (pyarrow appends multi-line details)."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code > 0:
        return os.strerror(code)
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    first = first.split(". Detail:")[0]
    return first if len(first) <= 300 else first[:299] + "…"


def _storage_error(exc: BaseException, location: str, doing: str = "") -> StorageError:
    """``exc`` (pyarrow's or the OS's) as a one-line :class:`StorageError`."""
    if isinstance(exc, StorageError):
        return exc
    reason = _reason(exc)
    where = f"{location}: {doing + ': ' if doing else ''}"
    if isinstance(exc, FileNotFoundError):
        return StorageNotFoundError(where + reason, location=location, reason=reason)
    if isinstance(exc, PermissionError) or getattr(exc, "errno", None) in (
        errno.EACCES,
        errno.EPERM,
    ):
        return StoragePermissionError(where + reason, location=location, reason=reason)
    return StorageError(where + reason, location=location, reason=reason)


def _filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path in it)`` for an absolute path or a URI."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), location
    try:
        return pafs.FileSystem.from_uri(location)
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        reason = _reason(exc)
        if "Unrecognized filesystem type" in reason:
            scheme = _SCHEME.match(location).group(1)  # type: ignore[union-attr]
            reason = (
                f"unknown storage scheme {scheme}://; pyarrow.fs.FileSystem.from_uri knows "
                "file://, s3://, gs:// and hdfs://"
            )
        raise StorageError(
            f"{location}: cannot open the storage ({reason})", location=location, reason=reason
        ) from exc


class RunStorage:
    """A directory on a local/shared filesystem or an object store, with the
    operations a run needs. Paths given to the methods are ``/``-separated
    and relative to the directory (``"checkpoints/learner.pt"``; ``""`` is the
    directory itself); ``..`` is refused.

    Picklable: a copy rebuilds its filesystem from the location (an actor gets
    the location string, or the object, and opens the same place).

    Args:
        location: an absolute local path or a URI (``file://``, ``s3://``,
            ``gs://``, anything :meth:`pyarrow.fs.FileSystem.from_uri` takes).
            A relative path is resolved against *this process's* working
            directory: the driver resolves it (:func:`resolve_location`)
            before any actor sees it.
        filesystem: a pyarrow filesystem to use instead of the one the
            location names (custom credentials or endpoint, as Ray's
            ``RunConfig(storage_filesystem=...)``); ``location`` is then a path
            inside it.
        append_flush_s: on filesystems that cannot append, the longest time
            appended lines wait in memory before the file is re-uploaded, s.

    Raises:
        StorageError: an unknown scheme, a URI pyarrow cannot parse, a cloud
            filesystem that cannot be set up (one line, the location named).
    """

    def __init__(
        self,
        location: str | os.PathLike[str],
        *,
        filesystem: pafs.FileSystem | None = None,
        append_flush_s: float = 30.0,
    ) -> None:
        self._setup(location, filesystem, append_flush_s)

    def _setup(
        self,
        location: str | os.PathLike[str],
        filesystem: pafs.FileSystem | None,
        append_flush_s: float,
    ) -> None:
        self._filesystem = filesystem
        self.append_flush_s = append_flush_s
        if filesystem is not None:
            self.location = os.fspath(location).rstrip("/") or "/"
            self._base, self._root = filesystem, self.location
        else:
            self.location = resolve_location(location)
            self._base, self._root = _filesystem(self.location)
        self.is_local = isinstance(self._base, pafs.LocalFileSystem)
        self._fs = pafs.SubTreeFileSystem(self._root, self._base)
        self._lock = threading.Lock()
        # Object stores: relative path -> [content, uploaded?, last upload time].
        self._appends: dict[str, list[Any]] = {}

    # ------------------------------------------------------------ identity
    @property
    def display(self) -> str:
        """The location for messages: the absolute path or the URI."""
        if self._filesystem is not None:
            return f"{self._base.type_name}://{self.location.lstrip('/')}"
        return self.location

    @property
    def local_path(self) -> Path | None:
        """The directory's local path when the filesystem is local, else ``None``."""
        return Path(self._root) if self.is_local else None

    @property
    def name(self) -> str:
        """The last component of the location (the run's name)."""
        return PurePosixPath(_split_query(self._root)[0]).name

    @property
    def object_store(self) -> bool:
        """Whether the filesystem is an object store (S3, GCS)."""
        return self._base.type_name in OBJECT_STORES

    def path(self, relative: str = "") -> str:
        """The location of ``relative`` (absolute path or URI), for messages
        and for the actors that open it.

        Raises:
            ValueError: ``relative`` is absolute or holds ``..`` (every method
                taking a relative path checks it so).
        """
        rel = _relative(relative)
        if self._filesystem is not None:
            return join_location(self.display, rel)
        return join_location(self.location, rel)

    def child(self, relative: str) -> RunStorage:
        """The storage of the subdirectory ``relative``."""
        rel = _relative(relative)
        if self._filesystem is not None:
            inner = join_location(self.location, rel)
            return RunStorage(
                inner, filesystem=self._filesystem, append_flush_s=self.append_flush_s
            )
        return RunStorage(self.path(rel), append_flush_s=self.append_flush_s)

    @classmethod
    def for_file(cls, location: str | os.PathLike[str]) -> tuple[RunStorage, str]:
        """``(storage of the parent directory, file name)`` for a file's location.

        Raises:
            StorageError: as :class:`RunStorage`, or a location that names no file.
        """
        parent, name = split_location(location)
        return cls(parent), name

    def __repr__(self) -> str:
        return f"RunStorage({self.display!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {
            "location": self.location,
            "filesystem": self._filesystem,
            "append_flush_s": self.append_flush_s,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._setup(state["location"], state["filesystem"], state["append_flush_s"])

    # ------------------------------------------------------------ queries
    def _info(self, rel: str) -> pafs.FileInfo:
        try:
            return self._fs.get_file_info(rel)
        except (OSError, ValueError) as exc:
            raise _storage_error(exc, self.path(rel)) from exc

    def exists(self, relative: str = "") -> bool:
        """Whether a file or directory is there (on an object store a
        "directory" exists when an object lies under it).

        Raises:
            StorageError: the storage cannot be reached or refuses the query.
        """
        rel = _relative(relative)
        if rel in self._appends:
            return True
        return self._info(rel).type != pafs.FileType.NotFound

    def is_file(self, relative: str) -> bool:
        """Whether ``relative`` is a file. Raises as :meth:`exists`."""
        rel = _relative(relative)
        return rel in self._appends or self._info(rel).type == pafs.FileType.File

    def is_dir(self, relative: str = "") -> bool:
        """Whether ``relative`` is a directory. Raises as :meth:`exists`."""
        return self._info(_relative(relative)).type == pafs.FileType.Directory

    def size(self, relative: str) -> int:
        """A file's size, bytes.

        Raises:
            StorageNotFoundError: no such file.
            StorageError: as :meth:`exists`.
        """
        rel = _relative(relative)
        if rel in self._appends:
            return len(self._appends[rel][0])
        info = self._info(rel)
        if info.type != pafs.FileType.File:
            raise StorageNotFoundError(f"{self.path(rel)}: no such file", location=self.path(rel))
        return int(info.size)

    def list(self, relative: str = "") -> list[str]:
        """The names directly under ``relative``, sorted; ``[]`` when it does not exist.

        Raises:
            StorageError: ``relative`` is a file, or the storage fails.
        """
        rel = _relative(relative)
        selector = pafs.FileSelector(rel, allow_not_found=True, recursive=False)
        try:
            infos = self._fs.get_file_info(selector)
        except (OSError, ValueError) as exc:
            raise _storage_error(exc, self.path(rel), "cannot list") from exc
        names = {info.base_name for info in infos}
        prefix = f"{rel}/" if rel else ""
        names |= {
            key[len(prefix) :].split("/")[0] for key in self._appends if key.startswith(prefix)
        }
        return sorted(name for name in names if name)

    # ------------------------------------------------------------ reading
    def read_bytes(self, relative: str) -> bytes:
        """A file's content.

        Raises:
            StorageNotFoundError: no such file.
            StorageError: a directory, permission denied, the storage unreachable.
        """
        rel = _relative(relative)
        with self._lock:
            if rel in self._appends:
                return bytes(self._appends[rel][0])
        try:
            with self._fs.open_input_stream(rel) as handle:
                return bytes(handle.read())
        except (OSError, ValueError) as exc:
            raise _storage_error(exc, self.path(rel)) from exc

    def read_text(self, relative: str) -> str:
        """A file's content as UTF-8 text. Raises as :meth:`read_bytes`."""
        return self.read_bytes(relative).decode()

    # ------------------------------------------------------------ writing
    def make_dirs(self, relative: str = "") -> None:
        """Create the directory ``relative`` and its parents (nothing to do on
        an object store, where directories are implied by keys).

        Raises:
            StorageError: permission denied, a file in the way.
        """
        if self.object_store:
            return
        rel = _relative(relative)
        try:
            if rel:
                self._fs.create_dir(rel, recursive=True)
            else:
                self._base.create_dir(self._root, recursive=True)
        except (OSError, ValueError) as exc:
            raise _storage_error(exc, self.path(rel), "cannot create the directory") from exc

    def write_with(self, relative: str, write: Callable[[BinaryIO], object]) -> str:
        """Replace ``relative`` with what ``write(handle)`` writes, atomically
        (see the module's docstring for what that means where). Parent
        directories are created.

        Returns:
            The file's location (:meth:`path`).

        Raises:
            StorageError: the write failed (a full disk, permission denied, the
                storage unreachable); a previous file is untouched and no
                partial file is left. An exception ``write`` raises that is not
                an ``OSError`` propagates as it is.
        """
        rel = _relative(relative)
        if not rel:
            raise StorageError(f"{self.display}: a file needs a name")
        location = self.path(rel)
        with self._lock:
            self._appends.pop(rel, None)
        try:
            if self.is_local:
                atomic_write(Path(self._root) / rel, write)
                return location
            buffer = io.BytesIO()
            write(buffer)
            self._upload(rel, buffer.getvalue())
        except OSError as exc:
            raise _storage_error(exc, location) from exc
        return location

    def _upload(self, rel: str, data: bytes) -> None:
        """Put ``data`` at ``rel`` on a non-local filesystem, atomically."""
        parent = rel.rpartition("/")[0]
        if parent and not self.object_store:
            self._fs.create_dir(parent, recursive=True)
        elif not parent and not self.object_store:
            self._base.create_dir(self._root, recursive=True)
        if self.object_store:  # one upload, visible only once complete
            with self._fs.open_output_stream(rel) as out:
                out.write(data)
            return
        temp = f"{parent + '/' if parent else ''}.{rel.rpartition('/')[2]}.{uuid.uuid4().hex}.tmp"
        try:
            with self._fs.open_output_stream(temp) as out:
                out.write(data)
            self._fs.move(temp, rel)
        except BaseException:
            with contextlib.suppress(OSError, ValueError):
                self._fs.delete_file(temp)
            raise

    def write_bytes(self, relative: str, data: bytes) -> str:
        """Replace a file with ``data`` atomically; returns its location.
        Raises as :meth:`write_with`."""
        return self.write_with(relative, lambda handle: handle.write(data))

    def write_text(self, relative: str, text: str) -> str:
        """Replace a file with UTF-8 ``text`` atomically; returns its location.
        Raises as :meth:`write_with`."""
        return self.write_bytes(relative, text.encode())

    def append_line(self, relative: str, line: str) -> None:
        """Append ``line`` and a newline to a text file (created if missing).

        A local file is appended to at once. Elsewhere the file is kept in
        memory and uploaded whole when ``append_flush_s`` has passed since its
        last upload, and on :meth:`flush` (module docstring: the cost).

        Raises:
            StorageError: the write (or, on an object store, the first read of
                an existing file) failed.
        """
        rel = _relative(relative)
        data = line.rstrip("\n").encode() + b"\n"
        if self.is_local:
            path = Path(self._root) / rel
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("ab") as handle:
                    handle.write(data)
            except OSError as exc:
                raise _storage_error(exc, self.path(rel)) from exc
            return
        with self._lock:
            entry = self._appends.get(rel)
        if entry is None:
            existing = self.read_bytes(rel) if self.is_file(rel) else b""
            entry = [bytearray(existing), True, time.monotonic()]
            with self._lock:
                self._appends[rel] = entry
        with self._lock:
            entry[0] += data
            entry[1] = False
            due = time.monotonic() - entry[2] >= self.append_flush_s
        if due:
            self._flush_one(rel)

    def _flush_one(self, rel: str) -> None:
        with self._lock:
            entry = self._appends.get(rel)
            if entry is None or entry[1]:
                return
            data = bytes(entry[0])
            entry[1], entry[2] = True, time.monotonic()
        try:
            self._upload(rel, data)
        except OSError as exc:
            with self._lock:
                entry[1] = False  # try again next time
            raise _storage_error(exc, self.path(rel)) from exc

    def flush(self) -> None:
        """Upload the files that :meth:`append_line` holds in memory (nothing
        to do on a local filesystem).

        Raises:
            StorageError: an upload failed (the lines stay in memory).
        """
        for rel in list(self._appends):
            self._flush_one(rel)

    def delete(self, relative: str) -> None:
        """Remove a file, or a directory and everything under it; nothing
        when it does not exist. A local symlink is removed, never followed.

        Raises:
            StorageError: permission denied, the storage unreachable.
        """
        rel = _relative(relative)
        if not rel:
            raise StorageError(f"{self.display}: refusing to delete the storage root itself")
        with self._lock:
            self._appends.pop(rel, None)
        location = self.path(rel)
        try:
            if self.is_local:
                path = Path(self._root) / rel
                if path.is_symlink() or path.is_file():
                    path.unlink()
                elif path.is_dir():
                    shutil.rmtree(path)
                return
            kind = self._fs.get_file_info(rel).type
            if kind == pafs.FileType.File:
                self._fs.delete_file(rel)
            elif kind == pafs.FileType.Directory:
                self._fs.delete_dir(rel)
        except (OSError, ValueError) as exc:
            raise _storage_error(exc, location, "cannot remove") from exc


def _relative(relative: str) -> str:
    """A checked ``/``-separated relative path (``""`` for the root).

    Raises:
        ValueError: an absolute path or one with ``..`` (a bug, not user input).
    """
    text = relative.replace("\\", "/") if os.sep == "\\" else relative
    if text.startswith("/") or ".." in PurePosixPath(text).parts:
        raise ValueError(f"not a path inside the run location: {relative!r}")
    return "/".join(part for part in PurePosixPath(text).parts if part not in ("", "."))

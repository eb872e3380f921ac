"""Run storage: run output must not land in Ray's disposable cache.

* :class:`td3drive.contracts.storage.RunStorage` on local paths and ``file://`` URIs:
  atomic writes, appends, listing, deletion, one-line typed errors; the
  non-local code path (temp object + move, appends held in memory) on
  pyarrow's in-memory filesystem.
* Every writer on a URI: replay snapshots, learner checkpoints (also read back
  from bytes, as from an object store), the preflight checks.
* A relative run location is made absolute in the driver before any actor
  sees it, and an actor refuses a relative one.
* A real Ray run whose actors' working directory is Ray's ``working_dir``
  copy, not the driver's: every artefact lands under one ``file://``
  ``run.storage_path`` and none in an actor's cwd; ``--resume`` from the URI
  goes on with monotone counters.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
import ray
import torch
import yaml

import learner.td3 as td3
from buffer_service.snapshot import SnapshotState, read_latest, write_snapshot
from learner.td3 import CheckpointError, TD3Learner, load_checkpoint, validate_checkpoint
from td3drive.app import cli
from td3drive.app.driver import (
    LEARNER_CHECKPOINT,
    TrainingRun,
    closing_lines,
    load_run_config,
    resolve_run_dir,
)
from td3drive.app.preflight import PreflightError, check_resume_checkpoint, check_run_dir
from td3drive.contracts.config import config_from_dict
from td3drive.contracts.storage import (
    RunStorage,
    StorageError,
    StorageNotFoundError,
    StoragePermissionError,
    join_location,
    ray_cache_warning,
    require_absolute,
    resolve_location,
    split_location,
)
from tests.test_replay_shard import contents, make_shard, payloads
from tests.test_train import tiny_config

REPO = Path(__file__).resolve().parents[1]
HANG_S = 900.0
"""Only a real hang reaches this."""


def memory_storage(root: str = "bucket/run", flush_s: float = 3600.0) -> RunStorage:
    """A run storage on pyarrow's in-memory filesystem: not local, so the
    object-store code paths (temp object + move, appends held in memory) run."""
    return RunStorage(root, filesystem=pafs._MockFileSystem(), append_flush_s=flush_s)


def small_learner() -> TD3Learner:
    config = config_from_dict(tiny_config()).learner
    return TD3Learner(config)


# ------------------------------------------------------------ locations
def test_locations_resolve_join_and_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_location("runs/a/") == str(tmp_path / "runs" / "a")
    assert resolve_location("runs", base="/srv") == "/srv/runs"
    assert resolve_location("s3://bucket/runs/?region=eu-west-1") == (
        "s3://bucket/runs?region=eu-west-1"
    )
    assert resolve_location("file:///") == "file:///"
    assert join_location("s3://b/runs?region=x", "r1", "checkpoints/learner.pt") == (
        "s3://b/runs/r1/checkpoints/learner.pt?region=x"
    )
    assert join_location("/data/runs", "r1") == "/data/runs/r1"
    assert split_location("gs://b/r/learner.pt") == ("gs://b/r", "learner.pt")
    assert split_location("file:///learner.pt") == ("file:///", "learner.pt")
    assert split_location("learner.pt") == (str(tmp_path), "learner.pt")
    with pytest.raises(StorageError, match="not the location of a file"):
        split_location("s3://bucket")
    with pytest.raises(StorageError, match="empty"):
        resolve_location("  ")
    assert require_absolute("/abs/x", "it") == "/abs/x"
    assert require_absolute("s3://b/x", "it") == "s3://b/x"
    with pytest.raises(StorageError, match="relative path"):
        require_absolute("runs/x", "the learner checkpoint")


def test_run_location_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--run-dir, else <run.storage_path>/<timestamp>, else ./runs/<timestamp>;
    every relative path made absolute against the driver's cwd."""
    monkeypatch.chdir(tmp_path)
    assert resolve_run_dir("mine", "s3://b/runs") == str(tmp_path / "mine")
    assert resolve_run_dir("file:///data/r", "s3://b/runs") == "file:///data/r"
    on_bucket = resolve_run_dir(None, "s3://b/runs?region=x")
    assert on_bucket.startswith("s3://b/runs/") and on_bucket.endswith("?region=x")
    assert Path(resolve_run_dir(None, "shared")).parent == tmp_path / "shared"
    assert Path(resolve_run_dir(None, None)).parent == tmp_path / "runs"


@pytest.fixture(params=["path", "file-uri"])
def local_storage(request: pytest.FixtureRequest, tmp_path: Path) -> RunStorage:
    root = tmp_path / "store" / "run"
    return RunStorage(str(root) if request.param == "path" else root.as_uri())


# ------------------------------------------------------------ RunStorage, local
def test_local_storage_round_trip(local_storage: RunStorage) -> None:
    storage = local_storage
    root = storage.local_path
    assert root is not None and storage.is_local and not storage.exists()
    assert storage.name == "run" and storage.list() == [] and storage.list("missing") == []
    assert storage.write_text("checkpoints/driver.json", "{}") == storage.path(
        "checkpoints/driver.json"
    )
    assert (root / "checkpoints" / "driver.json").read_text() == "{}"
    storage.write_bytes("a.bin", b"\x00\x01")
    assert storage.read_bytes("a.bin") == b"\x00\x01" and storage.size("a.bin") == 2
    assert storage.is_file("a.bin") and storage.is_dir("checkpoints") and storage.exists()
    storage.append_line("metrics.jsonl", '{"n": 1}')
    storage.append_line("metrics.jsonl", '{"n": 2}\n')
    assert storage.read_text("metrics.jsonl") == '{"n": 1}\n{"n": 2}\n'
    assert storage.list() == ["a.bin", "checkpoints", "metrics.jsonl"]
    assert storage.child("checkpoints").list() == ["driver.json"]
    storage.delete("checkpoints")
    storage.delete("a.bin")
    storage.delete("never-there")
    assert storage.list() == ["metrics.jsonl"]
    assert sorted(p.name for p in root.iterdir()) == ["metrics.jsonl"]  # no temp files
    copy = pickle.loads(pickle.dumps(storage))
    assert copy.display == storage.display and copy.read_text("metrics.jsonl")
    with pytest.raises(ValueError, match="not a path inside"):
        storage.read_bytes("../outside")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial_one(
    local_storage: RunStorage,
) -> None:
    storage = local_storage
    storage.write_text("summary.json", "old")

    def disk_full(handle: Any) -> None:
        handle.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(StorageError, match="No space left on device") as raised:
        storage.write_with("summary.json", disk_full)
    assert str(raised.value) == f"{storage.path('summary.json')}: No space left on device"
    assert storage.read_text("summary.json") == "old"
    assert storage.list() == ["summary.json"]


def test_symlinks_are_removed_not_followed(tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious.txt").write_text("mine")
    storage = RunStorage(tmp_path / "run")
    storage.make_dirs()
    (tmp_path / "run" / "report").symlink_to(keep)
    storage.delete("report")
    assert (keep / "precious.txt").read_text() == "mine"
    assert storage.list() == []


def test_storage_errors_are_typed_and_one_line(tmp_path: Path) -> None:
    storage = RunStorage(tmp_path.as_uri())
    with pytest.raises(StorageNotFoundError) as missing:
        storage.read_text("nope.json")
    assert isinstance(missing.value, FileNotFoundError)
    assert str(missing.value) == f"{tmp_path.as_uri()}/nope.json: No such file or directory"
    with pytest.raises(StorageError, match="unknown storage scheme nope://") as scheme:
        RunStorage("nope://bucket/runs")
    assert "\n" not in str(scheme.value) and str(scheme.value).startswith("nope://bucket/runs: ")
    with pytest.raises(StorageError, match="cannot open the storage"):
        RunStorage("file://some-host/tmp/runs")  # pyarrow: no host in a local URI
    with pytest.raises(StorageError, match="refusing to delete the storage root"):
        storage.delete("")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError) as not_a_dir:
        storage.write_text("file/below", "y")
    assert "\n" not in str(not_a_dir.value)


def test_permission_denied_is_a_storage_permission_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        target = Path("/sys") / f"td3drive-{os.getpid()}"  # even root cannot write sysfs
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        target = locked / "run"
    with pytest.raises(StoragePermissionError) as denied:
        RunStorage(target).write_text("config.yaml", "x")
    assert isinstance(denied.value, PermissionError)
    assert str(denied.value).startswith(f"{target}/config.yaml: ")
    assert "\n" not in str(denied.value)


# ------------------------------------------------------------ RunStorage, not local
def test_non_local_storage_writes_atomically_and_holds_appends_until_flushed() -> None:
    storage = memory_storage(flush_s=3600.0)
    assert not storage.is_local and storage.local_path is None
    assert storage.display == "mock://bucket/run"
    storage.write_text("checkpoints/driver.json", "{}")
    assert storage.list("checkpoints") == ["driver.json"]  # the temp object was moved
    storage.append_line("metrics.jsonl", "a")
    storage.append_line("metrics.jsonl", "b")
    # Held in memory: visible through the storage, not yet uploaded.
    assert storage.read_text("metrics.jsonl") == "a\nb\n"
    assert "metrics.jsonl" in storage.list()
    assert storage._fs.get_file_info("metrics.jsonl").type == pafs.FileType.NotFound
    storage.flush()
    assert storage._fs.get_file_info("metrics.jsonl").size == 4
    # A rewrite replaces the held content.
    storage.write_text("metrics.jsonl", "a\n")
    storage.append_line("metrics.jsonl", "c")
    storage.flush()
    with storage._fs.open_input_stream("metrics.jsonl") as handle:
        assert handle.read() == b"a\nc\n"
    storage.delete("checkpoints")
    assert storage.list() == ["metrics.jsonl"]

    eager = memory_storage(flush_s=0.0)  # every append uploads at once
    eager.append_line("eval.jsonl", "x")
    assert eager._fs.get_file_info("eval.jsonl").size == 2


# ------------------------------------------------------------ snapshots and checkpoints
def test_shard_snapshots_on_a_file_uri(tmp_path: Path) -> None:
    uri = (tmp_path / "shard-0").as_uri()
    shard = make_shard(uri)
    for payload in payloads(3):
        shard.insert(payload)
    first = shard.save()
    assert first == f"{uri}/snapshot-00000001.td3r"
    second = shard.save()
    assert sorted(p.name for p in (tmp_path / "shard-0").iterdir()) == [
        "snapshot-00000002.done",
        "snapshot-00000002.td3r",
    ]
    restored = make_shard(uri)
    assert restored.restored_from == second
    assert contents(restored) == contents(shard)


def test_snapshots_on_non_local_storage_keep_the_previous_one_until_complete() -> None:
    storage = memory_storage()
    shard = make_shard()
    for payload in payloads(2):
        shard.insert(payload)
    state_before = contents(shard)
    state = SnapshotState(
        header={
            "shard": 0,
            "next_id": shard._storage.next_id,
            "storage_counters": dict(shard._storage.counters),
            "rate_limiter": shard._limiter.state(),
            "policy_version": 0,
            "max_priority": 1.0,
            "counters": {},
        },
        chunks=shard._storage.chunks(),
        priorities=None,
    )
    write_snapshot(storage, state)
    # A crash after the data object and before its done marker: ignored.
    storage.write_bytes("snapshot-00000002.td3r", b"half a snapshot")
    found = read_latest(storage)
    assert found is not None and found[0] == "mock://bucket/run/snapshot-00000001.td3r"
    assert [c for _, c in found[1].chunks] and len(found[1].chunks) == len(state_before)


def test_learner_checkpoint_on_a_file_uri(tmp_path: Path) -> None:
    uri = (tmp_path / "run" / "checkpoints" / "learner.pt").as_uri()
    learner = small_learner()
    assert learner.save_checkpoint(uri) == uri
    assert (tmp_path / "run" / "checkpoints" / "learner.pt").stat().st_size > 0
    assert load_checkpoint(uri)["updates"] == 0
    assert validate_checkpoint(uri).updates == 0
    assert TD3Learner.from_checkpoint(uri).updates == 0
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint((tmp_path / "missing.pt").as_uri())


def test_remote_checkpoints_load_from_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint on an object store is read into memory and loaded with
    ``torch.load(io.BytesIO(...), weights_only=True)``; damaged ones fail in
    one line as local ones do."""
    storage = memory_storage("bucket/run/checkpoints")
    monkeypatch.setattr(
        td3.RunStorage, "for_file", classmethod(lambda cls, location: (storage, "learner.pt"))
    )
    uri = "s3://bucket/run/checkpoints/learner.pt"  # answered by the in-memory storage
    learner = small_learner()
    learner.save_checkpoint(uri)
    data = storage.read_bytes("learner.pt")
    assert load_checkpoint(uri)["updates"] == 0 and validate_checkpoint(uri).updates == 0
    for damaged, reason in (
        (b"", "empty file (0 bytes)"),
        (data[: len(data) // 2], "truncated or corrupt"),
        (b"\x00garbage" * 64, "not a td3drive checkpoint"),
    ):
        storage.write_bytes("learner.pt", damaged)
        with pytest.raises(CheckpointError) as raised:
            validate_checkpoint(uri)
        message = str(raised.value)
        assert message.startswith(f"{uri}: ") and reason in message and "\n" not in message
    storage.delete("learner.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(uri)


# ------------------------------------------------------------ preflight on storage
def _write_run(storage: RunStorage, checkpoint: bytes | None = None) -> None:
    config = config_from_dict(tiny_config())
    storage.write_text("config.yaml", yaml.safe_dump(config.model_dump(mode="json")))
    storage.write_text("checkpoints/driver.json", '{"env_steps": 64}')
    storage.write_text("metrics.jsonl", '{"env_steps": 64}\n')
    if checkpoint is not None:
        storage.write_bytes("checkpoints/learner.pt", checkpoint)


def test_preflight_on_non_local_storage() -> None:
    fresh = memory_storage("bucket/new")
    check_run_dir(fresh, resume=False, overwrite=False)
    assert fresh.list() == []  # the write probe is gone
    with pytest.raises(PreflightError, match="not a td3drive run directory"):
        check_run_dir(fresh, resume=True, overwrite=False)
    with pytest.raises(PreflightError, match="nothing is stored there"):
        check_run_dir(memory_storage("bucket/other"), resume=True, overwrite=False)

    storage = memory_storage()
    _write_run(storage)
    storage.write_text("notes.txt", "the user's")
    with pytest.raises(PreflightError, match="already holds a run") as held:
        check_run_dir(storage, resume=False, overwrite=False)
    assert "--resume mock://bucket/run" in str(held.value)
    check_run_dir(storage, resume=True, overwrite=False)
    check_run_dir(storage, resume=False, overwrite=True)
    assert storage.list() == ["notes.txt"]  # only td3drive's own files went
    with pytest.raises(PreflightError, match="holds no td3drive run"):
        check_run_dir(storage, resume=False, overwrite=True)


def test_preflight_on_a_file_uri(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    uri = run.as_uri()
    storage = RunStorage(uri)
    _write_run(storage, checkpoint=b"not a checkpoint")
    with pytest.raises(PreflightError) as held:
        check_run_dir(uri, resume=False, overwrite=False)
    assert str(held.value).startswith(f"{uri} already holds a run")
    with pytest.raises(PreflightError) as bad:
        check_resume_checkpoint(uri, config_from_dict(tiny_config()))
    assert str(bad.value).startswith(f"cannot resume {uri}: {uri}/checkpoints/learner.pt: ")
    storage.write_bytes("checkpoints/learner.pt", _checkpoint_bytes(tmp_path))
    check_resume_checkpoint(uri, config_from_dict(tiny_config()))
    assert load_run_config(uri).learner.features_dim == 32

    # The CLI: an unknown scheme or a bad location ends in one line, exit 2,
    # before Ray starts.
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config()))
    assert not ray.is_initialized()
    for args, expected in (
        (["--run-dir", "nope://bucket/x"], "unknown storage scheme nope://"),
        (["--run-dir", uri], f"{uri} already holds a run"),
        (["--set", "run.storage_path=nope://b/runs"], "unknown storage scheme nope://"),
    ):
        code = cli.main(["train", "--config", str(config_path), *args])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and expected in lines[0], err
    code = cli.main(["train", "--resume", "nope://bucket/x"])
    assert code == 2 and "unknown storage scheme" in capsys.readouterr().err
    assert not ray.is_initialized()


def _checkpoint_bytes(tmp_path: Path) -> bytes:
    path = small_learner().save_checkpoint(tmp_path / "real.pt")
    data = Path(path).read_bytes()
    Path(path).unlink()
    return data


# ------------------------------------------------------------ relative locations
def test_a_relative_run_dir_is_absolute_before_actors_see_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = config_from_dict(tiny_config())
    run = TrainingRun(config, Path("rel") / "run")
    expected = tmp_path / "rel" / "run"
    assert run.location == str(expected) and run.run_dir == expected
    assert run.learner_checkpoint_location() == str(expected / LEARNER_CHECKPOINT)
    for index in range(2):
        assert run.shard_snapshot_location(index) == str(
            expected / "checkpoints" / "replay" / f"shard-{index}"
        )
    by_storage_path = TrainingRun(config_from_dict(tiny_config(run={"storage_path": "store"})))
    assert Path(by_storage_path.location).parent == tmp_path / "store"
    by_default = TrainingRun(config)
    assert Path(by_default.location).parent == tmp_path / "runs"
    # A region in the URI: pyarrow sets the client up without asking AWS.
    bucket = "s3://b/runs?region=us-east-1"
    on_uri = TrainingRun(config_from_dict(tiny_config(run={"storage_path": bucket})))
    checkpoint = on_uri.learner_checkpoint_location()
    assert checkpoint.startswith("s3://b/runs/")
    assert checkpoint.endswith("/checkpoints/learner.pt?region=us-east-1")

    lines = closing_lines({"env_steps": 10, "learner_updates": 1, "wall_s": 1.0}, "rel/run")
    assert f"td3drive train --resume {expected} " in lines[-3]
    assert lines[-2] == f"summary: {expected / 'summary.json'}"
    assert lines[-1] == f"plots: td3drive report {expected}"
    uri_lines = closing_lines({"env_steps": 1, "learner_updates": 1, "wall_s": 1.0}, "file:///r")
    assert "--resume file:///r " in uri_lines[-3] and uri_lines[-1].endswith("report /r")


def test_the_learner_actor_refuses_a_relative_checkpoint_path() -> None:
    from learner.ray_actor import LearnerActor

    threads = torch.get_num_threads()
    try:
        with pytest.raises(StorageError, match="relative path"):
            LearnerActor(tiny_config(), [], None, "runs/x/checkpoints/learner.pt")
    finally:
        torch.set_num_threads(threads)


def test_a_run_in_rays_cache_is_warned_about(tmp_path: Path) -> None:
    cached = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    warning = ray_cache_warning(RunStorage(cached / "runs" / "r"))
    assert warning is not None and "run.storage_path" in warning
    assert ray_cache_warning(RunStorage(tmp_path / "runs" / "r")) is None


# ------------------------------------------------------------ a real run, actors elsewhere
PACKAGES = ("td3drive", "learner", "buffer_service", "rollout_workers")


@pytest.fixture(scope="module")
def ray_in_a_working_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A local Ray whose workers run in a ``runtime_env`` ``working_dir``
    (what ``ray job submit --working-dir`` does): a copy of the project's
    packages only, so every actor's cwd is Ray's cache, not the driver's.
    Yields the actors' working directory."""
    package = tmp_path_factory.mktemp("working_dir")
    for name in PACKAGES:
        shutil.copytree(
            REPO / name, package / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    ray.init(
        address="local",  # a fresh instance even when a `ray start` cluster runs here
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"working_dir": str(package)},
    )

    @ray.remote(num_cpus=0)
    def actor_cwd() -> str:
        return os.getcwd()

    cwd = Path(ray.get(actor_cwd.remote(), timeout=HANG_S))
    yield cwd
    ray.shutdown()


def _artefacts(root: Path) -> list[Path]:
    names = {"learner.pt", "driver.json", "summary.json", "metrics.jsonl", "config.yaml"}
    return [
        path
        for path in root.rglob("*")
        if path.name in names or path.suffix in (".td3r", ".done") or path.name == "runs"
    ]


@pytest.mark.slow
def test_actors_elsewhere_write_to_one_file_uri_and_resume_from_it(
    ray_in_a_working_dir: Path, tmp_path: Path
) -> None:
    actor_cwd = ray_in_a_working_dir
    assert actor_cwd.resolve() != Path.cwd().resolve()
    assert "runtime_resources" in actor_cwd.parts  # Ray's cache, as under ray job submit
    store = tmp_path / "store"
    storage_path = store.as_uri()

    config = config_from_dict(
        tiny_config(run={"storage_path": storage_path, "total_env_steps": 300})
    )
    lines: list[str] = []
    first_run = TrainingRun(config, log_line=lines.append)
    location = first_run.location
    assert location.startswith(f"{storage_path}/")
    first = first_run.run()
    first_run.shutdown()
    assert first["status"] == "completed" and first["run_dir"] == location

    run_path = store / first_run.storage.name
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "eval.jsonl",
        "eval.json",
        "summary.json",
        "checkpoints/driver.json",
        "checkpoints/learner.pt",
    ):
        assert (run_path / name).is_file(), name
    for shard in range(2):
        names = {p.suffix for p in (run_path / "checkpoints/replay" / f"shard-{shard}").iterdir()}
        assert names == {".td3r", ".done"}, (shard, names)
    assert (
        load_checkpoint(location + "/checkpoints/learner.pt")["updates"] == first["learner_updates"]
    )
    assert _artefacts(actor_cwd) == [], "an actor wrote into its own working directory"
    assert not any(store.glob("*/runs")) and sorted(p.name for p in store.iterdir()) == [
        first_run.storage.name
    ]

    # --resume from the URI: counters go on from the checkpoint, the shards
    # restore their snapshots from the same storage.
    raw = load_run_config(location).model_dump(mode="json")
    raw["run"]["total_env_steps"] = 600
    second_run = TrainingRun(config_from_dict(raw), location, resume=True, log_line=lines.append)
    second = second_run.run()
    shard_stats = ray.get([s.stats.remote() for s in second_run.shards], timeout=HANG_S)
    second_run.shutdown()
    assert second["status"] == "completed" and second["run_dir"] == location
    assert second["env_steps"] >= 600 > first["env_steps"]
    assert second["learner_updates"] > first["learner_updates"]
    assert second_run.progress.launches == 2
    for stats in shard_stats:
        assert str(stats["restored_from"]).startswith(f"{location}/checkpoints/replay/shard-")
    metrics = [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines()]
    for key in ("env_steps", "learner_updates", "episodes"):
        values = [line[key] for line in metrics]
        assert values == sorted(values), f"{key} went backwards: {values}"
    assert _artefacts(actor_cwd) == []
    assert all("runtime_resources" not in line for line in lines if "warning" in line)


def test_resume_drops_metrics_lines_after_the_checkpoint_and_cut_short_ones(
    tmp_path: Path,
) -> None:
    # A driver killed mid-append (or a full disk) can leave a last line that
    # is not JSON; the resume must drop it with the lines after the
    # checkpoint instead of failing on it.
    run = TrainingRun(config_from_dict(tiny_config()), tmp_path / "run")
    run.progress.env_steps, run.progress.learner_updates = 100, 10
    lines = [
        {"env_steps": 50, "learner_updates": 5},
        {"env_steps": 100, "learner_updates": 10},
        {"env_steps": 150, "learner_updates": 15},  # after the checkpoint
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"env_steps": 1'
    run.storage.write_text("metrics.jsonl", text)
    run.storage.write_text("eval.jsonl", json.dumps(lines[0]) + "\n[1, 2]\n")
    run._forget_after_checkpoint()
    kept = [json.loads(line) for line in run.storage.read_text("metrics.jsonl").splitlines()]
    assert kept == lines[:2]
    assert run.storage.read_text("eval.jsonl") == json.dumps(lines[0]) + "\n"

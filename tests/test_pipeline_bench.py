"""``bench pipeline`` (and the side-by-side rows of ``bench replay``) at tiny
scale: the JSON's shape and the ratios' definitions, never speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from td3drive.bench.replay import run_replay_benchmark


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "td3drive", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_bench_pipeline_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.json"
    result = run_cli(
        "bench",
        "pipeline",
        "--shards",
        "1,2",
        "--transitions",
        "128",
        "--chunk-steps",
        "32",
        "--batch-size",
        "16",
        "--batches",
        "3",
        "--warmup",
        "1",
        "--learner-updates-per-s",
        "1000",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert json.loads(result.stdout) == report
    assert report["benchmark"] == "pipeline" and report["device"] == "cpu"
    assert report["batch_bytes"] == 16 * (2 * 4 * 84 * 84 + 2 * 23 * 4 + 2 * 4 + 4 + 4)
    assert [(r["shards"], r["sampler"]) for r in report["results"]] == [
        (1, "size-then-sample"),
        (1, "pipelined"),
        (1, "compressed"),
        (2, "size-then-sample"),
        (2, "pipelined"),
        (2, "compressed"),
    ]
    shipped = {r["sampler"]: r["shipped_bytes"] for r in report["results"] if r["shards"] == 1}
    # Decoded samples carry the batch's arrays (plus ids and versions);
    # compressed ones each distinct frame once, LZ4-compressed.
    assert shipped["pipelined"] == shipped["size-then-sample"] > report["batch_bytes"]
    assert shipped["compressed"] < shipped["pipelined"] / 3
    for row in report["results"]:
        assert row["batches_per_s"] > 0 and row["learner_updates_per_s_achieved"] > 0
        assert 0 <= row["learner_wait_share"] <= 1
        assert 0 <= row["consumer_wait_share"] <= 1
        assert row["learner_wait_share_estimate"] == pytest.approx(
            max(0.0, 1 - row["batches_per_s"] / 1000)
        )
        results = report["results"]
        base = next(
            r for r in results if (r["shards"], r["sampler"]) == (row["shards"], "size-then-sample")
        )
        assert row["mb_per_s"] == pytest.approx(row["batches_per_s"] * row["shipped_bytes"] / 1e6)
        assert row["speedup_vs_baseline"] == pytest.approx(
            row["batches_per_s"] / base["batches_per_s"]
        )
    assert "learner waits" in result.stderr  # the table goes to stderr


def test_bench_pipeline_refuses_bad_shard_counts() -> None:
    result = run_cli("bench", "pipeline", "--shards", "1,0")
    assert result.returncode == 2 and "positive" in result.stderr


def test_bench_replay_reports_both_sample_paths_and_inserts_while_sampling() -> None:
    lines: list[str] = []
    report = run_replay_benchmark(
        transitions=256,
        chunk_steps=32,
        batch_size=16,
        sample_batches=2,
        insert_passes=1,
        progress=lines.append,
    )
    rows = [(r["path"], r["sampler_threads"], r["decode_threads"]) for r in report["sample_paths"]]
    assert rows == [
        ("legacy", 1, 1),
        ("legacy", 2, 1),
        ("gather", 1, 1),
        ("gather", 2, 1),
        ("gather", 1, 2),
        ("gather", 2, 2),
    ]
    legacy = report["sample_paths"][0]["batches_per_s"]
    assert report["legacy_sample_batches_per_s"] == legacy
    assert report["sample_batches_per_s"] == report["sample_paths"][2]["batches_per_s"]
    assert report["sample_speedup"] == pytest.approx(report["sample_batches_per_s"] / legacy)
    for row in report["sample_paths"]:
        assert row["speedup_vs_legacy"] == pytest.approx(row["batches_per_s"] / legacy)
    inserts = report["insert_while_sampling"]
    assert [r["sampling"] for r in inserts] == [None, "legacy", "gather", "compressed"]
    assert inserts[0]["insert_rate_vs_alone"] == 1.0 and inserts[0]["sample_batches_per_s"] == 0
    assert all(r["insert_transitions_per_s"] > 0 for r in inserts)
    assert all(r["sample_batches_per_s"] > 0 for r in inserts[1:])
    compressed = next(r for r in inserts if r["sampling"] == "compressed")
    assert compressed["insert_transitions_per_s"] > 0 and compressed["sample_batches_per_s"] > 0
    assert compressed["insert_rate_vs_alone"] > 0
    for row in inserts:
        assert row["insert_transitions_per_s"] == pytest.approx(
            row["inserted_transitions"] / row["insert_seconds"]
        )
        # Unlimited here: every row inserts every chunk once.
        assert not row["time_limited"] and row["inserted_transitions"] == 256

    shipping = report["compressed_shipping"]
    assert shipping["bytes_ratio"] == pytest.approx(
        shipping["raw_bytes_per_batch"] / shipping["bytes_per_batch"]
    )
    assert shipping["bytes_ratio"] > 1 and shipping["shard_batches_per_s"] > 0
    assert [r["decode_threads"] for r in shipping["receiver_decode"]] == [1, 2]
    assert "vs legacy" in lines[-1]  # the table
    json.dumps(report)


def test_bench_replay_insert_rows_stop_at_their_time_limit() -> None:
    # A limit below one insert's time: each row inserts exactly one chunk and
    # says it stopped early (the legacy row would otherwise crawl for minutes
    # at full size).
    report = run_replay_benchmark(
        transitions=256,
        chunk_steps=32,
        batch_size=16,
        sample_batches=1,
        sampler_threads=[1],
        decode_threads=[1],
        insert_passes=2,
        insert_time_limit_s=1e-9,
        progress=lambda line: None,
    )
    for row in report["insert_while_sampling"]:
        assert row["time_limited"] and row["inserted_transitions"] == 32

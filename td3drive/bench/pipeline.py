"""``td3drive bench pipeline``: the learner's data feed on Ray, shards to device.

For each shard count ``S``: ``S`` replay shards (Ray actors) are filled with
the same chunks (synthetic frames, or the embedded simulator's as
``bench replay --source racetrack`` makes them), then a consumer in this
process takes batches from a sampler and only turns them into torch tensors
on the learner's device (pinned host memory and an asynchronous copy on
CUDA, then a synchronize; zero-copy ``torch.from_numpy`` on CPU). Three
samplers run on the same shards in the same run:

* ``size-then-sample`` (the baseline): before each batch ask every shard its
  size, then sample, one batch in flight.
* ``pipelined``: :class:`buffer_service.ray_actor.ReplaySampler`: one call per
  shard per batch (sizes come back with the samples), ``prefetch`` batches
  requested ahead; shards send decoded samples.
* ``compressed``: the same sampler with ``transport="compressed"``
  (``replay.sample_transport``): shards send each distinct frame once,
  LZ4-compressed, and the sampler decodes on ``decode_threads`` threads in
  this process (as it would in the learner's).

Each is measured twice. *Unpaced*, the consumer takes batches as fast as they
come: ``batches_per_s`` is the most the feed delivers. *Paced*, the consumer
plays a learner that computes ``learner_updates_per_s`` updates per second
(each update sleeps ``1 / rate`` s after the upload, as a GPU step leaves the
host's CPU free): ``learner_wait_share`` is the share of its time it waits for
a batch, the figure that says how many shards a learner at that rate needs;
``learner_wait_share_estimate = max(0, 1 − batches_per_s_needed/delivered)``
is the same from the unpaced rate.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import queue
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from td3drive.app.arguments import positive_int, positive_int_list
from td3drive.bench.sources import SOURCES, encode_chunks, episodes_source_for, make_transitions
from td3drive.contracts.spec import Transition

Progress = Callable[[str], None]

SAMPLERS = ("size-then-sample", "pipelined", "compressed")
BASELINE = "size-then-sample"

HELP = "the learner's replay feed on Ray: batches/s vs shard count, learner wait share"
DESCRIPTION = (
    "Fills S replay shards (Ray actors) with the same chunks, then a consumer "
    "takes batches from the real ReplaySampler and only turns them into torch tensors "
    "on --device. Per shard count, three samplers: size-then-sample (the baseline: "
    "ask every shard its size, then sample, one batch in flight), pipelined (the "
    "real ReplaySampler, decoded samples) and compressed (the real ReplaySampler "
    "with replay.sample_transport compressed: frames travel LZ4-compressed and are "
    "decoded by the sampler on --decode-threads threads). Each row: batches_per_s, "
    "mb_per_s (bytes through Ray's object store), speedup_vs_baseline, "
    "upload_ms_mean, and learner_wait_share: the share of its "
    "time a learner at --learner-updates-per-s would wait for batches (measured by "
    "a consumer that sleeps each update's time; learner_wait_share_estimate is "
    "1 - batches_per_s / rate)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``td3drive bench pipeline``."""
    parser.add_argument(
        "--shards",
        type=positive_int_list,
        default=[1, 2],
        metavar="N,M",
        help="comma-separated shard counts",
    )
    parser.add_argument(
        "--source",
        choices=SOURCES,
        default="synthetic",
        help="frames: synthetic driving-like frames, or the embedded simulator's "
        "(as bench replay --source racetrack)",
    )
    parser.add_argument(
        "--transitions",
        type=positive_int,
        default=8192,
        help="transitions per shard (every shard holds the same chunks)",
    )
    parser.add_argument("--chunk-steps", type=positive_int, default=64, help="steps per chunk")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="batch size")
    parser.add_argument(
        "--batches",
        type=positive_int,
        default=100,
        help="timed batches per shard count, sampler and mode (unpaced, paced)",
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches before each timing")
    parser.add_argument("--prefetch", type=positive_int, default=2, help="sampler prefetch depth")
    parser.add_argument(
        "--device", default="cpu", help="the learner's torch device (cpu, cuda, cuda:1, ...)"
    )
    parser.add_argument(
        "--decode-threads",
        type=positive_int,
        default=2,
        help="the compressed sampler's decode threads (replay.sample_decode_threads)",
    )
    parser.add_argument(
        "--learner-updates-per-s",
        type=float,
        default=500.0,
        help="update rate of the learner whose waiting is measured, updates/s",
    )


def run(args: argparse.Namespace, progress: Progress = print) -> dict[str, Any]:
    """:func:`run_pipeline_benchmark` with the options of :func:`add_arguments`.

    Raises:
        ValueError, RuntimeError: as :func:`run_pipeline_benchmark`.
    """
    return run_pipeline_benchmark(
        shard_counts=args.shards,
        transitions_per_shard=args.transitions,
        chunk_steps=args.chunk_steps,
        batch_size=args.batch_size,
        batches=args.batches,
        warmup=args.warmup,
        prefetch=args.prefetch,
        device=args.device,
        learner_updates_per_s=args.learner_updates_per_s,
        decode_threads=args.decode_threads,
        source=args.source,
        episodes_source=episodes_source_for(args.source),
        progress=progress,
    )


def run_pipeline_benchmark(
    shard_counts: Sequence[int] = (1, 2),
    transitions_per_shard: int = 8192,
    chunk_steps: int = 64,
    batch_size: int = 256,
    batches: int = 100,
    warmup: int = 5,
    prefetch: int = 2,
    device: str = "cpu",
    learner_updates_per_s: float = 500.0,
    decode_threads: int = 2,
    source: str = "synthetic",
    episodes_source: Callable[[int], list[Transition]] | None = None,
    progress: Progress = print,
) -> dict[str, Any]:
    """Measure the learner feed for each shard count.

    Args:
        shard_counts: numbers of shards ``S`` to measure.
        transitions_per_shard: transitions each shard holds (every shard
            holds the same chunks).
        chunk_steps: steps per chunk.
        batch_size: transitions per batch.
        batches: timed batches per sampler, shard count and mode (unpaced, paced).
        warmup: untimed batches before each timing.
        prefetch: the sampler's prefetch depth (``replay.prefetch_batches``).
        device: the learner's torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        learner_updates_per_s: the update rate of the learner the paced
            consumer plays, updates/s.
        decode_threads: the ``compressed`` sampler's decode threads.
        source: a name for the frames' origin, reported in the JSON.
        episodes_source: returns that many consecutive transitions (whole
            episodes); ``None`` = synthetic frames.

    Returns:
        The JSON document: ``results`` holds one row per shard count and
        sampler (``shards``, ``sampler``, ``batches_per_s``, ``mb_per_s``,
        ``consumer_wait_share``, ``upload_ms_mean``, ``learner_wait_share``,
        ``learner_updates_per_s_achieved``, ``learner_wait_share_estimate``,
        ``shipped_bytes``: bytes of one batch as it crosses the object store,
        ``speedup_vs_baseline``), plus the settings, ``batch_bytes`` (one
        decoded batch) and ``machine``.

    Raises:
        ValueError: empty or non-positive shard counts, or non-positive sizes.
        RuntimeError: ``device`` is a CUDA device and CUDA is not available.
    """
    import ray
    import torch

    from buffer_service.ray_actor import ReplaySampler, remote_shard_class
    from td3drive.contracts.config import ReplayConfig

    if not shard_counts or min(shard_counts) < 1:
        raise ValueError("--shards needs positive counts, e.g. 1,2")
    if min(transitions_per_shard, chunk_steps, batch_size, batches, prefetch) < 1 or warmup < 0:
        raise ValueError("sizes, batches and prefetch must be >= 1, warmup >= 0")
    if learner_updates_per_s <= 0:
        raise ValueError("learner_updates_per_s must be > 0")
    if decode_threads < 1:
        raise ValueError("decode_threads must be >= 1")
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: CUDA is not available")

    steps, source_note = make_transitions(
        transitions_per_shard, source=source, episodes_source=episodes_source, progress=progress
    )
    payloads = encode_chunks(steps, chunk_steps)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(
            address="local",  # its own instance, even beside a `ray start` cluster
            num_cpus=max(max(shard_counts) + 1, os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=False,
        )
    results: list[dict[str, Any]] = []
    batch_bytes = 0
    try:
        for count in shard_counts:
            config = ReplayConfig(
                num_shards=count,
                capacity_transitions=count * transitions_per_shard,
                capacity_bytes=10**12,
                chunk_steps=chunk_steps,
                min_size_to_sample=count,
                replay_ratio=None,
                prefetch_batches=prefetch,
            )
            shard_class = remote_shard_class(num_cpus=0)
            shards = [shard_class.remote(config, batch_size, i) for i in range(count)]
            ray.get([shard.insert.remote(p) for shard in shards for p in payloads])
            progress(f"{count} shard(s) filled with {len(steps)} transitions each")
            decoded_bytes = batch_size * _shipped_per_row(shards, "sample")
            shipped = {
                "size-then-sample": decoded_bytes,
                "pipelined": decoded_bytes,
                "compressed": batch_size * _shipped_per_row(shards, "sample_compressed"),
            }
            for name in SAMPLERS:
                sampler: Any
                if name == BASELINE:
                    sampler = _SizeThenSampleSampler(
                        shards, batch_size, prefetch=prefetch, timeout_s=600.0
                    )
                else:
                    sampler = ReplaySampler(
                        shards,
                        batch_size,
                        prefetch=prefetch,
                        timeout_s=600.0,
                        transport="compressed" if name == "compressed" else "decoded",
                        decode_threads=decode_threads,
                    )
                try:
                    row, batch_bytes = _measure(
                        sampler, target, batches, warmup, learner_updates_per_s
                    )
                finally:
                    sampler.close()
                row = {"shards": count, "sampler": name, **row}
                row["shipped_bytes"] = shipped[name]
                row["mb_per_s"] = row["batches_per_s"] * shipped[name] / 1e6
                results.append(row)
                progress(
                    f"{count} shard(s), {name}: {row['batches_per_s']:.1f} batches/s, a learner "
                    f"at {learner_updates_per_s:g} updates/s waits "
                    f"{100 * row['learner_wait_share']:.0f}% of its time"
                )
            for shard in shards:
                ray.kill(shard)
    finally:
        if started_ray:
            ray.shutdown()
    for row in results:
        base = next(r for r in results if r["shards"] == row["shards"] and r["sampler"] == BASELINE)
        row["speedup_vs_baseline"] = row["batches_per_s"] / base["batches_per_s"]
    report = {
        "benchmark": "pipeline",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "source_note": source_note,
        "transitions_per_shard": len(steps),
        "chunk_steps": chunk_steps,
        "batch_size": batch_size,
        "batches": batches,
        "prefetch": prefetch,
        "device": str(target),
        "learner_updates_per_s": learner_updates_per_s,
        "decode_threads": decode_threads,
        "batch_bytes": batch_bytes,
        "results": results,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "device_name": (
                torch.cuda.get_device_name(target) if target.type == "cuda" else platform.machine()
            ),
        },
    }
    progress(format_table(report))
    return report


def _measure(
    sampler: Any, device: Any, batches: int, warmup: int, rate: float
) -> tuple[dict[str, Any], int]:
    """Unpaced then paced consumption of ``batches`` batches; returns the row
    and the bytes of one batch."""
    for _ in range(warmup):
        _upload(sampler.next().sampled.batch.arrays(), device)
    waits = uploads = 0.0
    size = 0
    start = time.perf_counter()
    for _ in range(batches):
        before = time.perf_counter()
        arrays = sampler.next().sampled.batch.arrays()
        got = time.perf_counter()
        _upload(arrays, device)
        waits += got - before
        uploads += time.perf_counter() - got
        size = sum(a.nbytes for a in arrays.values())
    elapsed = time.perf_counter() - start
    delivered = batches / elapsed

    paced_wait = 0.0
    start = time.perf_counter()
    for _ in range(batches):
        before = time.perf_counter()
        arrays = sampler.next().sampled.batch.arrays()
        paced_wait += time.perf_counter() - before
        _upload(arrays, device)
        time.sleep(1.0 / rate)  # the update's device time; the host's CPU is free
    paced = time.perf_counter() - start
    return {
        "batches_per_s": delivered,
        "consumer_wait_share": waits / elapsed,
        "upload_ms_mean": 1000 * uploads / batches,
        "learner_wait_share": paced_wait / paced,
        "learner_updates_per_s_achieved": batches / paced,
        "learner_wait_share_estimate": max(0.0, 1.0 - delivered / rate),
    }, size


def _upload(arrays: dict[str, np.ndarray], device: Any) -> None:
    """The batch as torch tensors on ``device``: zero-copy on CPU; on CUDA
    through pinned host memory with asynchronous copies, then synchronized."""
    import torch

    with warnings.catch_warnings():  # arrays from Ray's object store are read-only
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensors = [torch.from_numpy(value) for value in arrays.values()]
    if device.type != "cuda":
        for tensor in tensors:
            tensor.to(device)
        return
    for tensor in tensors:
        tensor.pin_memory().to(device, non_blocking=True)
    torch.cuda.synchronize(device)


def _shipped_per_row(shards: Sequence[Any], method: str, rows: int = 64) -> float:
    """Bytes per sampled row that cross Ray's object store when ``method``
    (``sample`` or ``sample_compressed``) answers, from one sample of ``rows``
    of the first shard (its serialized size)."""
    import ray

    reply = ray.get(getattr(shards[0], method).remote(rows))
    return len(ray.cloudpickle.dumps(reply)) / rows


class _SizeThenSampleSampler:
    """The baseline sampler protocol (the learner's before the pipelined
    :class:`ReplaySampler`): a background thread asks every shard its size,
    then samples them in proportion, one batch in flight, into a queue of
    ``prefetch`` ready batches. Only :meth:`next` and :meth:`close` of
    :class:`ReplaySampler`'s API."""

    def __init__(
        self, shards: Sequence[Any], batch_size: int, prefetch: int, timeout_s: float
    ) -> None:
        self._shards = list(shards)
        self._batch_size = batch_size
        self._timeout_s = timeout_s
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._fill, name="size-then-sample-prefetch", daemon=True
        )
        self._thread.start()

    def next(self) -> Any:
        item = self._queue.get(timeout=self._timeout_s)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)

    def _fill(self) -> None:
        import ray

        from buffer_service.ray_actor import ShardedSample, concatenate, split_proportionally

        while not self._stop.is_set():
            item: Any
            try:
                sizes = ray.get([s.size.remote() for s in self._shards], timeout=self._timeout_s)
                counts = split_proportionally(self._batch_size, sizes)
                refs = [
                    (i, self._shards[i].sample.remote(n)) for i, n in enumerate(counts) if n > 0
                ]
                parts = ray.get([ref for _, ref in refs], timeout=self._timeout_s)
                item = ShardedSample(
                    sampled=concatenate(parts),
                    shard_index=np.concatenate(
                        [np.full(p.ids.shape[0], i) for (i, _), p in zip(refs, parts, strict=True)]
                    ),
                )
            except BaseException as exc:  # handed to next()
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return


def format_table(report: dict[str, Any]) -> str:
    """The rows of a ``bench pipeline`` report as a text table."""
    rate = report["learner_updates_per_s"]
    lines = [
        f"learner feed, batch {report['batch_size']} ({report['batch_bytes'] / 1e6:.1f} MB), "
        f"prefetch {report['prefetch']}, device {report['device']}, learner at {rate:g} updates/s",
        f"{'shards':>6} {'sampler':<16} {'batches/s':>10} {'MB/s':>8} {'vs baseline':>11} "
        f"{'upload ms':>9} {'learner waits':>13} {'estimate':>8}",
    ]
    for row in report["results"]:
        lines.append(
            f"{row['shards']:>6} {row['sampler']:<16} {row['batches_per_s']:>10.1f} "
            f"{row['mb_per_s']:>8.0f} {row['speedup_vs_baseline']:>10.2f}x "
            f"{row['upload_ms_mean']:>9.2f} {100 * row['learner_wait_share']:>12.0f}% "
            f"{100 * row['learner_wait_share_estimate']:>7.0f}%"
        )
    return "\n".join(lines)

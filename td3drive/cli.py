"""The ``td3drive`` command line.

Subcommands so far:

* ``td3drive bench learner``: TD3 updates/s against a plain-PyTorch reference.

Heavy imports (torch) happen inside the subcommand, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="td3drive",
        description="Distributed TD3 from pixels on Ray: train, evaluate and benchmark "
        "a driving agent whose CNN encoders learn through the actor and critic losses.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = commands.add_parser(
        "bench",
        help="measure a component against its baseline, side by side",
        description="Benchmarks print their figures and can write them as JSON.",
    )
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    learner = benches.add_parser(
        "learner",
        help="TD3 updates/s (separate and shared encoders) vs a plain-PyTorch reference loop",
        description="Measures TD3Learner.update() throughput for the 'separate' and "
        "'shared' encoder modes at each batch size, and in the same run a minimal TD3 "
        "loop in plain PyTorch with the same networks. overhead_ratio = ours / reference "
        "('separate', largest batch); 1.0 means the learner's validation, clipping and "
        "metrics cost nothing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    learner.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    learner.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="cpu", help="torch device"
    )
    learner.add_argument(
        "--batch-size",
        type=_positive_int,
        nargs="+",
        default=[100, 256],
        metavar="N",
        help="batch sizes to measure",
    )
    learner.add_argument(
        "--updates", type=_positive_int, default=32, help="timed updates per row and side"
    )
    learner.add_argument("--warmup", type=int, default=3, help="untimed updates before timing")
    learner.set_defaults(handler=_bench_learner)
    return parser


def _bench_learner(args: argparse.Namespace) -> int:
    from learner.benchmark import run_learner_benchmark

    rounds = min(16, args.updates)
    print(
        f"bench learner: device={args.device} batch sizes={args.batch_size} "
        f"updates={args.updates} per row and side (interleaved in {rounds} rounds)",
        file=sys.stderr,
        flush=True,
    )
    report = run_learner_benchmark(
        device=args.device,
        batch_sizes=args.batch_size,
        updates=args.updates,
        warmup=args.warmup,
        rounds=rounds,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``td3drive`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:  # e.g. --device cuda without a GPU
        print(f"td3drive: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

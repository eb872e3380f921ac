"""argparse value types shared by the command line and the benchmarks' options."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1.

    Raises:
        argparse.ArgumentTypeError: a smaller value (``ValueError`` when not an integer).
    """
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_int_list(text: str) -> list[int]:
    """Comma-separated integers, each >= 1 (``"1,2"`` -> ``[1, 2]``).

    Raises:
        argparse.ArgumentTypeError: not integers, none, or one below 1.
    """
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        message = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values

"""argparse ``type=`` converters shared by every sub-command (bad values -> one-line usage error).

``float("nan")`` and ``float("inf")`` parse, so a plain ``type=float`` lets ``--mpp nan`` through to
a traceback deep in a stage; these refuse non-finite values at the command line (exit 2).
"""

from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """A finite float (``nan``/``inf`` refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0 (µm/px, sizes)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def nonnegative_float(text: str) -> float:
    """A finite float >= 0 (rates, weights, distances that may be off)."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def config_type(name: str, default):
    """The converter for a config dataclass field ``name`` with default ``default`` (CLI flags built
    from pipeline/config.py): floats are finite, ``*mpp`` ones positive, the others >= 0."""
    if isinstance(default, float):
        return positive_float if name.endswith("mpp") else nonnegative_float
    return type(default)

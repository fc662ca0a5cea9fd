"""Parse-time argument types of the command lines (recctl's, and the control plane's settings flags in
control/settings.py): each refuses a bad value with ``argparse.ArgumentTypeError`` naming the rule, so the
parser reports it before anything runs. recctl imports them through control/api/cli_output.py.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path


def _number(kind: type, lo: float | None, hi: float | None, what: str, zero_ok: bool = False) -> Callable:
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        if zero_ok and v == 0:
            return v
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return v

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def int_range(lo: int | None = None, hi: int | None = None, unit: str = "", zero_ok: bool = False) -> Callable:
    return _number(int, lo, hi, _what("an integer", lo, hi, unit, zero_ok), zero_ok)


def float_range(lo: float | None = None, hi: float | None = None, unit: str = "") -> Callable:
    return _number(float, lo, hi, _what("a number", lo, hi, unit, False))


def _what(noun: str, lo, hi, unit: str, zero_ok: bool) -> str:
    u = f" {unit}" if unit else ""
    if lo is not None and hi is not None:
        rng = f"{lo:g}..{hi:g}"
        return f"{noun} within {rng}{u}" + (" or 0" if zero_ok else "")
    if lo is not None:
        return f"{noun} >= {lo:g}{u}" + (" or 0" if zero_ok else "")
    if hi is not None:
        return f"{noun} <= {hi:g}{u}"
    return noun + u


port = int_range(1, 65535)
port.__name__ = "port"
positive_seconds = float_range(0.001, None, "seconds")


def percent_list(text: str) -> list[int]:
    """``10,50,100`` -> [10, 50, 100]; every item an integer percentage 1..100."""
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        steps = []
    if not steps or any(not 1 <= s <= 100 for s in steps):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of percentages 1..100")
    return steps


def existing_file(text: str) -> Path:
    p = Path(text).expanduser()
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: no such file" if not p.exists() else f"{text!r} is not a file")
    return p


def existing_dir(text: str) -> Path:
    p = Path(text).expanduser()
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: no such directory" if not p.exists() else
                                         f"{text!r} is not a directory")
    return p


def nonempty(what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return text

    parse.__name__ = what
    return parse


model_name = nonempty("a model name")
instance_id = nonempty("an instance id")

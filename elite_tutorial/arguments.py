"""argparse types shared by the commands: each refuses a bad value with a message that names it,
before anything loads or runs."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def whole_number(minimum: int, why: str = ""):
    """An argparse type: a whole number at least `minimum` (`why`, if given, is added to the error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}{why}")
        return value
    return parse


def finite_number(minimum: float = 0.0, above: bool = False, maximum: float = math.inf):
    """An argparse type: a finite number >= `minimum` (> with `above`) and <= `maximum`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        low_ok = value > minimum if above else value >= minimum
        if not (math.isfinite(value) and low_ok and value <= maximum):
            bound = f"{'above' if above else 'at least'} {minimum:g}" + (f" and at most {maximum:g}" if maximum < math.inf else "")
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, not {text}")
        return value
    return parse


def writable_file(text: str) -> Path:
    """An argparse type: a file path that can be written (its folder exists or can be made, and is no
    file), checked before a long run rather than after it."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name (e.g. {path / 'results.json'})")
    folder = next((p for p in path.absolute().parents if p.exists()), None)
    if folder is None or not folder.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: {folder} is not writable")
    return path


def path_argument(value, name: str, what: str = "a file or folder") -> Path:
    """`value` (a str or os.PathLike) as a Path; anything else, or an empty path, is refused naming
    `name` and what it takes (not with pathlib's "expected str, bytes or os.PathLike")."""
    if isinstance(value, (str, os.PathLike)):
        if os.fspath(value) == "":
            raise ValueError(f"{name} is an empty path; give the path of {what}.")
        return Path(value)
    raise TypeError(f"{name} must be the path of {what} (a str or pathlib.Path), not {type(value).__name__} {value!r}.")

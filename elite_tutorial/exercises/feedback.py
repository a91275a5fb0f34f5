"""Feedback a student can act on: what a check found wrong, said in words, never a bare AssertionError."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch


class ExerciseFailed(AssertionError):
    """A check's verdict on a student's answer: the message says what differs and gives a hint.

    An AssertionError, so that nbgrader's autograder (and pytest) count it as a failed test."""


def attempt(name: str, function: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call the student's `function`; a stub still in place or a crash becomes an `ExerciseFailed`."""
    if not callable(function):
        raise ExerciseFailed(f"{name}: the check needs your function, got {type(function).__name__}.")
    try:
        return function(*args, **kwargs)
    except NotImplementedError:
        raise ExerciseFailed(f"{name}: not written yet. Replace `raise NotImplementedError()` with your code.") from None
    except ExerciseFailed:
        raise
    except Exception as error:  # the student's bug: say where it is, keep the traceback for them
        raise ExerciseFailed(f"{name}: your function raised {type(error).__name__}: {error}") from error


def _as_tensor(name: str, value: Any, what: str) -> torch.Tensor:
    if value is None:
        raise ExerciseFailed(f"{name}: {what} is None. Did the function end without `return`?")
    try:
        return torch.as_tensor(np.asarray(value) if isinstance(value, (list, tuple)) else value).detach().cpu().double()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ExerciseFailed(f"{name}: {what} should be a tensor, got {type(value).__name__} ({error}).") from None


def expect_close(name: str, got: Any, expected: Any, hint: str, what: str = "the result",
                 atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Raise `ExerciseFailed` unless `got` has `expected`'s shape and values (to atol + rtol·|expected|).

    The message names the first thing that differs: the shape, a NaN, or how many values differ,
    the largest difference and where, with the two values; then the hint."""
    got, expected = _as_tensor(name, got, what), _as_tensor(name, expected, "the expected value")
    if got.shape != expected.shape:
        raise ExerciseFailed(f"{name}: {what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}. Hint: {hint}")
    if not torch.isfinite(got).all():
        raise ExerciseFailed(f"{name}: {what} contains NaN or inf ({int((~torch.isfinite(got)).sum())} values). Hint: {hint}")
    difference = (got - expected).abs()
    wrong = difference > atol + rtol * expected.abs()
    if wrong.any():
        flat = int(difference.argmax())
        where = tuple(int(i) for i in np.unravel_index(flat, tuple(got.shape))) if got.dim() else ()
        raise ExerciseFailed(
            f"{name}: {int(wrong.sum())} of {got.numel()} values of {what} differ from the expected; the largest "
            f"difference is {float(difference.max()):.4g} at index {where} (yours {float(got.flatten()[flat]):.6g}, "
            f"expected {float(expected.flatten()[flat]):.6g}). Hint: {hint}")


def expect(name: str, condition: bool, message: str, hint: str) -> None:
    """Raise `ExerciseFailed` with `message` and `hint` unless `condition`."""
    if not condition:
        raise ExerciseFailed(f"{name}: {message} Hint: {hint}")


def passed(name: str, detail: str = "") -> None:
    """Tell the student the exercise is done."""
    print(f"✓ {name}: correct{'. ' + detail if detail else '.'}")

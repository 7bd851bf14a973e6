"""Timing that measures the work: warm-up, device synchronisation, median of repeats.

A GPU runs work asynchronously, so a timer must synchronise before reading the clock; the first
calls pay for allocation, kernel selection and caches, so they are run and discarded first.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from tqdm.std import tqdm as tqdm_std

from .devices import synchronize

T = TypeVar("T")


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def under_autograder() -> bool:
    """True while nbgrader runs the notebook (``nbgrader autograde``, or Validate).

    nbgrader sets the ``NBGRADER_EXECUTION`` environment variable to ``"autograde"`` or ``"validate"``
    for exactly that purpose (nbgrader docs, FAQ: "Can I modify the notebook behavior during
    autograding or validation?"). Timing cells grade nothing, so they time a short run there: a class
    of submissions is graded in minutes instead of hours.
    """
    return bool(os.environ.get("NBGRADER_EXECUTION"))


@dataclass
class Timing:
    """Seconds per call over ``repeats`` runs."""

    times: list[float] = field(default_factory=list)

    def _checked(self) -> list[float]:
        if not self.times:
            raise ValueError("this Timing holds no times yet: time something first (time_it(fn, repeats=5))")
        return self.times

    @property
    def median(self) -> float:
        return statistics.median(self._checked())

    @property
    def min(self) -> float:
        return min(self._checked())

    @property
    def max(self) -> float:
        return max(self._checked())

    def __str__(self) -> str:
        return f"{self.median * 1e3:.2f} ms (median of {len(self.times)}, {self.min * 1e3:.2f}-{self.max * 1e3:.2f})"


def time_it(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1,
            device: torch.device | str = "cpu") -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (synchronised on ``device``: pass the
    model's, e.g. ``model.device``, or a GPU's queued work is not waited for)."""
    if not callable(fn):
        raise TypeError(f"time_it times a function of no arguments, got {type(fn).__name__} {fn!r}")
    _check_count("repeats", repeats, 1)
    _check_count("warmup", warmup, 0)
    synchronize(device)  # an unknown device fails before anything runs
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = Timing()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.times.append(time.perf_counter() - t0)
    return out


class StepTimer:
    """Per-step wall times inside a loop: ``with timer.step(): ...``."""

    def __init__(self, device: torch.device | str = "cpu"):
        synchronize(device)  # an unknown device fails here, not at the first step
        self.device = device
        self.times: list[float] = []

    def step(self):
        timer = self

        class _Ctx:
            def __enter__(self):
                synchronize(timer.device)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                synchronize(timer.device)
                timer.times.append(time.perf_counter() - self.t0)

        return _Ctx()


def progress(iterable: Iterable[T] | None = None, **kwargs) -> tqdm_std[T]:
    """A text progress bar on stdout, for notebooks and terminals alike.

    ``tqdm.auto`` draws a Jupyter widget, which a saved notebook cannot redraw when it is reopened
    ("Error displaying widget: model not found"), and plain ``tqdm`` writes to stderr, which nbgrader
    counts against a test cell. This one is text on stdout: it survives save and reopen.
    """
    if iterable is not None and not hasattr(iterable, "__iter__"):
        raise TypeError(f"progress wraps an iterable (e.g. range({iterable!r})), got {type(iterable).__name__} "
                        f"{iterable!r}")
    total = kwargs.get("total")
    if total is not None and (isinstance(total, bool) or not isinstance(total, (int, float)) or total < 0):
        raise ValueError(f"total must be a number of items >= 0 (or None), got {total!r}")
    kwargs.setdefault("file", sys.stdout)
    kwargs.setdefault("dynamic_ncols", False)
    kwargs.setdefault("ncols", 90)
    return tqdm_std(iterable, **kwargs)

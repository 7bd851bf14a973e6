"""The measurement: a clock reading after every token, rounds, medians, spreads, and unreliable rows.

**TTFT and decode from the same call.** A timed call reads the clock when it starts (t0, the device
synchronised), after each new token (tick_1 .. tick_N) and when it returns (t_end, synchronised). Per
round::

    TTFT             = tick_1 - t0                 prompt + first token (with the call's set-up)
    decode per token = (tick_N - tick_1) / (N - 1)  the N - 1 decode steps
    total            = t_end - t0

Each is a difference of two readings of one monotonic clock, the later minus the earlier, in one call:
it cannot be negative. (An earlier design took decode as (t(N) - t(1)) / (N - 1) from two separate
calls; when load slowed the 1-token call by more than the N - 1 steps cost, it went negative, and
tokens/s infinite.) A figure can still be zero (a clock coarser than a step) or not finite (a broken
clock): a figure that is not a positive finite number is *missing*: ``None`` in ``bench.json`` with
the reason under ``"missing"``, "n/a" in the tables with the reason in the notes column; so is every
figure derived from it. Never a number.

The clock: ``now`` (``time.perf_counter``, monotonic; a test swaps in a fake one) on the CPU, well
under a microsecond a reading; on CUDA, CUDA events recorded on the stream after each token (in
stream order, so non-decreasing too) and read after the call, so the host never waits for the device
inside a call, as untimed; on MPS a synchronize per token, then ``now``. The same readings give the
per-step plot.

**Rounds.** Each method makes one timed call per round; reported: the median over the rounds, and
the spread (max - min) / median.

**Unreliable rows.** A row is marked unreliable (``"unreliable": true`` with ``"unreliable_reasons"``
in ``bench.json``; "unreliable: ..." in the tables' notes column) when

- its decode or TTFT spread over the rounds is above ``SPREAD_LIMIT_PCT`` (25 %), or a round's figure
  was missing; with a single round there is no spread, and the notes say so;
- or the machine was busy (``busy_reason``): the 1-minute load average is read at the start and end of
  the run and of each model-and-prompt case; less the benchmark's own torch threads (for readings
  taken once it is running: an estimate), it must not exceed the cores the benchmark leaves free plus
  ``LOAD_MARGIN`` (0.5). With 2 threads on 2 cores: any other job using over half a core.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..devices import synchronize

now: Callable[[], float] = time.perf_counter  # the host clock of every timing (a test swaps in a fake one)
SPREAD_LIMIT_PCT = 25.0  # a row whose (max - min) / median over the rounds is above this is unreliable
LOAD_MARGIN = 0.5  # load (runnable processes) beyond the cores the benchmark leaves free, tolerated


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call, device synchronised before and after (>= 0: one monotonic clock, read in order)."""
    synchronize(device)
    t0 = now()
    fn()
    synchronize(device)
    return now() - t0


class CallClock:
    """Clock readings of one generation call: ``start()``, ``tick()`` after each new token, ``stop()``.

    ``elapsed()`` gives the seconds from the start to each tick, and to the stop. On CUDA every reading
    is a CUDA event recorded on the device's current stream, so a tick costs no host-device sync, and
    the events complete in stream order; elsewhere ``now()`` (after a synchronize on MPS).
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.events = self.device.type == "cuda"
        self.marks: list = []
        self.start_mark = self.end_mark = None

    def _mark(self):
        if self.events:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            return ev
        if self.device.type != "cpu":
            synchronize(self.device)
        return now()

    def start(self) -> None:
        synchronize(self.device)
        self.marks = []
        self.start_mark = self._mark()

    def tick(self) -> None:
        self.marks.append(self._mark())

    def stop(self) -> None:
        self.end_mark = self._mark()
        synchronize(self.device)

    def _since_start(self, mark) -> float:
        if self.events:
            return self.start_mark.elapsed_time(mark) / 1e3  # ms -> s
        return mark - self.start_mark

    def elapsed(self) -> tuple[list[float], float]:
        """(seconds from the start to each tick, seconds from the start to the stop)."""
        return [self._since_start(m) for m in self.marks], self._since_start(self.end_mark)


def positive(x: float | None, what: str) -> tuple[float | None, str | None]:
    """``(x, None)`` if x is a positive finite number, else ``(None, why)``: a figure that is not is missing."""
    if x is None:
        return None, f"{what}: not measured"
    if not math.isfinite(x):
        return None, f"{what} is not finite (a broken clock)"
    if x < 0:
        return None, f"{what} came out negative (the clock went backwards)"
    if x == 0:
        return None, f"{what} came out zero (the clock did not advance)"
    return x, None


@dataclass
class CallTimes:
    """One timed call of N new tokens: seconds from its start to each new token (``ticks``), and to its return."""

    ticks: list[float]
    end: float

    def figures(self, n: int) -> dict:
        """TTFT, decode per token and total of this call (seconds), ``None`` where missing, with ``why``."""
        why: dict[str, str] = {}
        total, why["total"] = positive(self.end, "total time of the call")
        if len(self.ticks) != n:
            reason = (f"{len(self.ticks)} clock readings for {n} new tokens (the method reports no per-token "
                      f"clock)" if self.ticks else "the method reports no per-token clock")
            return {"ttft": None, "decode": None, "total": total,
                    "why": {"ttft": reason, "decode": reason, "total": why["total"]}}
        ttft, why["ttft"] = positive(self.ticks[0], "TTFT (first token - start)")
        decode, why["decode"] = positive((self.ticks[-1] - self.ticks[0]) / (n - 1),
                                         "decode per token ((token N - token 1) / (N - 1))")
        return {"ttft": ttft, "decode": decode, "total": total, "why": why}

    def step_ms(self) -> list[float] | None:
        """Milliseconds of each step (step 0: prompt + first token), or None if the readings are unusable."""
        if not self.ticks:  # a method without a per-token clock (a test's stand-in) gets no plot line
            return None
        ms = [(b - a) * 1e3 for a, b in zip([0.0, *self.ticks[:-1]], self.ticks, strict=True)]
        return ms if all(math.isfinite(x) and x >= 0 for x in ms) else None


def over_rounds(values: list[float | None], whys: list[str | None], what: str) -> dict:
    """Median and spread of one figure over the rounds; a missing round is dropped and noted.

    Returns ``value`` (median, or None), ``missing`` (why None), ``spread_pct`` ((max - min) / median
    * 100, or None), ``spread_note`` (why no spread) and ``unreliable`` (reasons).
    """
    ok = [v for v in values if v is not None]
    out = {"value": None, "missing": None, "spread_pct": None, "spread_note": None, "unreliable": []}
    if not ok:
        out["missing"] = next((w for w in whys if w), f"{what}: not measured")
        return out
    out["value"] = med = statistics.median(ok)
    if len(ok) < len(values):
        dropped = next(w for v, w in zip(values, whys, strict=True) if v is None)
        out["unreliable"].append(f"{what}: {len(values) - len(ok)} of {len(values)} rounds missing ({dropped})")
    if len(ok) < 2:
        out["spread_note"] = f"{what}: one round, no spread"
    else:
        out["spread_pct"] = spread = (max(ok) - min(ok)) / med * 100
        if spread > SPREAD_LIMIT_PCT:
            out["unreliable"].append(f"{what} spread {spread:.0f}% over {len(ok)} rounds > {SPREAD_LIMIT_PCT:.0f}%")
    return out


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages, or None where the system has none."""
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


def busy_reason(readings: list[tuple[str, list[float] | None, int]], cpus: int, threads: int) -> str | None:
    """Why the machine counts as busy, or None. ``readings``: (when, load averages, own threads then).

    Others' load = 1-minute load average - the benchmark's own threads running at that reading (0
    before it starts timing, ``threads`` after: an estimate). Busy when it exceeds the cores the
    benchmark leaves free plus ``LOAD_MARGIN``.
    """
    allowed = max(cpus - threads, 0) + LOAD_MARGIN
    known = [(when, load[0], own) for when, load, own in readings if load]
    if not known:
        return None
    when, load1, own = max(known, key=lambda r: r[1] - r[2])
    if load1 - own <= allowed:
        return None
    return (f"machine busy: 1-min load average {load1:.1f} {when}, {load1 - own:.1f} beyond the benchmark's own "
            f"{own} thread(s), limit {allowed:.1f} ({cpus} cores, {threads} timed)")


def timed_call(run: Callable[..., torch.Tensor], n: int, device: torch.device) -> tuple[torch.Tensor, CallTimes]:
    """One call of ``run(n, tick)``, the clock read at its start, after each new token and at its return."""
    clock = CallClock(device)
    clock.start()
    out = run(n, clock.tick)
    clock.stop()
    return out, CallTimes(*clock.elapsed())


def method_figures(calls: list[CallTimes], n: int, floor_s: float | None, floor_why: str | None,
                   busy: str | None) -> dict:
    """One method's row from its timed calls: medians over the rounds, spreads, what is missing and why,
    and whether the row is unreliable (spread above ``SPREAD_LIMIT_PCT``, a missing round, a busy machine)."""
    per_round = [c.figures(n) for c in calls]
    col = {k: over_rounds([f[k] for f in per_round], [f["why"][k] for f in per_round], name)
           for k, name in (("ttft", "TTFT"), ("decode", "decode"), ("total", "total"))}
    missing: dict[str, str] = {}

    def keep(key, value, why):
        if value is not None:  # positive and finite by construction; checked again, never printed otherwise
            value, why = positive(value, key)
        if value is None:
            missing[key] = why
        return value

    ttft, dec, tot = (col[k]["value"] for k in ("ttft", "decode", "total"))
    row = {
        "ttft_ms": keep("ttft_ms", ttft and ttft * 1e3, col["ttft"]["missing"]),
        "decode_ms_per_token": keep("decode_ms_per_token", dec and dec * 1e3, col["decode"]["missing"]),
        "decode_tokens_per_s": keep("decode_tokens_per_s", dec and 1.0 / dec, f"decode time missing: "
                                                                               f"{col['decode']['missing']}"),
        "total_s": keep("total_s", tot, col["total"]["missing"]),
        "spread_pct": col["decode"]["spread_pct"],
        "ttft_spread_pct": col["ttft"]["spread_pct"],
    }
    if dec is None:
        row["bandwidth_floor_fraction"] = keep("bandwidth_floor_fraction", None,
                                               f"decode time missing: {col['decode']['missing']}")
    else:
        row["bandwidth_floor_fraction"] = keep("bandwidth_floor_fraction", floor_s and floor_s / dec, floor_why)
    for key, k in (("spread_pct", "decode"), ("ttft_spread_pct", "ttft")):
        if row[key] is None:
            missing[key] = col[k]["spread_note"] or col[k]["missing"]
    reasons = col["ttft"]["unreliable"] + col["decode"]["unreliable"]  # total = TTFT + decode: nothing new
    if busy:
        reasons.append(busy)
    row.update({
        "rounds": [{"ttft_s": f["ttft"], "decode_s_per_token": f["decode"], "total_s": f["total"]}
                   for f in per_round],
        "missing": missing, "unreliable": bool(reasons), "unreliable_reasons": reasons,
    })
    return row


def compare_to_reference(res: dict[str, dict], reference: str) -> None:
    """Add ``speed_vs_hf_cache_decode`` / ``_total`` (reference time / this time) to every row, or say why not."""
    ref = res[reference]
    for name, r in res.items():
        for key, fig in (("speed_vs_hf_cache_decode", "decode_ms_per_token"), ("speed_vs_hf_cache_total", "total_s")):
            mine, theirs = r[fig], ref[fig]
            if mine is not None and theirs is not None:
                r[key], why = positive(theirs / mine, key)
            else:
                whose = name if mine is None else reference
                r[key], why = None, f"{fig} of {whose} missing: {res[whose]['missing'].get(fig)}"
            if r[key] is None:
                r["missing"][key] = why


ROW_FIGURES = ("ttft_ms", "decode_ms_per_token", "decode_tokens_per_s", "total_s", "bandwidth_floor_fraction",
               "spread_pct", "ttft_spread_pct")


def unavailable_row(reason: str) -> dict:
    """The row of a method that cannot run here: every figure missing, with ``reason``; not timed, so
    neither reliable nor unreliable (``unavailable`` says why)."""
    return {**dict.fromkeys(ROW_FIGURES), "rounds": [], "missing": dict.fromkeys(ROW_FIGURES, reason),
            "unreliable": False, "unreliable_reasons": [], "unavailable": reason}

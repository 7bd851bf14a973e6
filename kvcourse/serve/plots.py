"""Pictures of a serving run (notebook 09), drawn from ``Engine.stats.history`` and the ``RequestOutput``s.

- ``timeline``: a Gantt chart, one row per request, one column per engine step: waiting, prefill chunk,
  decode, and the steps where the request was preempted;
- ``blocks_over_steps``: running and waiting requests, and used and free blocks, step by step;
- ``latency_histograms``: time to first token and time per output token, over the requests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

_COLORS = {"waiting": "0.85", "prefill": "tab:orange", "decode": "tab:blue", "preempted": "tab:red"}


def _check_history(history) -> None:
    if not isinstance(history, Sequence) or not history:
        raise ValueError("pass engine.stats.history: a non-empty list of StepRecord (run the engine first)")
    for name in ("step", "requests", "preempted", "num_used_blocks", "num_free_blocks"):
        if not hasattr(history[0], name):
            raise TypeError(f"history entries must be kvcourse.serve StepRecord, got {type(history[0]).__name__} "
                            f"without .{name}")


def request_states(history, outputs: Mapping | None = None) -> dict[str, list[str | None]]:
    """For each request, its state at every step: 'prefill', 'decode', 'waiting', 'preempted' or None.

    A request is waiting from the step it arrived (the first step at or after its ``arrival_time``, when
    ``outputs`` gives it; else from step 1) until it is first scheduled, and again after each preemption until
    it runs again. Between two scheduled steps without a preemption it is running but got no token (the
    budget ran out): ``None``, drawn empty.
    """
    _check_history(history)
    n = len(history)
    rows: dict[str, list[str | None]] = {}
    for i, rec in enumerate(history):
        for rid, _, kind in rec.requests:
            rows.setdefault(rid, [None] * n)[i] = kind
        for rid in rec.preempted:
            rows.setdefault(rid, [None] * n)[i] = "preempted"
    for rid, states in rows.items():
        arrive = 0
        if outputs is not None and rid in outputs:
            t = outputs[rid].arrival_time
            arrive = next((i for i, rec in enumerate(history) if rec.time >= t), 0)
        waiting = True  # from arrival until first scheduled
        for i in range(arrive, n):
            s = states[i]
            if s == "preempted":
                waiting = True
            elif s in ("prefill", "decode"):
                waiting = False
            elif waiting:
                states[i] = "waiting"
        last = max((i for i, s in enumerate(states) if s in ("prefill", "decode")), default=-1)
        for i in range(last + 1, n):  # finished: nothing after its last step
            if states[i] == "waiting":
                states[i] = None
    return rows


def timeline(history, outputs: Mapping | None = None, *, ax=None, max_requests: int = 40, title: str = ""):
    """Gantt chart of a run: one row per request (first admitted at the top), one column per step."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = request_states(history, outputs)
    order = sorted(rows, key=lambda r: next(i for i, s in enumerate(rows[r]) if s in ("prefill", "decode",
                                                                                        "preempted", "waiting")))
    order = order[:max_requests]
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 0.25 * len(order) + 1.2))
    for y, rid in enumerate(order):
        for kind in _COLORS:
            xs = [i + 1 for i, s in enumerate(rows[rid]) if s == kind]
            if xs:
                ax.broken_barh([(x - 0.5, 1) for x in xs], (y - 0.4, 0.8), color=_COLORS[kind], linewidth=0)
    ax.set_yticks(range(len(order)), order, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("engine step")
    ax.set_xlim(0.5, len(history) + 0.5)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in _COLORS.items()], fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title or "each request, step by step")
    return ax


def blocks_over_steps(history, num_blocks: int, *, axes=None):
    """Two panels: running and waiting requests per step; used and free blocks per step (of ``num_blocks``)."""
    import matplotlib.pyplot as plt

    _check_history(history)
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3))
    steps = [r.step for r in history]
    axes[0].plot(steps, [r.num_running for r in history], label="running")
    axes[0].plot(steps, [r.num_waiting for r in history], label="waiting")
    axes[0].set_ylabel("requests")
    axes[1].stackplot(steps, [r.num_used_blocks for r in history], [r.num_free_blocks for r in history],
                      labels=["used blocks", "free blocks"], colors=["tab:blue", "0.85"])
    axes[1].set_ylim(0, num_blocks)
    axes[1].set_ylabel(f"blocks (of {num_blocks})")
    pre = [r.step for r in history if r.preempted]
    if pre:
        axes[1].plot(pre, [num_blocks] * len(pre), "v", color="tab:red", label="preemption")
    for a in axes:
        a.set_xlabel("engine step")
        a.legend(fontsize=8)
        a.grid(True, alpha=0.3)
    return axes


def latency_histograms(outputs: Mapping, *, axes=None, bins: int = 20):
    """Histograms of time to first token (one per request) and time per output token (every gap)."""
    import matplotlib.pyplot as plt

    outs = [o for o in outputs.values() if o.finish_reason != "error"]
    if not outs:
        raise ValueError("latency_histograms: no finished request among the outputs")
    ttft = [1e3 * o.ttft for o in outs if o.ttft is not None]
    tpot = [1e3 * g for o in outs for g in o.inter_token_times]
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3))
    for ax, values, color, label in ((axes[0], ttft, "tab:orange", "time to first token (ms)"),
                                     (axes[1], tpot, "tab:blue", "time per output token (ms)")):
        ax.hist(values, bins=bins, color=color)
        ax.set_xlabel(label)
        ax.set_ylabel("count")
        if values:
            for q, style in ((50, "-"), (95, "--")):
                ax.axvline(percentile(values, q), color="black", linestyle=style, linewidth=1, label=f"p{q}")
            ax.legend(fontsize=8)
    return axes


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation, as numpy's default."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of an empty list: no values")
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


__all__ = ["request_states", "timeline", "blocks_over_steps", "latency_histograms", "percentile"]

"""kvcourse.bench: rows printed as they finish, the presets (--gpu-quick), methods that cannot run here,
and the batch sweep. Every figure checked here comes from a fake clock; no test asserts a measured time.

Each test is named after the bug it guards against.
"""

import json
import math
import re
import subprocess
import sys

import pytest
import torch

from kvcourse import bench

NEGATIVE_NUMBER = re.compile(r"(?<![\w.])-\d")  # "-39.73", not "SmolLM2-135M"
NOT_FINITE = re.compile(r"\b(inf|nan)\b", re.IGNORECASE)
FAKE = ["--device", "cpu", "--models", "bundled", "--prompts", "short", "--new-tokens", "4", "--repeats", "2",
        "--bandwidth-mib", "1", "--cache-lengths", "1", "--no-progress"]


class FakeClock:
    """``bench.measure.now`` for tests: time moves only when a stand-in generator says so."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def stand_in(clock: FakeClock, name: str, events: list | None = None, step_s=lambda batch: 0.001):
    """A stand-in generator for method ``name``: each token takes ``step_s(batch)`` fake seconds; every call
    is logged in ``events`` as ("call", name, timed)."""

    def factory(ctx):
        ids = ctx["ids"]

        def run(n, tick=None):
            if events is not None:
                events.append(("call", name, tick is not None))
            for _ in range(n):
                clock.t += step_s(ids.shape[0])
                if tick is not None:
                    tick()
            return torch.cat([ids, torch.zeros(ids.shape[0], n, dtype=ids.dtype)], dim=1)  # the same for all

        return bench.Runner("", run)

    return factory


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(bench.measure, "now", c)
    return c


def test_a_row_was_printed_only_with_the_tables_at_the_end(tmp_path, monkeypatch, capsys, clock):
    events: list = []
    monkeypatch.setattr(bench.methods, "RUNNERS", {m: stand_in(clock, m, events) for m in bench.METHODS})
    monkeypatch.setattr(bench.harness, "say", lambda line: events.append(("say", line)))
    bench.run(bench.make_plan(bench.parse_args([*FAKE, "--out", str(tmp_path)])), tmp_path, progress=False)
    capsys.readouterr()

    timed = [i for i, e in enumerate(events) if e[0] == "call" and e[2]]
    last_round = timed[-len(bench.METHODS):]
    assert sorted(events[i][1] for i in last_round) == sorted(bench.METHODS)
    for i in last_round:  # right after a method's last timed call, before the next method runs: its line
        kind, line = events[i + 1]
        label = bench.METHODS[events[i][1]][0]
        assert kind == "say" and f"| {label}: " in line, (events[i], events[i + 1])
        assert "decode 1.00 ms/token" in line and "1000 tokens/s" in line and "spread 0%" in line, line
        assert not NEGATIVE_NUMBER.search(line) and not NOT_FINITE.search(line), line
    first_call = next(i for i, e in enumerate(events) if e[0] == "call")
    assert events[first_call - 1][0] == "say" and "bundled, short prompt" in events[first_call - 1][1]


def test_printed_rows_were_lost_in_a_buffer_or_came_after_the_tables(tmp_path, monkeypatch, capsys, clock):
    ticking = stand_in(clock, "any")

    def no_clock(ctx):  # generates, but never calls tick(): its line says n/a and why
        inner = ticking(ctx)
        return bench.Runner("", lambda n, tick=None: inner.run(n))

    monkeypatch.setattr(bench.methods, "RUNNERS", {m: ticking for m in bench.METHODS} | {"course_fast": no_clock})
    bench.run(bench.make_plan(bench.parse_args([*FAKE, "--out", str(tmp_path)])), tmp_path, progress=False)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("[bench] ")]
    assert len(lines) == 1 + len(bench.METHODS)  # the case, then one line per method
    assert out.index(lines[-1]) < out.index("# kvcourse benchmark")
    fast = next(ln for ln in lines if bench.METHODS["course_fast"][0] in ln)
    assert "decode n/a" in fast and "decode n/a: the method reports no per-token clock" in fast

    class Recorder:
        def __init__(self):
            self.text, self.flushes = "", 0

        def write(self, s):
            self.text += s

        def flush(self):
            self.flushes += 1

    rec = Recorder()
    monkeypatch.setattr(sys, "stdout", rec)
    bench.report.say("[bench] one line")
    assert rec.text == "[bench] one line\n" and rec.flushes >= 1


def test_course_graph_on_a_cpu_was_timed_as_static_eager_under_the_graphs_name(tmp_path, monkeypatch, capsys, clock):
    runner = bench.RUNNERS["course_graph"]({"ids": torch.tensor([[1, 2, 3]]), "device": torch.device("cpu"),
                                           "hf": None, "compile": False, "new_tokens": 4})
    assert runner.unavailable == "CUDA graphs need a CUDA device"
    with pytest.raises(RuntimeError, match="unavailable"):
        runner.run(4)

    # in a run: every other method a stand-in, course_graph the real one
    fakes = {m: stand_in(clock, m) for m in bench.METHODS if m != "course_graph"}
    monkeypatch.setattr(bench.methods, "RUNNERS", {**bench.RUNNERS, **fakes})
    result = bench.run(bench.make_plan(bench.parse_args([*FAKE, "--out", str(tmp_path)])), tmp_path, progress=False)
    out = capsys.readouterr().out
    graph = result["cases"][0]["methods"]["course_graph"]
    assert graph["unavailable"] == "CUDA graphs need a CUDA device" and graph["rounds"] == []
    for key in ["ttft_ms", "decode_ms_per_token", "decode_tokens_per_s", "total_s", "speed_vs_hf_cache_decode"]:
        assert graph[key] is None and "CUDA graphs need a CUDA device" in graph["missing"][key], key
    assert result["cases"][0]["methods"]["course_static"]["decode_ms_per_token"] is not None
    label = bench.METHODS["course_graph"][0]
    assert f"| {label}: n/a (CUDA graphs need a CUDA device)" in out
    assert f"| {label} | n/a | n/a | n/a | n/a | n/a | n/a | n/a: CUDA graphs need a CUDA device |" in (
        tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_gpu_quick_ran_on_a_cpu_and_printed_cpu_numbers_as_gpu_ones(device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"--gpu-quick needs a CUDA device.*use --quick"):
        bench.make_plan(bench.parse_args(["--gpu-quick", "--device", device]))


def test_gpu_quick_lost_a_method_or_its_size(monkeypatch):
    monkeypatch.setattr(bench.cli, "pick_device", lambda name: torch.device("cuda"))
    plan = bench.make_plan(bench.parse_args(["--gpu-quick"]))
    assert plan.preset == "gpu-quick" and not plan.quick
    assert plan.models == ["SmolLM2-1.7B"] and plan.prompts == ["short"] and plan.dtype == torch.bfloat16
    assert plan.methods == ["course_fast", "course_graph", "course_graph_compiled", "hf_dynamic", "hf_static"] and plan.repeats == 3
    assert plan.big_new_tokens == 64 and not plan.compile and plan.batch_sweep is None
    # an option given explicitly wins over the preset
    plan = bench.make_plan(bench.parse_args(["--gpu-quick", "--repeats", "2", "--big-new-tokens", "32"]))
    assert plan.repeats == 2 and plan.big_new_tokens == 32
    with pytest.raises(SystemExit):  # argparse: one preset at a time
        bench.parse_args(["--gpu-quick", "--quick"])


def test_batch_sizes_or_default_maximum_were_wrong(monkeypatch):
    assert bench.batch_sizes(1) == (1,)
    assert bench.batch_sizes(32) == (1, 2, 4, 8, 16, 32)
    assert bench.batch_sizes(48) == (1, 2, 4, 8, 16, 32, 48)
    cpu = bench.make_plan(bench.parse_args(["--device", "cpu", "--batch-sweep"]))
    assert cpu.batch_sweep == "course_fast" and cpu.batch_sizes[-1] == 32
    monkeypatch.setattr(bench.cli, "pick_device", lambda name: torch.device("cuda"))
    assert bench.make_plan(bench.parse_args(["--batch-sweep", "course_graph"])).batch_sizes[-1] == 64
    with pytest.raises(SystemExit, match="batch-max"):
        bench.make_plan(bench.parse_args(["--device", "cpu", "--batch-sweep", "--batch-max", "0"]))


def test_memory_bound_misjudged_a_step_that_grew_faster_than_its_bytes():
    points = [{"bytes": 100, "decode_ms_per_token": 1.0}, {"bytes": 110, "decode_ms_per_token": 1.3},
              {"bytes": 120, "decode_ms_per_token": 1.6}, {"bytes": 140, "decode_ms_per_token": None}]
    # 1.3 <= 1.25 * 1.1 = 1.375: memory-bound; 1.6 > 1.25 * 1.2 = 1.5: not; a missing time: unknown
    assert bench.memory_bound(points) == [True, True, False, None]
    assert bench.memory_bound([{"bytes": 1, "decode_ms_per_token": None}, points[1]]) == [None, None]


def test_batch_sweep_lost_its_bytes_its_floor_or_where_decode_stops_being_memory_bound(tmp_path, monkeypatch,
                                                                                        capsys, clock):
    # fake steps: 1 ms up to batch 2, then growing with the batch (the arithmetic outgrows the bytes)
    def step_s(batch):
        return 0.001 * max(1.0, batch / 2)

    monkeypatch.setattr(bench.methods, "RUNNERS", {m: stand_in(clock, m, step_s=step_s) for m in bench.METHODS})
    monkeypatch.setattr(bench.Bandwidth, "sample", lambda self, repeats=3: [10.0])  # GB/s: a known floor
    argv = [*FAKE, "--methods", "course_fast", "hf_dynamic", "--batch-sweep", "--batch-max", "8", "--out", str(tmp_path)]
    result = bench.run(bench.make_plan(bench.parse_args(argv)), tmp_path, progress=False)
    out = capsys.readouterr().out
    (sweep,) = result["batch_sweep"]
    assert json.loads((tmp_path / "bench.json").read_text())["batch_sweep"] == json.loads(json.dumps([sweep]))
    pts = sweep["points"]
    assert [p["batch"] for p in pts] == [1, 2, 4, 8] and sweep["copy_GBps"] == 10.0
    floor = result["cases"][0]["floor"]  # batch 1's bytes, from the case: weights once, the KV cache once
    assert pts[0]["bytes"] == pytest.approx(floor["bytes_per_token"])
    for p in pts:  # every row's KV cache: B times the case's, on top of the weights
        assert p["bytes"] - p["weight_bytes"] == pytest.approx(p["batch"] * (floor["bytes_per_token"]
                                                                              - floor["weight_bytes_per_token"]))
    for p in pts:
        step_ms = step_s(p["batch"]) * 1e3
        assert p["decode_ms_per_token"] == pytest.approx(step_ms)
        assert p["tokens_per_s"] == pytest.approx(p["batch"] / step_s(p["batch"]))
        assert p["floor_ms"] == pytest.approx(p["bytes"] / 10e9 * 1e3)
        assert p["bandwidth_floor_fraction"] == pytest.approx(p["floor_ms"] / step_ms)
        grew, bytes_grew = step_ms / 1.0, p["bytes"] / pts[0]["bytes"]
        assert p["memory_bound"] == (grew <= bench.bandwidth.MEMORY_BOUND_SLACK * bytes_grew)
    assert [p["memory_bound"] for p in pts] == [True, True, False, False]  # the bundled model's bytes barely grow
    assert sweep["memory_bound_until"] == 2
    lines = [ln for ln in out.splitlines() if ln.startswith("[bench] batch sweep")]
    assert len(lines) == 1 + 4 and "batch 4:" in lines[3] and "not memory-bound" in lines[3]
    assert out.index(lines[-1]) < out.index("# kvcourse benchmark")
    text = (tmp_path / "bench.md").read_text()
    assert "## Batch sweep" in text and "Largest memory-bound batch: 2." in text
    assert (tmp_path / "batch_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for t in (out, text):
        assert not NEGATIVE_NUMBER.search(t) and not NOT_FINITE.search(t)
    assert all(math.isfinite(p["bytes"]) for p in pts)


def test_batch_sweep_of_course_graph_on_a_cpu_printed_numbers(tmp_path, monkeypatch, capsys, clock):
    fakes = {m: stand_in(clock, m) for m in bench.METHODS if m != "course_graph"}
    monkeypatch.setattr(bench.methods, "RUNNERS", {**bench.RUNNERS, **fakes})
    argv = [*FAKE, "--methods", "hf_dynamic", "--batch-sweep", "course_graph", "--batch-max", "2", "--out",
            str(tmp_path)]
    result = bench.run(bench.make_plan(bench.parse_args(argv)), tmp_path, progress=False)
    out = capsys.readouterr().out
    (sweep,) = result["batch_sweep"]
    for p in sweep["points"]:
        assert p["unavailable"] == "CUDA graphs need a CUDA device"
        assert p["decode_ms_per_token"] is None and p["tokens_per_s"] is None and p["memory_bound"] is None
        assert "CUDA graphs need a CUDA device" in p["missing"]["tokens_per_s"]
    assert sweep["memory_bound_until"] is None
    assert "batch 1: step n/a, n/a tokens/s" in out and "n/a: CUDA graphs need a CUDA device" in out
    assert "Largest memory-bound batch: n/a." in (tmp_path / "bench.md").read_text()


def test_python_dash_m_kvcourse_bench_no_longer_runs():
    proc = subprocess.run([sys.executable, "-m", "kvcourse.bench", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    for option in ["--quick", "--gpu-quick", "--batch-sweep", "--batch-max", "--compile", "--separate-check"]:
        assert option in proc.stdout, option
    assert "177 s on one H100" in " ".join(proc.stdout.split()), "the help gives the measured --gpu-quick time"

"""bench/_meta.stable_time: stops once the last times agree, and says so honestly when they never do."""
from __future__ import annotations

import itertools
from typing import Callable

import pytest

from bench import _meta
from bench._meta import stability_text, stable_time, timing_cells


def _scripted_clock(monkeypatch: pytest.MonkeyPatch, durations: list[float]) -> tuple[list[int], Callable[[], None]]:
    """Make time.perf_counter (as bench._meta sees it) advance by ``durations[i]`` during the i-th call of
    the returned function; the returned list counts those calls."""
    now = [0.0]
    calls: list[int] = []
    it = iter(durations)

    def clock() -> float:
        return now[0]

    def fn() -> None:
        calls.append(1)
        now[0] += next(it)

    monkeypatch.setattr(_meta.time, "perf_counter", clock)
    return calls, fn


def test_stops_early_when_the_last_times_agree(monkeypatch):
    # a slow first call, then steady ones: the window [1.00, 1.01, 1.02] has spread 2% <= 5%
    calls, fn = _scripted_clock(monkeypatch, [3.0, 1.0, 1.01, 1.02, 1.0, 1.0, 1.0])
    t = stable_time(fn, min_repeats=3, max_repeats=10, rel_spread=0.05)
    assert len(calls) == 4 and t["repeats"] == 4
    assert t["stable"] is True
    assert t["median_s"] == pytest.approx(1.01)
    assert t["min_s"] == pytest.approx(1.0) and t["max_s"] == pytest.approx(1.02)
    assert t["spread"] == pytest.approx(0.02 / 1.01)
    assert t["times_s"] == pytest.approx([3.0, 1.0, 1.01, 1.02])
    assert stability_text(t) == "stable"


def test_hits_the_repeat_cap_and_says_not_stable(monkeypatch):
    calls, fn = _scripted_clock(monkeypatch, list(itertools.islice(itertools.cycle([1.0, 2.0]), 20)))
    t = stable_time(fn, min_repeats=3, max_repeats=6, rel_spread=0.05)
    assert len(calls) == 6 and t["repeats"] == 6
    assert t["stable"] is False
    assert t["spread"] == pytest.approx(0.5)  # last three: 2, 1, 2 -> (2 - 1) / 2
    assert stability_text(t).startswith("NOT stable (spread 50%")
    assert "NOT stable" in timing_cells(t)


def test_time_cap_and_a_single_call_is_never_stable(monkeypatch):
    calls, fn = _scripted_clock(monkeypatch, [65.0, 65.0, 65.0])
    t = stable_time(fn, min_repeats=3, max_repeats=10, max_seconds=60)
    assert len(calls) == 1 and t["repeats"] == 1
    assert t["stable"] is False and t["spread"] is None and t["median_s"] == 65.0
    assert stability_text(t) == "NOT stable (1 run, no spread)"
    # identical times but fewer than min_repeats of them are not enough either
    calls, fn = _scripted_clock(monkeypatch, [1.0, 1.0, 1.0])
    t = stable_time(fn, min_repeats=3, max_repeats=2)
    assert t["repeats"] == 2 and t["stable"] is False


def test_sync_runs_inside_the_timed_interval(monkeypatch):
    calls, fn = _scripted_clock(monkeypatch, [1.0, 1.0])
    clock = _meta.time.perf_counter  # the scripted clock; a "device" that finishes 0.5 s after the call
    offset = [0.0]
    monkeypatch.setattr(_meta.time, "perf_counter", lambda: clock() + offset[0])

    def sync() -> None:
        offset[0] += 0.5

    t = stable_time(fn, min_repeats=2, max_repeats=2, sync=sync)
    assert t["times_s"] == pytest.approx([1.5, 1.5]) and t["stable"] is True


def test_every_timed_benchmark_uses_stable_time_and_a_baseline_ratio():
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    ratios = {"eval_speed.py": ["ratio_sweep_over_load", "ratio_plain_over_sweep"],
              "infer_speed.py": ["ratio_batched_over_loop", "ratio_peak_rss_batched_over_loop", "outputs_equal"],
              "train_step.py": ["ratio_ktse_step_over_cls_step"], "random_walk.py": ["ratio_dense_over_sparse"],
              "beco_speed.py": ["ratio_msc_test_over_single_forward", "ratio_crf_over_no_crf"]}
    for name, fields in ratios.items():
        src = (bench / name).read_text(encoding="utf-8")
        assert "stable_time(" in src and ("timing_cells" in src or "stability_text" in src), name
        assert all(f in src for f in fields), name
        assert 'add_argument("--out"' in src, name
        # no private timing loop: perf_counter appears only in eval_speed's data-synthesis progress line
        assert src.count("perf_counter") == (2 if name == "eval_speed.py" else 0), name

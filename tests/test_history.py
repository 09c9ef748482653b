"""history: loading pytest-benchmark files, verdicts, change points, atomic writes; the detector's validation."""

import json
import math
import os
import subprocess
import sys
import threading
from math import comb
from pathlib import Path

import numpy as np
import pytest

from wan_pipeline.cli.main import main
from wan_pipeline.errors import WanBenchError
from wan_pipeline.fsutil import atomic_write_bytes, atomic_write_json
from wan_pipeline.history.changepoints import change_points
from wan_pipeline.history.compare import compare, run_changes, verdict_for
from wan_pipeline.history.runs import (GpuMismatchError, HistoryError, HistoryFileError, load_history, load_run,
                                       pick_runs, save_run)
from wan_pipeline.history.stats import mann_whitney, ratio_bounds, u_null_counts
from wan_pipeline.history.trend import trend

DATA = Path(__file__).parent / "data" / "history"
H100 = "NVIDIA H100 80GB HBM3"
STAGE_SPLIT = {"text_encode": 0.02, "image_encode": 0.03, "pass1": 0.4, "switch": 0.01, "pass2": 0.4, "decode": 0.14}


def bench(name, rounds, stages=None, **extra):
    rounds = [float(r) for r in rounds]
    med = float(np.median(rounds))
    info = {"mode": "synthetic", "preset": name, "attention_kernel": "sdpa", "compile": {"enabled": False},
            "stages": stages if stages is not None else {k: v * med for k, v in STAGE_SPLIT.items()},
            "peak_memory": {"torch_peak_bytes": 30 * 2**30, "nvml_used_bytes": 32 * 2**30},
            "throttled": False, "gpu": {"throttle_reasons": []}, "metrics": {"flicker_score": 0.97}}
    info.update(extra)
    return {"group": None, "name": f"test_pipeline[{name}]", "fullname": f"tests/benchmarks/test_wan.py::test_pipeline[{name}]",
            "params": {"preset": name}, "extra_info": info,
            "stats": {"min": min(rounds), "max": max(rounds), "median": med, "mean": float(np.mean(rounds)),
                      "rounds": len(rounds), "data": rounds}}


def session(benches, day=1, gpu=H100, env=None, **machine):
    fp = {"env.TORCH_COMPILE": None, "version.torch": "2.11.0", "nvidia_driver": "580.159.04", "kernel": "6.18.44"}
    fp.update(env or {})
    mi = {"node": "gpu-1", "machine": "x86_64", "release": "6.18.44", "python_version": "3.12.3",
          "gpu": None if gpu is None else {"name": gpu, "driver": "580.159.04", "temperature_c": 40},
          "wan_env": fp}
    mi.update(machine)
    return {"machine_info": mi, "commit_info": {"id": f"c{day}"}, "benchmarks": benches,
            "datetime": f"2026-11-{day:02d}T03:00:00+00:00", "version": "5.2.3"}


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def rounds(rng, n=6, median=60.0, cv=0.01, factor=1.0):
    return median * factor * (1 + cv * rng.standard_normal(n))


# ------------------------------------------------------------------------------------------- statistics

def test_u_null_distribution_is_exact():
    for m, n in [(1, 1), (2, 3), (5, 5), (7, 4), (12, 30), (30, 30)]:
        counts = u_null_counts(m, n)
        assert counts.sum() == comb(m + n, m)
        assert len(counts) == m * n + 1 and (counts == counts[::-1]).all() and counts.min() >= 1


def test_mann_whitney_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(7)
    for m, n in [(5, 5), (6, 9), (25, 30), (80, 60)]:
        x, y = rng.normal(1, 0.01, m), rng.normal(1.004, 0.01, n)
        t = mann_whitney(x, y)
        method = "exact" if m + n <= 60 else "asymptotic"
        assert t.p_slower == pytest.approx(stats.mannwhitneyu(y, x, alternative="greater", method=method).pvalue)
        assert t.p_faster == pytest.approx(stats.mannwhitneyu(y, x, alternative="less", method=method).pvalue)
    x, y = np.round(rng.normal(1, 0.01, 30), 2), np.round(rng.normal(1.01, 0.01, 30), 2)  # ties
    t = mann_whitney(x, y)
    assert t.method == "normal"
    assert t.p_slower == pytest.approx(stats.mannwhitneyu(y, x, alternative="greater", method="asymptotic").pvalue)


def test_ratio_bounds_cover_the_true_ratio():
    rng = np.random.default_rng(3)
    covered = 0
    for _ in range(300):
        lo, est, hi = ratio_bounds(rounds(rng, 8), rounds(rng, 8, factor=1.07), alpha=0.05)
        assert lo <= est <= hi
        covered += lo <= 1.07 <= hi
    assert covered / 300 >= 0.87  # two one-sided 95 % bounds: a 90 % interval


# ------------------------------------------------------------------------------ validation of the detector

def recorded_residuals():
    """Standardised residuals of 300 rounds recorded on an H100 (tests/data/history/h100_rounds.json)."""
    rec = np.array(json.loads((DATA / "h100_rounds.json").read_text())["rounds"])
    z = rec / np.median(rec) - 1
    return z / z.std()


@pytest.mark.parametrize("n_rounds", [5, 10])
def test_detection_and_false_alarm_rates(n_rounds):
    """Pairs drawn from recorded round timings rescaled to 1 % CV: >= 95 % of 5 % slowdowns flagged (and all
    10 % / 20 % ones), <= 1 % of A/A pairs flagged."""
    z = recorded_residuals()
    rng = np.random.default_rng(2026 + n_rounds)

    def draw(factor):
        return 60.0 * factor * (1 + 0.01 * rng.choice(z, n_rounds, replace=False))

    rates = {}
    for slowdown, pairs in ((0.0, 1000), (0.05, 400), (0.10, 200), (0.20, 200)):
        flagged = 0
        for _ in range(pairs):
            v = verdict_for(bench("p", draw(1.0)), bench("p", draw(1.0 + slowdown)), threshold=0.05)
            flagged += v.regression
        rates[slowdown] = flagged / pairs
    print(f"{n_rounds} rounds: flagged {rates}")
    assert rates[0.0] <= 0.01
    assert rates[0.05] >= 0.95
    assert rates[0.10] == 1.0 and rates[0.20] == 1.0


def test_rates_on_lognormal_rounds():
    rng = np.random.default_rng(11)
    aa = sum(verdict_for(bench("p", rng.lognormal(0, 0.01, 6)), bench("p", rng.lognormal(0, 0.01, 6))).regression
             for _ in range(1000))
    slow = sum(verdict_for(bench("p", rng.lognormal(0, 0.01, 6)),
                                   bench("p", 1.05 * rng.lognormal(0, 0.01, 6))).regression for _ in range(400))
    assert aa / 1000 <= 0.01 and slow / 400 >= 0.95


def test_small_significant_slowdown_is_not_a_regression():
    rng = np.random.default_rng(5)
    v = verdict_for(bench("p", rounds(rng, 30, cv=0.005)), bench("p", rounds(rng, 30, cv=0.005, factor=1.015)))
    assert v.status == "slower-below-threshold" and not v.regression and v.p_slower < 0.01


def test_improvement_is_reported_and_passes():
    rng = np.random.default_rng(5)
    v = verdict_for(bench("p", rounds(rng, 8)), bench("p", rounds(rng, 8, factor=0.8)))
    assert v.status == "improvement" and not v.regression


def test_without_round_data_medians_decide_and_say_so():
    base, cur = bench("p", [60.0] * 5), bench("p", [66.0] * 5)
    del base["stats"]["data"]
    v = verdict_for(base, cur)
    assert v.regression and v.p_slower is None and "could not run" in v.test
    cur2 = bench("p", [61.0] * 5)
    assert not verdict_for(base, cur2).regression


def test_too_few_rounds_fall_back_to_medians():
    v = verdict_for(bench("p", [60.0, 60.1, 59.9]), bench("p", [66.0, 66.1, 65.9]))
    assert v.regression and "cannot reach" in v.test


# ----------------------------------------------------------------------------------------------- compare

def test_compare_names_the_changed_environment_field(tmp_path):
    rng = np.random.default_rng(1)
    stages = {k: v * 60 for k, v in STAGE_SPLIT.items()}
    a = write(tmp_path / "0001_a.json", session([bench("seed", rounds(rng), stages=stages),
                                                 bench("tiny", rounds(rng, median=2))], 1))
    slow = bench("seed", rounds(rng, factor=1.10), stages={**stages, "pass2": stages["pass2"] + 6.0},
                 attention_kernel="sage")
    b = write(tmp_path / "0002_b.json", session([slow, bench("tiny", rounds(rng, median=2))], 2,
                                                env={"env.TORCH_COMPILE": "1", "version.torch": "2.12.0"}))
    result = compare(a, b)
    assert [v.fullname.split("[")[1] for v in result.regressions] == ["seed]"]
    verdict = result.regressions[0]
    assert verdict.stage.stage == "pass2" and verdict.stage.delta == pytest.approx(6.0)
    assert [c.field for c in verdict.settings_changes] == ["extra_info.attention_kernel"]
    assert {"env:env.TORCH_COMPILE", "env:version.torch"} <= set(result.changed_fields())
    text = result.format_text()
    assert "env:version.torch: 2.11.0 -> 2.12.0" in text and "env:env.TORCH_COMPILE: unset -> 1" in text
    assert "REGRESSION" in text and "stage that moved most: pass2" in text
    out = result.to_json()
    assert out["regression"] is True and out["exit_code"] == 1
    json.dumps(out)  # serialisable
    assert main(["compare", str(a), str(b)]) == 1
    assert main(["compare", str(a), str(a)]) == 0


def test_compare_reports_driver_kernel_and_throttling(tmp_path):
    rng = np.random.default_rng(2)
    a = write(tmp_path / "a.json", session([bench("seed", rounds(rng))], 1))
    hot = bench("seed", rounds(rng, factor=1.2), throttled=True, gpu={"throttle_reasons": ["sw_thermal_slowdown"]})
    b = write(tmp_path / "b.json", session([hot], 2, env={"nvidia_driver": "590.10", "kernel": "6.19.0"},
                                           release="6.19.0"))
    result = compare(a, b)
    causes = result.likely_causes(result.regressions[0])
    assert "env:nvidia_driver: 580.159.04 -> 590.10" in causes
    assert "env:kernel: 6.18.44 -> 6.19.0" in causes
    assert not any(c.startswith("machine:release") for c in causes)  # the fingerprint says it once
    assert "GPU throttled in the current run: sw_thermal_slowdown" in causes
    assert not any("temperature" in f for f in result.changed_fields())  # a condition, not a setup change


def test_machine_info_speaks_for_runs_without_a_fingerprint(tmp_path):
    rng = np.random.default_rng(3)
    a = session([bench("seed", rounds(rng))], 1, wan_env=None)
    b = session([bench("seed", rounds(rng))], 2, wan_env=None, release="6.19.0")
    result = compare(write(tmp_path / "a.json", a), write(tmp_path / "b.json", b))
    assert [c.field for c in result.machine_changes] == ["machine:release"]


def test_measurements_in_extra_info_are_not_settings(tmp_path):
    KEY = "tests/benchmarks/test_wan.py::test_pipeline[seed]"
    rng = np.random.default_rng(4)
    measured = {"cosine_vs_bf16_sdpa": 0.9998, "compile": {"enabled": True, "recompiled_during_rounds": False},
                "sequence_parallel": {"degree": 2, "backend": "ulysses", "speedup": 1.8, "efficiency": 0.9,
                                      "per_rank_peak_memory_bytes": [1, 2]}}
    moved = {"cosine_vs_bf16_sdpa": 0.9991, "compile": {"enabled": True, "recompiled_during_rounds": True},
             "sequence_parallel": {"degree": 2, "backend": "ulysses", "speedup": 1.7, "efficiency": 0.85,
                                   "per_rank_peak_memory_bytes": [3, 4]}}
    a = write(tmp_path / "a.json", session([bench("seed", rounds(rng), **measured)], 1))
    b = write(tmp_path / "b.json", session([bench("seed", rounds(rng), **moved)], 2))
    assert run_changes(load_run(a), load_run(b), KEY) == []
    degree4 = dict(moved, sequence_parallel={"degree": 4, "backend": "ulysses"})
    c = write(tmp_path / "c.json", session([bench("seed", rounds(rng), **degree4)], 3))
    assert [ch.field for ch in run_changes(load_run(a), load_run(c), KEY)] \
        == ["extra_info.sequence_parallel.degree"]


def test_different_gpu_models_are_refused_unless_forced(tmp_path, capsys):
    rng = np.random.default_rng(3)
    a = write(tmp_path / "a.json", session([bench("seed", rounds(rng))], 1))
    b = write(tmp_path / "b.json", session([bench("seed", rounds(rng))], 2, gpu="NVIDIA H200"))
    with pytest.raises(GpuMismatchError, match="different GPU models.*H100.*H200"):
        compare(a, b)
    assert main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err and "Traceback" not in err
    assert main(["compare", str(a), str(b), "--force"]) == 0
    assert "compared anyway" in capsys.readouterr().out


@pytest.mark.parametrize("content, problem", [
    ('{"machine_info": {}, "benchmarks": [{"name": "x", "stats": {"med', "truncated"),
    ("", "empty"),
    ('{"machine_info": {}, "benchmarks": [{"name": "x", "stats": {"median": "fast"}}]}', "stats.median"),
    ('[1, 2, 3]', "not a pytest-benchmark file"),
    ('{"benchmarks": [], "machine_info": {}} trailing', "corrupted"),
    (b"\xff\xfe{}", "UTF-8"),
])
def test_bad_files_are_reported_and_left_alone(tmp_path, content, problem, capsys):
    rng = np.random.default_rng(4)
    good1 = write(tmp_path / "gpu" / "0001_a.json", session([bench("seed", rounds(rng))], 1))
    good2 = write(tmp_path / "gpu" / "0002_b.json", session([bench("seed", rounds(rng))], 2))
    bad = tmp_path / "gpu" / "0003_bad.json"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = (bad.read_bytes(), bad.stat().st_mtime_ns)
    with pytest.raises(HistoryFileError) as exc:
        load_run(bad)
    assert str(bad) in str(exc.value) and problem in str(exc.value)
    hist = load_history(tmp_path)
    assert [r.path for r in hist.runs] == [good1, good2]
    assert [p for p, _ in hist.skipped] == [bad]
    assert main(["compare", str(tmp_path / "gpu")]) == 0
    assert f"skipped unusable file {bad}" in capsys.readouterr().out
    assert main(["compare", str(good1), str(bad)]) == 2
    assert (bad.read_bytes(), bad.stat().st_mtime_ns) == before
    assert sorted(p.name for p in (tmp_path / "gpu").iterdir()) == ["0001_a.json", "0002_b.json", "0003_bad.json"]


def test_pick_runs_variants(tmp_path):
    rng = np.random.default_rng(5)
    h100 = [write(tmp_path / "h100" / f"000{d}_r.json", session([bench("seed", rounds(rng))], d)) for d in (1, 2, 3)]
    h200 = write(tmp_path / "h200" / "0001_r.json", session([bench("seed", rounds(rng))], 9, gpu="NVIDIA H200"))
    base, cur, _ = pick_runs(tmp_path / "h100", None)
    assert (base.path, cur.path) == (h100[1], h100[2])
    base, cur, _ = pick_runs(h100[1], None)  # one file: the run before it beside it
    assert (base.path, cur.path) == (h100[0], h100[1])
    base, cur, _ = pick_runs(tmp_path / "h100", h100[0])
    assert (base.path, cur.path) == (h100[2], h100[0])
    with pytest.raises(HistoryError, match="only one run on NVIDIA H200"):
        pick_runs(tmp_path, None)  # the latest run overall is the lone H200 one
    assert main(["compare", str(tmp_path / "empty-nothing")]) == 2
    assert h200.exists()


def test_compare_json_output(tmp_path, capsys):
    rng = np.random.default_rng(6)
    a = write(tmp_path / "a.json", session([bench("seed", rounds(rng))], 1))
    b = write(tmp_path / "b.json", session([bench("seed", rounds(rng, factor=1.3))], 2))
    assert main(["compare", str(a), str(b), "--json", "-", "--threshold", "10%"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["threshold"] == pytest.approx(0.10) and out["benchmarks"][0]["status"] == "regression"
    assert out["benchmarks"][0]["ratio"] == pytest.approx(1.3, rel=0.03)
    assert main(["compare", str(a), str(b), "--json", str(tmp_path / "v.json")]) == 1
    assert json.loads((tmp_path / "v.json").read_text())["regression"] is True


def test_compare_reads_real_pytest_benchmark_autosave(tmp_path):
    """The storage pytest-benchmark itself writes (autosave, save-data) is what compare reads."""
    (tmp_path / "test_bench.py").write_text(
        "import time\n"
        "def test_sleep(benchmark):\n"
        "    benchmark.extra_info['stages'] = {'pass1': 0.001}\n"
        "    benchmark.pedantic(time.sleep, args=(0.002,), rounds=6, iterations=1)\n")
    (tmp_path / "conftest.py").write_text(
        "def pytest_benchmark_update_machine_info(config, machine_info):\n"
        "    machine_info['gpu'] = {'name': 'NVIDIA H100 80GB HBM3'}\n"
        "    machine_info['wan_env'] = {'env.TORCH_COMPILE': __import__('os').environ.get('TORCH_COMPILE')}\n")
    storage = tmp_path / "storage"
    for flag in ("0", "1"):
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-autosave",
                               "--benchmark-save-data", f"--benchmark-storage={storage}", "test_bench.py"],
                              cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "TORCH_COMPILE": flag})
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(list(storage.rglob("*.json"))) == 2
    base, cur, skipped = pick_runs(storage, None)
    result = compare(base, cur, threshold=5.0)  # sleeps: only the plumbing is under test here
    (v,) = result.benchmarks
    assert v.fullname == "test_bench.py::test_sleep" and v.baseline_rounds == 6 and "Mann-Whitney" in v.test
    assert [c.describe() for c in result.env_changes] == ["env:env.TORCH_COMPILE: 0 -> 1"]


def test_compare_does_not_import_torch(tmp_path):
    rng = np.random.default_rng(8)
    a = write(tmp_path / "a.json", session([bench("seed", rounds(rng))], 1))
    code = ("import sys; from wan_pipeline.cli.main import main; rc = main(['compare', sys.argv[1], sys.argv[1]]); "
            "assert 'torch' not in sys.modules; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(a)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------------ change points

def test_change_points_find_a_step_and_nothing_in_noise():
    rng = np.random.default_rng(9)
    series = np.r_[rng.normal(0, 0.01, 12), rng.normal(0.08, 0.01, 8)]
    (cp,) = change_points(series, min_shift=0.05)
    assert cp["index"] == 12 and cp["p"] <= 0.05
    false = sum(bool(change_points(rng.normal(0, 0.01, 15), min_shift=math.log(1.05))) for _ in range(50))
    assert false == 0


def test_trend_names_the_run_and_the_changed_fields(tmp_path):
    rng = np.random.default_rng(10)
    for day in range(1, 11):
        upgraded = day >= 7
        s = session([bench("seed", rounds(rng, factor=1.12 if upgraded else 1.0)),
                     bench("tiny", rounds(rng, median=2.0))], day,
                    env={"version.torch": "2.12.0" if upgraded else "2.11.0"})
        write(tmp_path / "nvidia-h100-80gb-hbm3" / f"{day:04d}_run.json", s)
    write(tmp_path / "nvidia-h100-80gb-hbm3" / "0011_broken.json", {"benchmarks": "nope"})
    series = {s.benchmark.split("[")[1]: s for s in trend(tmp_path)}
    assert series["tiny]"].steps == []
    (step,) = series["seed]"].steps
    assert step.run.path.name == "0007_run.json" and step.previous.path.name == "0006_run.json"
    assert step.ratio == pytest.approx(1.12, rel=0.02)
    assert [c.describe() for c in step.changes] == ["env:version.torch: 2.11.0 -> 2.12.0"]
    assert main(["trend", str(tmp_path)]) == 0
    assert main(["trend", str(tmp_path / "missing")]) == 2


# ------------------------------------------------------------------------------------------------ writing

def test_atomic_write_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary left behind


def test_concurrent_saves_do_not_clobber(tmp_path):
    folder = tmp_path / "nvidia-h100-80gb-hbm3"
    barrier = threading.Barrier(8)
    paths = []

    def save(i):
        barrier.wait()
        paths.append(save_run(folder, session([bench("seed", [60.0 + i] * 5)], 1), f"session{i}"))

    threads = [threading.Thread(target=save, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = sorted(folder.glob("*.json"))
    assert [p.name for p in folder.iterdir() if not p.name.endswith(".json")] == [".wan-bench.lock"]
    assert len(files) == 8 == len(set(paths))
    assert sorted(p.name[:4] for p in files) == [f"{i:04d}" for i in range(1, 9)]
    medians = sorted(load_run(p).benchmarks["tests/benchmarks/test_wan.py::test_pipeline[seed]"]["stats"]["median"]
                     for p in files)
    assert medians == [60.0 + i for i in range(8)]
    with pytest.raises(FileExistsError):
        atomic_write_bytes(files[0], b"{}", overwrite=False)


def test_errors_are_wan_bench_errors():
    assert issubclass(HistoryFileError, WanBenchError)
    assert issubclass(GpuMismatchError, WanBenchError)

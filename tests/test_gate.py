"""The regression gate: a partial session (interrupted, stopped early, failed or unrun tests) is saved marked
incomplete, and `wan-bench compare` fails on it, and on a baseline benchmark missing from the current run unless
told which benchmarks to expect."""

import json

import pytest
import scipy.stats  # noqa: F401  (compare's statistics, loaded before pytester snapshots sys.modules)
from inner_sessions import cpu_only, plugin_args

import wan_pipeline.cli.history  # noqa: F401  (imported before pytester snapshots sys.modules)
from wan_pipeline.cli.main import main

pytest_plugins = ["pytester"]

PLAIN = ["-p", "no:cacheprovider", *plugin_args()]
TWO = ("def test_a(benchmark):\n    benchmark(sum, [1, 2, 3])\n\n"
       "def test_b(benchmark):\n    benchmark(sum, [4, 5])\n")
INTERRUPTED = ("def test_a(benchmark):\n    benchmark(sum, [1, 2, 3])\n\n"
               "def test_b(benchmark):\n    raise KeyboardInterrupt\n")
FAILING = ("def test_a(benchmark):\n    benchmark(sum, [1, 2, 3])\n\n"
           "def test_b(benchmark):\n    benchmark(sum, [4, 5])\n    assert False, 'over budget'\n")


@pytest.fixture
def plain(pytester, monkeypatch):
    cpu_only(monkeypatch)
    return pytester


def _save(plain, source, store, *extra):
    plain.makepyfile(test_bench=source)
    result = plain.runpytest_subprocess(*PLAIN, "--benchmark-autosave", "--benchmark-storage", str(store), *extra)
    return result, sorted(store.rglob("*.json"))[-1]


def test_an_interrupted_session_is_saved_marked_incomplete_and_compare_fails(plain, capsys):
    store = plain.path / "store"
    _, baseline = _save(plain, TWO, store)
    assert "wan_incomplete" not in json.loads(baseline.read_text())
    result, current = _save(plain, INTERRUPTED, store)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["this session is marked incomplete in its JSON (interrupted*): wan-bench compare "
                                 "fails on it", "saved 1 benchmark(s) to the history: *"])  # what was kept, and how
    data = json.loads(current.read_text())
    assert current != baseline and [b["name"] for b in data["benchmarks"]] == ["test_a"]  # benchmark keys unchanged
    assert "interrupted" in data["wan_incomplete"]["reasons"][0]
    assert data["wan_incomplete"]["not_run"] == ["test_bench.py::test_b"]
    capsys.readouterr()
    assert main(["compare", str(current.parent)]) == 1  # the folder's latest two runs
    out = capsys.readouterr().out
    assert "GATE: the current run" in out and "is incomplete: interrupted" in out
    assert "missing from the current run: test_bench.py::test_b" in out
    # (the timings of `sum` on a shared machine may also differ enough to count as a regression: either way, exit 1)
    assert "VERDICT: not a clean comparison" in out or "VERDICT: 1 regression(s)" in out


def test_a_failed_case_marks_the_session_incomplete(plain):
    result, saved = _save(plain, FAILING, plain.path / "store")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    marked = json.loads(saved.read_text())["wan_incomplete"]
    assert marked["failed"] == ["test_bench.py::test_b"] and "1 test(s) failed" in marked["reasons"]


def test_a_session_stopped_by_maxfail_is_incomplete(plain):
    source = FAILING + "\ndef test_c(benchmark):\n    benchmark(sum, [6])\n"
    result, saved = _save(plain, source, plain.path / "store", "-x")
    marked = json.loads(saved.read_text())["wan_incomplete"]
    assert any(r.startswith("stopped early") for r in marked["reasons"]), marked
    assert marked["not_run"] == ["test_bench.py::test_c"]


def _run_file(path, names, incomplete=None):
    data = {"machine_info": {"gpu": None}, "commit_info": {}, "datetime": "2026-11-01T00:00:00+00:00",
            "benchmarks": [{"name": n, "fullname": f"t.py::{n}", "stats": {"median": 1.0, "rounds": 5,
                                                                         "data": [1.0] * 5}} for n in names]}
    if incomplete:
        data["wan_incomplete"] = {"reasons": [incomplete]}
    path.write_text(json.dumps(data))
    return str(path)


def test_compare_fails_on_a_missing_benchmark_unless_told_what_to_expect(tmp_path, capsys):
    base = _run_file(tmp_path / "base.json", ["gen", "fwd"])
    cur = _run_file(tmp_path / "cur.json", ["fwd"])
    assert main(["compare", base, cur]) == 1
    assert "1 benchmark(s) of the baseline missing from the current run: t.py::gen" in capsys.readouterr().out
    assert main(["compare", base, cur, "--allow-missing"]) == 0
    assert main(["compare", base, cur, "--expect", "fwd"]) == 0
    assert main(["compare", base, cur, "--expect", "t.py::f*"]) == 0
    assert main(["compare", base, cur, "--expect", "fwd", "--expect", "gen"]) == 1
    assert "expected benchmark 'gen' is not in the current run" in capsys.readouterr().out
    # a pattern matching several baseline benchmarks needs every one of them, not just one
    base3 = _run_file(tmp_path / "base3.json", ["gen_49", "gen_81", "fwd"])
    cur3 = _run_file(tmp_path / "cur3.json", ["gen_49", "fwd"])
    assert main(["compare", base3, cur3, "--expect", "gen_*"]) == 1
    assert "1 benchmark(s) of the baseline matching 'gen_*' missing from the current run: t.py::gen_81" in \
        capsys.readouterr().out
    assert main(["compare", base3, cur3, "--expect", "gen_49", "--expect", "fwd"]) == 0
    assert main(["compare", base, base]) == 0
    capsys.readouterr()
    assert main(["compare", base, cur, "--json", "-", "--allow-missing"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["gate_failures"] == [] and verdict["only_in_baseline"] == ["t.py::gen"]


def test_an_incomplete_run_is_never_a_clean_baseline_or_current(tmp_path, capsys):
    full = _run_file(tmp_path / "full.json", ["gen"])
    partial = _run_file(tmp_path / "partial.json", ["gen"], incomplete="interrupted")
    assert main(["compare", full, partial]) == 1
    assert main(["compare", partial, full]) == 1
    assert "the baseline run" in capsys.readouterr().out
    # picked from a folder: the latest complete earlier run is the baseline, a partial one is passed over
    folder = tmp_path / "store"
    folder.mkdir()
    for n, partial_run in ((1, False), (2, True), (3, False)):
        path = folder / f"000{n}_run.json"
        _run_file(path, ["gen"], incomplete="interrupted" if partial_run else None)
        data = json.loads(path.read_text())
        data["datetime"] = f"2026-11-0{n}T00:00:00+00:00"
        path.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["compare", str(folder)]) == 0
    assert "baseline: " + str(folder / "0001_run.json") in capsys.readouterr().out


def test_a_gpu_matrix_controller_counts_its_workers_failed_and_unfinished_cases():
    from types import SimpleNamespace

    from wan_pipeline.suite.saving import Completeness

    tracker = Completeness(collected=["kept"], finished={"kept"})
    assert tracker.problems() is None
    ok = SimpleNamespace(index=0, device=SimpleNamespace(label="GPU 0"), status="ok", nodeids=["a"],
                         outcomes={"a": "passed"})
    assert tracker.problems([ok]) is None
    died = SimpleNamespace(index=1, device=SimpleNamespace(label="GPU 1"), status="died", nodeids=["b", "c"],
                           outcomes={"b": "failed"})
    marked = tracker.problems([ok, died])
    assert marked["failed"] == ["b"] and marked["not_run"] == ["c"] and "worker 1 (GPU 1): died" in marked["reasons"]

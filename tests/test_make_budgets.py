"""`wan-bench budgets --from`: budget entries made from a benchmark run, found by the suite's lookup, merged into
a budgets file without losing anything; and end to end in inner pytest sessions on the CPU: a run, budgets from
it, a run that meets them and a slowed run that misses them."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from inner_sessions import cpu_only, plugin_args

from wan_pipeline.cli.main import main
from wan_pipeline.history.make_budgets import (MakeBudgetsError, budget_seconds, literal_pattern, make_budgets,
                                               merge_entries, parse_headroom, render_entries, write_budgets)
from wan_pipeline.plan.budgets import DEFAULT_BUDGETS, load_budgets, parse_budgets

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
H200_FILE = ROOT / "docs" / "results" / "2026-12-02-h200-synthetic-49f-fp8-fast-cudnn-fp8-compile.json"
BENCHMARK_TEST = ROOT / "tests" / "benchmarks" / "test_generation.py"


def generation(preset="seed-832x1216-49f", median=10.0, gpu="NVIDIA H200", precision="bf16", attention="sdpa",
               compile_on=False, mode="synthetic", **extra):
    name = f"test_generation[{preset}-{attention}-{precision}-compile{int(compile_on)}]"
    info = {"mode": mode, "preset": preset, "stages": {"pass1": median / 2, "pass2": median / 2},
            "precision": precision, "attention": {"requested": attention, "kernel": attention},
            "attention_kernel": attention, "compile": {"enabled": compile_on},
            "gpu": {"before": {"name": gpu}} if gpu else None, "sequence_parallel": None, **extra}
    data = [median * 0.99, median, median * 1.01]
    return {"name": name, "fullname": f"tests/benchmarks/test_generation.py::{name}", "extra_info": info,
            "stats": {"median": median, "mean": median, "stddev": median * 0.01, "rounds": 3, "data": data}}


def run_file(benchmarks, day=2, gpu="NVIDIA H200", **top):
    return {"machine_info": {"gpu": {"name": gpu, "driver": "580.159.04"} if gpu else None,
                             "wan_env": {"version.torch": "2.11.0", "version.diffusers": "0.42.1"}},
            "commit_info": {"id": "0123456789abcdef", "dirty": False}, "benchmarks": benchmarks,
            "datetime": f"2026-12-{day:02d}T08:00:00+00:00", "version": "5.2.3", **top}


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------------------------------------ pure functions


@pytest.mark.parametrize("text, value", [("15%", 0.15), ("15 %", 0.15), ("0.15", 0.15), ("0", 0.0), ("2.5%", 0.025),
                                         ("300%", 3.0)])
def test_headroom_takes_a_percentage_or_a_fraction(text, value):
    assert parse_headroom(text) == pytest.approx(value)


@pytest.mark.parametrize("text, message", [("abc", "not a number"), ("-5%", ">= 0"), ("15", "write 15%"),
                                           ("nan", "finite"), ("", "not a number")])
def test_bad_headroom_is_a_one_line_error(text, message, capsys):
    with pytest.raises(MakeBudgetsError, match=message):
        parse_headroom(text)
    assert main(["budgets", "--from", str(H200_FILE), f"--headroom={text}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("wan-bench budgets: error: --headroom") and message in err


def test_budget_seconds_is_median_times_one_plus_headroom_to_four_digits():
    assert budget_seconds(18.90452136500005, 0.15) == 21.74
    assert budget_seconds(0.2834, 0.0) == 0.2834
    assert budget_seconds(128.3, 0.1) == 141.1


def test_literal_pattern_matches_only_itself():
    import fnmatch

    for text in ("NVIDIA H200", "my*wf?[v2]"):
        pattern = literal_pattern(text)
        assert fnmatch.fnmatch(text.lower(), pattern.lower())
        assert not fnmatch.fnmatch((text + "x").lower(), pattern.lower())
    assert not fnmatch.fnmatch("myAwfB[v2]", literal_pattern("my*wf?[v2]"))


# ------------------------------------------------------------------------------------------------ the stored H200 run


def test_the_stored_h200_run_reproduces_the_packaged_h200_budget():
    made = make_budgets(H200_FILE)
    [entry] = made.entries
    assert (entry.gpu, entry.preset, entry.mode, entry.precision, entry.attention, entry.compile) == (
        "NVIDIA H200", "seed-832x1216-49f", "synthetic", "fp8-scaled-mm-fast", "cudnn-fp8", "1")
    packaged = load_budgets(DEFAULT_BUDGETS).budget_for("NVIDIA H200", "seed-832x1216-49f", "synthetic", "cudnn-fp8",
                                                        True, "fp8-scaled-mm-fast")
    assert packaged is not None and packaged.gpu == "NVIDIA H200*"
    assert (packaged.preset, packaged.mode, packaged.precision, packaged.attention, packaged.compile) == (
        entry.preset, entry.mode, entry.precision, entry.attention, entry.compile)
    assert entry.seconds == pytest.approx(packaged.seconds, rel=0.005)  # 21.74 against the rounded 21.7
    for part in ("18.905 s median", "3 rounds", "NVIDIA H200", "2026-12-02", "driver 580.159.04", "torch 2.11.0",
                 "diffusers 0.42.1", "commit 75e974f8c2b8 (uncommitted changes)", "15 % headroom", H200_FILE.name):
        assert part in entry.source, part
    found = entry.found_in(parse_budgets(render_entries(made.entries)))  # the printed TOML, as the suite reads it
    assert found is not None and found.seconds == 21.74 and found.gpu == "NVIDIA H200"
    assert entry.found_in(parse_budgets(render_entries(made.entries))) is not None
    assert made.notes == [f"using run {H200_FILE} (2026-12-02T07:48:01, NVIDIA H200)"]


def test_every_packaged_budget_made_from_a_stored_run_is_what_that_run_makes():
    """A packaged entry whose source names a file in docs/results/ is that file's `wan-bench budgets` output: its
    keys, its seconds (median x 1.15) and its source, so a budget can always be traced to, and remade from, a run."""
    results = ROOT / "docs" / "results"
    stored = {path.name: path for path in results.glob("*.json")}
    traced = 0
    for packaged in load_budgets(DEFAULT_BUDGETS).budgets:
        named = [name for name in stored if packaged.source.endswith(f" in docs/results/{name}")]
        if not named:
            continue
        made = make_budgets(stored[named[0]])
        keys = (packaged.gpu, packaged.preset, packaged.mode, packaged.precision, packaged.attention,
                packaged.compile)
        [entry] = [e for e in made.entries
                   if (e.gpu, e.preset, e.mode, e.precision, e.attention, e.compile) == keys]
        source = entry.source.replace(str(stored[named[0]]), f"docs/results/{named[0]}")  # made with the full path
        assert (entry.seconds, source) == (packaged.seconds, packaged.source), named[0]
        traced += 1
    assert traced >= 4  # the H200's 49-frame (compile on and off), 81-frame and 161-frame entries


def test_the_command_prints_toml_without_out(capsys):
    assert main(["budgets", "--from", str(H200_FILE), "--headroom", "0.1"]) == 0
    out, err = capsys.readouterr()
    [budget] = parse_budgets(out).budgets
    assert budget.seconds == budget_seconds(18.90452136500005, 0.1) and "10 % headroom" in budget.source
    assert "using run" in err and "using run" not in out


# ------------------------------------------------------------------------------------------------ what is skipped


def test_skipped_benchmarks_are_named_with_why(tmp_path):
    stock = {"name": "test_stock_diffusers[x]", "fullname": "t::test_stock_diffusers[x]",
             "extra_info": {"mode": "synthetic", "preset": "p", "reference": "diffusers"}, "stats": {"median": 30.0}}
    forward = {"name": "test_expert_forward[x]", "fullname": "t::test_expert_forward[x]",
               "extra_info": {"mode": "synthetic", "preset": "p"}, "stats": {"median": 3.9}}
    good = generation(median=18.0)
    failed = generation(preset="seed-832x1216-81f", median=50.0)
    split = generation(preset="seed-832x1216-161f", sequence_parallel={"degree": 2})
    dup = generation(median=99.0)
    path = write(tmp_path / "run.json", run_file([stock, forward, good, failed, split, dup], wan_incomplete={
        "reasons": ["1 test(s) failed"], "failed": [failed["fullname"]],
        "why": {failed["fullname"]: "call: AssertionError: median 50.00 s over the budget"}, "not_run": []}))
    made = make_budgets(path, 0.15)
    assert [e.benchmark for e in made.entries] == [good["name"]]
    assert made.entries[0].seconds == budget_seconds(18.0, 0.15)
    notes = "\n".join(made.notes)
    assert "test_stock_diffusers[x]: not a generation benchmark" in notes
    assert "test_expert_forward[x]: not a generation benchmark" in notes
    assert f"{failed['name']}: its test failed: call: AssertionError: median 50.00 s over the budget" in notes
    assert f"{split['name']}: split over 2 GPUs" in notes
    assert f"same budget keys as {good['name']}" in notes


def test_a_run_without_generation_benchmarks_is_a_clear_error(tmp_path, capsys):
    forward = {"name": "test_expert_forward[x]", "fullname": "t::test_expert_forward[x]",
               "extra_info": {"mode": "synthetic", "preset": "p"}, "stats": {"median": 3.9}}
    path = write(tmp_path / "forward.json", run_file([forward]))
    with pytest.raises(MakeBudgetsError, match="no generation benchmark to make a budget from"):
        make_budgets(path)
    assert main(["budgets", "--from", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "not a generation benchmark" in err


def test_a_folder_gives_its_newest_complete_run_and_says_which(tmp_path):
    storage = tmp_path / ".benchmarks" / "nvidia-h200" / "Linux-CPython-3.12-64bit"
    write(storage / "0001_old.json", run_file([generation(median=20.0)], day=1))
    write(storage / "0002_good.json", run_file([generation(median=19.0)], day=2))
    write(storage / "0003_partial.json", run_file([generation(median=5.0)], day=3, wan_workers=[
        {"worker": 1, "device": "cuda:1", "status": "died", "problem": "killed by SIGKILL", "outcomes": {}}]))
    write(storage / "0004_stopped.json", run_file([generation(median=5.0)], day=4, wan_incomplete={
        "reasons": ["stopped early: stopping after 1 failures", "1 collected test(s) did not run"], "failed": [],
        "stopped": "stopped early: stopping after 1 failures",
        "not_run": ["tests/benchmarks/test_generation.py::test_generation[other]"]}))
    write(storage / "0005_forward_only.json", run_file([], day=5))
    (storage / "0006_broken.json").write_text('{"benchmarks": [')
    made = make_budgets(tmp_path / ".benchmarks")
    assert made.run.path.name == "0002_good.json" and made.entries[0].seconds == budget_seconds(19.0, 0.15)
    notes = "\n".join(made.notes)
    assert "skipped unusable file" in notes and "0006_broken.json" in notes
    assert "0005_forward_only.json" in notes and "no generation benchmark" in notes
    assert "0004_stopped.json" in notes and "partial: stopped early" in notes
    assert "0003_partial.json" in notes and "worker 1 on cuda:1 died (killed by SIGKILL)" in notes
    assert made.notes[-1].startswith(f"using run {storage / '0002_good.json'}")
    assert make_budgets(tmp_path / ".benchmarks", run_name="0001").run.path.name == "0001_old.json"
    with pytest.raises(MakeBudgetsError, match="names 0 run"):
        make_budgets(tmp_path / ".benchmarks", run_name="0099")
    with pytest.raises(MakeBudgetsError, match="partial"):
        make_budgets(storage / "0003_partial.json")


def _controller_record(failed_nodeids):
    """The `wan_incomplete` a --wan-gpus controller writes when one worker's tests failed (saving.Completeness)."""
    from types import SimpleNamespace

    from wan_pipeline.suite.saving import Completeness

    worker = SimpleNamespace(index=0, status="tests failed", device=SimpleNamespace(label="cuda:0"),
                             outcomes={n: "failed" for n in failed_nodeids}, nodeids=list(failed_nodeids))
    return Completeness().problems([worker])


def test_failed_tests_of_a_gpu_matrix_worker_are_skipped(tmp_path):
    ok, bad = generation(median=10.0), generation(preset="seed-832x1216-81f", median=40.0)
    path = write(tmp_path / "merged.json", run_file([ok, bad], wan_workers=[
        {"worker": 0, "device": "cuda:0", "status": "tests failed", "log": "w0.log",
         "outcomes": {ok["fullname"]: "passed", bad["fullname"]: "failed"}}],
        wan_incomplete=_controller_record([bad["fullname"]])))
    made = make_budgets(path)
    assert [e.benchmark for e in made.entries] == [ok["name"]]
    assert any("its test failed: failed on worker 0 (its log: w0.log)" in n for n in made.notes)


def test_a_cpu_case_gets_the_cpu_key_the_suite_looks_up(tmp_path):
    path = write(tmp_path / "cpu.json", run_file([generation(mode="tiny", gpu=None, median=0.3)], gpu=None))
    [entry] = make_budgets(path).entries
    assert entry.gpu == "cpu" and "on the CPU" in entry.source
    budgets = parse_budgets(render_entries([entry]))
    assert budgets.budget_for(None, "seed-832x1216-49f", "tiny", "sdpa", False, "bf16").seconds == entry.seconds
    assert budgets.budget_for(None, "seed-832x1216-49f", "tiny", "sdpa", True, "bf16") is None  # compile on: other key


# ------------------------------------------------------------------------------------------------ merging


EXISTING = """# my budgets: keep this comment

[[budget]]
gpu = "NVIDIA H200"
preset = "seed-832x1216-49f"
mode = "synthetic"
precision = "bf16"
attention = "sdpa"
compile = "0"
seconds = 99.0
source = "old"

# the H100 entry: keep me
[[budget]]
gpu = "NVIDIA H100*"
preset = "seed-*"
seconds = 60

[[quality]]
preset = "*"
motion_min = 0.2
"""


def test_merging_replaces_same_keys_in_place_and_keeps_everything_else(tmp_path):
    out = tmp_path / "budgets.toml"
    out.write_text(EXISTING)
    path = write(tmp_path / "run.json", run_file([generation(median=10.0),
                                                  generation(preset="seed-832x1216-81f", median=30.0)]))
    made = make_budgets(path, 0.1)
    notes = write_budgets(out, made.entries)
    text = out.read_text()
    assert "# my budgets: keep this comment" in text and "# the H100 entry: keep me" in text
    assert "99.0" not in text and 'source = "old"' not in text
    budgets = load_budgets(out)
    assert [b.preset for b in budgets.budgets] == ["seed-832x1216-81f", "seed-832x1216-49f", "seed-*"]
    assert budgets.quality[0].limits == {"motion_min": 0.2}
    for entry in made.entries:
        assert entry.found_in(budgets).seconds == entry.seconds
    assert budgets.budget_for("NVIDIA H100 80GB HBM3", "seed-832x1216-49f", "synthetic").seconds == 60
    assert notes == [f"replaced the budget for {made.entries[0].benchmark} on NVIDIA H200 (entry 1: 99.0 s -> "
                     f"11 s)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["budgets.toml", "run.json"]  # no temporary file left


def test_a_replaced_entry_shadowed_by_an_earlier_one_moves_to_the_top(tmp_path):
    out = tmp_path / "budgets.toml"
    out.write_text('[[budget]]\ngpu = "NVIDIA H200*"\npreset = "*"\nseconds = 50\n\n' + EXISTING.split("\n", 2)[2])
    made = make_budgets(write(tmp_path / "run.json", run_file([generation(median=10.0)])), 0.1)
    text, notes = merge_entries(out, made.entries)
    assert made.entries[0].found_in(parse_budgets(text)).seconds == 11.0
    assert any("moved the budget" in n for n in notes)


def test_an_unusable_budgets_file_is_refused_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "budgets.toml"
    out.write_text("[[budget]]\ngpu = 'x'\npreset = 'y'\n")
    assert main(["budgets", "--from", str(H200_FILE), "--out", str(out)]) == 2
    assert "lacks ['seconds']" in capsys.readouterr().err
    assert out.read_text() == "[[budget]]\ngpu = 'x'\npreset = 'y'\n"


def test_out_writes_a_new_file_that_the_suite_reads(tmp_path, capsys):
    out = tmp_path / "new" / "budgets.toml"
    assert main(["budgets", "--from", str(H200_FILE), "--out", str(out)]) == 0
    assert "1 budget(s)" in capsys.readouterr().out
    assert load_budgets(out).budget_for("NVIDIA H200", "seed-832x1216-49f", "synthetic", "cudnn-fp8", True,
                                        "fp8-scaled-mm-fast").seconds == 21.74


def test_the_closing_hint_names_the_sessions_file_or_how_to_keep_one(tmp_path):
    from types import SimpleNamespace

    from wan_pipeline.suite.outcomes import budget_hint
    from wan_pipeline.suite.saving import SAVING_KEY, Saving

    config = SimpleNamespace(option=SimpleNamespace(benchmark_json=None), stash=pytest.Stash())
    assert budget_hint(config, 0) == []
    assert "keep this session's results (--benchmark-json run.json or --benchmark-autosave)" in \
        budget_hint(config, 2)[0]
    config.stash[SAVING_KEY] = Saving(saved=Path(".benchmarks/cpu/Linux/0001_x.json"))
    assert "2 case(s) had no budget for this card: make budgets from this run with: wan-bench budgets --from " \
           ".benchmarks/cpu/Linux/0001_x.json --out budgets.toml" in budget_hint(config, 2)[0]
    with open(tmp_path / "my run.json", "wb") as fh:  # what argparse gives for --benchmark-json
        config.option.benchmark_json = fh
        assert f"--from '{tmp_path / 'my run.json'}' --out" in budget_hint(config, 1)[0]


def test_a_gpu_matrix_controller_counts_the_workers_cases_without_a_budget(tmp_path):
    from wan_pipeline.launch.shards import Device, WorkerResult
    from wan_pipeline.suite.matrix import MatrixController

    log = tmp_path / "worker-0.log"
    log.write_text("collected 2 items\n" + "=" * 30 + " wan-bench " + "=" * 30 + "\n"
                   "a: median 1.00 s on NVIDIA H200 (synthetic); no budget for this card and preset, none checked\n"
                   "b: median 2.00 s, budget 3 s\n"
                   "c: median 1.50 s on NVIDIA H200 (synthetic); no budget for this card and preset, none checked\n"
                   + "=" * 30 + " 2 passed " + "=" * 30 + "\n")
    controller = MatrixController(None, [Device(0)], None, tmp_path)
    assert controller.unbudgeted() == 0  # no worker ran
    controller.results = [WorkerResult(0, Device(0), "0", ["a", "b", "c"], log)]
    assert controller.unbudgeted() == 2


# ------------------------------------------------------------------------------------------------ end to end


SLOWER = """
import time

import pytest

from wan_pipeline.run import conditioning


@pytest.fixture(autouse=True)
def slower(monkeypatch):
    decode = conditioning.decode

    def slowed(*args, **kwargs):  # inside the timed decode stage
        time.sleep({seconds})
        return decode(*args, **kwargs)

    monkeypatch.setattr(conditioning, "decode", slowed)
"""


@pytest.fixture
def inner(pytester, monkeypatch):
    cpu_only(monkeypatch)
    shutil.copy(BENCHMARK_TEST, pytester.path / "test_generation.py")
    return pytester


def _session(inner, *args, presets="seed-832x1216-49f"):
    return inner.runpytest_subprocess("-p", "no:cacheprovider", *plugin_args(), "--wan-mode", "tiny",
                                      "--wan-preset", presets, "--benchmark-min-rounds", "2",
                                      "--wan-warmup", "0", "--benchmark-only", "--wan-video", "webp",
                                      "--wan-out", str(inner.path / "out"), *args)


def _budgets(inner, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wan_pipeline", "budgets", *args], cwd=inner.path,
                          capture_output=True, text=True, timeout=120)


def test_budgets_from_a_cpu_run_are_met_by_a_second_run_and_missed_by_a_slowed_one(inner):
    first = _session(inner, "--benchmark-json", "run.json")
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines(["*no budget for this card and preset, none checked*",
                                "*1 case(s) had no budget for this card: make budgets from this run with: "
                                "wan-bench budgets --from run.json --out budgets.toml, then run again with "
                                "--wan-budgets budgets.toml*"])
    assert "wan_incomplete" not in json.loads((inner.path / "run.json").read_text())  # a complete session

    made = _budgets(inner, "--from", "run.json", "--out", "budgets.toml", "--headroom", "300%")
    assert made.returncode == 0, made.stderr
    assert "using run run.json" in made.stderr
    [budget] = load_budgets(inner.path / "budgets.toml").budgets
    assert budget.gpu == "cpu" and budget.mode == "tiny" and budget.compile == "0"

    again = _session(inner, "--wan-budgets", "budgets.toml")
    again.assert_outcomes(passed=1)
    again.stdout.fnmatch_lines([f"*seed-832x1216-49f-sdpa-bf16-compile0: median * s, budget {budget.seconds:g} s*"])
    assert "had no budget" not in again.stdout.str()

    # a budget with no headroom, and each round's decode made slower by more than the whole median: the check
    # must fail
    tight = _budgets(inner, "--from", "run.json", "--out", "tight.toml", "--headroom", "0%")
    assert tight.returncode == 0, tight.stderr
    [tight_budget] = load_budgets(inner.path / "tight.toml").budgets
    inner.makeconftest(SLOWER.replace("{seconds}", repr(round(tight_budget.seconds + 0.2, 3))))
    slowed = _session(inner, "--wan-budgets", "tight.toml", "--benchmark-json", "slowed.json", "-x",
                      presets="seed-832x1216-49f,seed-832x1216-49f-cfg3.5")
    slowed.assert_outcomes(failed=1)  # -x: the second case never runs
    slowed.stdout.fnmatch_lines(["*over the budget*"])
    session = json.loads((inner.path / "slowed.json").read_text())["wan_incomplete"]
    failed = "test_generation.py::test_generation[seed-832x1216-49f-sdpa-bf16-compile0]"
    assert session["failed"] == [failed] and "over the budget" in session["why"][failed]
    assert session["not_run"] == ["test_generation.py::test_generation[seed-832x1216-49f-cfg3.5-sdpa-bf16-compile0]"]
    # and that run makes no budget: it is partial, and its one benchmark failed
    refused = _budgets(inner, "--from", "slowed.json")
    assert refused.returncode == 2 and "partial: stopped early" in refused.stderr
    assert refused.stdout == ""
    json_data = json.loads((inner.path / "slowed.json").read_text())
    json_data["wan_incomplete"].update(not_run=[], stopped=None, reasons=["1 test(s) failed"])  # as if it ran all
    (inner.path / "slowed-complete.json").write_text(json.dumps(json_data))
    refused = _budgets(inner, "--from", "slowed-complete.json")
    assert refused.returncode == 2 and "its test failed: call: AssertionError" in refused.stderr, refused.stderr


def test_a_memory_capped_run_makes_no_budget(tmp_path):
    capped = run_file([generation(median=34.5, memory_cap_bytes=24 * 10**9)],
                      machine_info={"gpu": {"name": "NVIDIA H200", "driver": "580.159.04"},
                                    "wan_memory_cap": {"cap_bytes": 24 * 10**9, "applied": True}})
    path = write(tmp_path / "capped.json", capped)
    with pytest.raises(MakeBudgetsError, match="capped: run under a 24.00 GB memory cap"):
        make_budgets(path)

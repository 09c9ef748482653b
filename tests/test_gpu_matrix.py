"""--wan-gpus: the matrix spread over plain pytest worker processes, one per GPU. The sharding, argument filtering,
progress reading and merging as pure functions; then inner pytest sessions in tiny mode with two CPU workers (merged
results, a worker that dies, a timeout, bad input). The inner sessions see no GPU (inner_sessions.cpu_only), on a GPU
box too."""

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from inner_sessions import REPO, cpu_only, plugin_args

from wan_pipeline.history.runs import load_run
from wan_pipeline.plan.presets import get_preset
from wan_pipeline.run.case import WanCase
from wan_pipeline.launch.shards import (Device, GpuSelectionError, ShardItem, WorkerResult, merge, parse_gpus,
                                        read_progress, shard, worker_args)
from wan_pipeline.suite.matrix import shard_item
from wan_pipeline.suite.options import _gpus, _seconds

pytest_plugins = ["pytester"]

BENCHMARK_TEST = REPO / "tests" / "benchmarks" / "test_generation.py"
PRESETS = "seed-832x1216-49f,template-640x640-81f-20step"
PLAIN = ["-p", "no:cacheprovider", *plugin_args()]
MATRIX = [*PLAIN, "--wan-mode", "tiny", "--wan-gpus", "2", "--benchmark-min-rounds", "2", "--wan-warmup", "0",
          "--wan-preset", PRESETS, "--benchmark-only", "--wan-video", "webp"]
SEED = "test_generation.py::test_generation[seed-832x1216-49f-sdpa-bf16-compile0]"
TEMPLATE = "test_generation.py::test_generation[template-640x640-81f-20step-sdpa-bf16-compile0]"


# ------------------------------------------------------------------------------------------------ devices


def test_gpu_counts_lists_and_all():
    assert parse_gpus("all", 4) == [Device(0), Device(1), Device(2), Device(3)]
    assert parse_gpus("2", 4) == [Device(0), Device(1)]
    assert parse_gpus("3,1", 4) == [Device(3), Device(1)]
    assert parse_gpus("2,", 4) == [Device(2)]  # one device by index
    assert parse_gpus("2", 0, cpu_workers_allowed=True) == [Device(None), Device(None)]


@pytest.mark.parametrize("value, count, cpu, words", [
    ("3", 2, False, ["'3'", "3 GPUs asked for", "this host has 2"]),
    ("2", 0, False, ["'2'", "2 GPUs asked for", "this host has 0"]),
    ("all", 0, True, ["'all'", "no CUDA device", "CPU workers"]),
    ("0,4", 2, False, ["device 4 does not exist", "2 CUDA device(s)"]),
    ("1,1", 2, False, ["device 1 is named twice"]),
    ("0", 2, False, ["at least 1"]),
    ("many", 2, False, ["'many'", "expected all"]),
    ("0,x", 2, False, ["'x' is not a device index"]),
])
def test_bad_gpu_values_are_errors_naming_the_value(value, count, cpu, words):
    with pytest.raises(GpuSelectionError) as info:
        parse_gpus(value, count, cpu_workers_allowed=cpu)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("value, words", [("0", ["at least 1"]), ("many", ["'many'", "expected all"]),
                                          ("0,x", ["'x' is not a device index"]), ("1,1", ["named twice"])])
def test_the_option_rejects_bad_syntax_before_looking_at_devices(value, words):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        _gpus(value)
    for word in words:
        assert word in str(info.value)
    assert _gpus("all") == "all" and _gpus("3,1") == "3,1" and _gpus("") is None


def test_worker_pins_the_physical_device_through_the_parents_visible_devices():
    assert Device(1).visible_devices(None) == "1"
    assert Device(1).visible_devices("4,6") == "6"
    assert Device(None).visible_devices("0,1") == ""  # a CPU worker sees no GPU


def test_timeout_values():
    assert _seconds("") is None and _seconds("0") is None and _seconds("90") == 90.0
    with pytest.raises(argparse.ArgumentTypeError, match="'soon'"):
        _seconds("soon")
    with pytest.raises(argparse.ArgumentTypeError, match="'-5'"):
        _seconds("-5")


# ------------------------------------------------------------------------------------------------ sharding


def _item(name, keys, unit=None, cost=1.0):
    return ShardItem(name, tuple(keys), unit or name, cost)


def test_cases_sharing_a_model_set_stay_on_one_worker():
    items = [_item("a1", ["A"], cost=1), _item("b1", ["B"], cost=5), _item("a2", ["A"], cost=1),
             _item("c1", ["C"], cost=2), _item("a3", ["A"], cost=1)]
    shards = shard(items, 2)
    owner = {n: i for i, ids in enumerate(shards) for n in ids}
    assert owner["a1"] == owner["a2"] == owner["a3"]
    assert sorted(n for ids in shards for n in ids) == ["a1", "a2", "a3", "b1", "c1"]
    assert shards[owner["a1"]] == [n for n in ("a1", "a2", "c1", "a3") if owner[n] == owner["a1"]]  # order kept


def test_a_second_key_links_groups_and_links_are_transitive():
    # x~w via A, w~z via C, z~y via ref: one group, whatever the costs
    items = [_item("x", ["A"], unit="u", cost=9), _item("v", ["D"], cost=1), _item("y", ["B", "ref"], unit="u"),
             _item("z", ["C", "ref"], unit="u"), _item("w", ["A", "C"], unit="u")]
    assert shard(items, 2) == [["x", "y", "z", "w"], ["v"]]


def test_groups_are_balanced_by_cost():
    costs = {"g0": 5, "g1": 4, "g2": 3, "g3": 3, "g4": 1}
    shards = shard([_item(n, [f"K{n}"], cost=c) for n, c in costs.items()], 2)
    loads = sorted(sum(costs[n] for n in ids) for ids in shards)
    assert loads == [8, 8]
    items = [_item("big", ["K1"], cost=10)] + [_item(f"s{i}", [f"S{i}"], cost=1) for i in range(6)]
    shards = shard(items, 2)
    assert [n for n in shards if "big" in n][0] == ["big"]  # the small ones all go to the other worker


def test_sharding_is_deterministic():
    items = [_item(f"n{i}", [f"K{i % 3}"], unit=f"u{i % 4}", cost=(i * 7) % 5 + 1) for i in range(20)]
    first = shard(items, 3)
    assert all(shard(items, 3) == first for _ in range(5))
    assert shard(list(items), 3) == first


def test_more_workers_than_model_sets_split_the_costliest_set_by_preset():
    items = [_item("p1a", ["A"], unit="p1", cost=4), _item("p2a", ["A"], unit="p2", cost=3),
             _item("p1b", ["A"], unit="p1", cost=1), _item("p3a", ["A"], unit="p3", cost=1)]
    shards = shard(items, 3)
    assert sorted(map(sorted, shards)) == [["p1a", "p1b"], ["p2a"], ["p3a"]]  # one preset never straddles
    shards = shard(items, 5)
    assert sum(1 for s in shards if s) == 3 and sum(1 for s in shards if not s) == 2  # idle workers, not split units
    assert shard(items, 1) == [["p1a", "p2a", "p1b", "p3a"]]


def test_one_unsplittable_set_over_many_workers_leaves_the_others_idle():
    items = [_item("a", ["A"], unit="p"), _item("b", ["A"], unit="p")]
    assert shard(items, 3) == [["a", "b"], [], []]
    assert shard([], 2) == [[], []]
    with pytest.raises(ValueError):
        shard(items, 0)


def _fake_item(preset, test="test_generation", **changes):
    case = WanCase(get_preset(preset).replace(**changes), "tiny")
    return SimpleNamespace(nodeid=f"t.py::{test}[{case.id}]", originalname=test,
                           callspec=SimpleNamespace(params={"wan_case": case}))


def test_shard_items_key_on_the_weights_and_cost_on_the_plan():
    seed49, seed81 = shard_item(_fake_item("seed-832x1216-49f")), shard_item(_fake_item("seed-832x1216-81f"))
    template = shard_item(_fake_item("template-640x640-81f-20step"))
    other_kernel = shard_item(_fake_item("seed-832x1216-49f", attention="sdpa-math"))
    fp8 = shard_item(_fake_item("seed-832x1216-49f", precision="fp8-upcast"))
    assert seed49.keys == seed81.keys == other_kernel.keys  # same weights: the attention kernel swaps in place
    assert template.keys != seed49.keys and fp8.keys != seed49.keys
    assert seed81.cost > seed49.cost > 0  # more frames, more tokens
    assert seed49.unit != seed81.unit
    forward_fp8 = shard_item(_fake_item("seed-832x1216-49f", test="test_expert_forward", precision="fp8-upcast"))
    forward_bf16 = shard_item(_fake_item("seed-832x1216-49f", test="test_expert_forward"))
    assert set(forward_fp8.keys) & set(forward_bf16.keys)  # meets its bf16 SDPA reference
    assert forward_bf16.cost < seed49.cost
    assert shard_item(SimpleNamespace(nodeid="t.py::test_plain")) is None


# ------------------------------------------------------------------------------------------------ arguments


def test_worker_args_drop_what_the_controller_keeps():
    args = ["tests/benchmarks", "--wan-gpus", "all", "--benchmark-json", "out.json", "--benchmark-autosave",
            "--benchmark-save=nightly", "--junitxml=r.xml", "--wan-gpus-timeout=60", "--benchmark-histogram",
            "-k", "seed", "--benchmark-histogram", "h/x", "--benchmark-json=o2.json", "--wan-mode", "tiny",
            "--benchmark-compare", "-q", "--benchmark-histogram", "--wan-shard", "s.txt", "--wan-progress=p.jsonl"]
    assert worker_args(args) == ["tests/benchmarks", "-k", "seed", "--wan-mode", "tiny", "--benchmark-compare", "-q"]
    assert worker_args(()) == []


# ------------------------------------------------------------------------------------------------ merging


def _bench(name, median=1.0):
    return {"name": name.split("::")[-1], "fullname": name, "stats": {"median": median, "data": [median] * 2},
            "extra_info": {}}


def _result(index, nodeids, data, status="ok", code=0):
    return WorkerResult(index, Device(index), str(index), nodeids, Path(f"worker-{index}.log"), pid=100 + index,
                        exit_code=code, status=status, data=data)


def test_merge_keeps_every_worker_benchmark_in_collection_order_and_records_the_workers():
    base = {"machine_info": {"node": "controller"}, "commit_info": {"id": "abc"}, "datetime": "2026-01-01T00:00:00",
            "version": "5.2.3", "benchmarks": [_bench("t.py::test_cpu")]}
    w0 = _result(0, ["t.py::b"], {"machine_info": {"node": "w0", "gpu": {"name": "NVIDIA H100"}},
                                  "datetime": "later", "benchmarks": [_bench("t.py::b")]})
    w1 = _result(1, ["t.py::a", "t.py::c"], {"machine_info": {"node": "w1"}, "benchmarks": [_bench("t.py::a")]},
                 status="tests failed", code=1)
    w2 = _result(2, ["t.py::d"], None, status="died", code=-9)
    w2.problem = "exited with code -9 (killed by SIGKILL)"
    merged = merge(base, [w2, w1, w0], order=["t.py::a", "t.py::b", "t.py::c", "t.py::d", "t.py::test_cpu"])
    assert [b["fullname"] for b in merged["benchmarks"]] == ["t.py::a", "t.py::b", "t.py::test_cpu"]
    assert merged["machine_info"]["node"] == "w0"  # the hardware the cases ran on
    assert merged["datetime"] == base["datetime"] and merged["commit_info"] == {"id": "abc"}
    workers = merged["wan_workers"]
    assert [w["worker"] for w in workers] == [0, 1, 2]
    assert workers[0]["gpu"] == "NVIDIA H100" and workers[0]["benchmarks"] == ["t.py::b"]
    assert workers[2]["status"] == "died" and workers[2]["exit_code"] == -9 and workers[2]["benchmarks"] == []
    assert workers[2]["cases"] == ["t.py::d"] and "SIGKILL" in workers[2]["problem"]
    assert base["benchmarks"] == [_bench("t.py::test_cpu")]  # the input is not modified


def test_merge_without_any_worker_file_keeps_the_controllers_machine_info():
    base = {"machine_info": {"node": "controller"}, "benchmarks": []}
    merged = merge(base, [_result(0, ["x"], None, status="died", code=3)])
    assert merged["machine_info"] == {"node": "controller"} and merged["benchmarks"] == []
    assert merged["wan_workers"][0]["status"] == "died"


def test_progress_says_which_cases_a_worker_started_and_how_each_it_finished_ended(tmp_path):
    lines = [{"nodeid": "a", "when": "setup", "outcome": "passed"}, {"nodeid": "a", "when": "call", "outcome": "passed"},
             {"nodeid": "a", "when": "teardown", "outcome": "passed"},
             {"nodeid": "b", "when": "setup", "outcome": "passed"}, {"nodeid": "b", "when": "call", "outcome": "failed"},
             {"nodeid": "b", "when": "teardown", "outcome": "passed"},
             {"nodeid": "s", "when": "setup", "outcome": "skipped"}, {"nodeid": "s", "when": "teardown",
                                                                      "outcome": "passed"},
             {"nodeid": "t", "when": "setup", "outcome": "passed"}, {"nodeid": "t", "when": "call", "outcome": "passed"},
             {"nodeid": "t", "when": "teardown", "outcome": "failed"},
             {"nodeid": "c", "when": "setup", "outcome": "passed"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"nodeid": "d", "wh')  # cut short
    started, outcomes = read_progress(path)
    assert started == ["a", "b", "s", "t", "c"]
    assert outcomes == {"a": "passed", "b": "failed", "s": "skipped", "t": "failed"}  # c never ran its call
    assert read_progress(tmp_path / "missing.jsonl") == ([], {})


# ------------------------------------------------------------------------------------------------ inner sessions


@pytest.fixture
def inner(pytester, monkeypatch):
    """A pytester dir with the generation benchmark, running this checkout's wan_pipeline in every process, with
    no GPU visible: the workers are CPU workers whatever the machine has."""
    shutil.copy(BENCHMARK_TEST, pytester.path / "test_generation.py")
    cpu_only(monkeypatch)
    return pytester


def _gone(pid):
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return "State:\tZ" in state  # a zombie has ended; its parent is gone


def test_two_workers_merge_into_one_file_that_both_compare_tools_read(inner):
    store = inner.path / "store"
    result = inner.runpytest_subprocess(*MATRIX, "--benchmark-json", "out.json", "--benchmark-autosave",
                                        "--benchmark-storage", str(store), "--wan-out", str(inner.path / "out"))
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["worker 0 on cpu (CUDA_VISIBLE_DEVICES=''): ok, exit 0, 1 case(s): 1 passed; "
                                 "1 benchmark(s); log *worker-0.log",
                                 "worker 1 on cpu (CUDA_VISIBLE_DEVICES=''): ok, exit 0, 1 case(s): 1 passed; "
                                 "1 benchmark(s); log *worker-1.log",
                                 "wan-bench GPU matrix: 2 passed over 2 worker(s)"])
    data = json.loads((inner.path / "out.json").read_text())
    assert sorted(b["fullname"] for b in data["benchmarks"]) == sorted([SEED, TEMPLATE])
    workers = data["wan_workers"]
    assert len(workers) == 2 and all(w["status"] == "ok" and w["exit_code"] == 0 for w in workers)
    assert all(w["device"] == "cpu" and w["cuda_visible_devices"] == "" for w in workers)
    assert sorted(len(w["benchmarks"]) for w in workers) == [1, 1]  # one case each: two model sets
    assert {w["benchmarks"][0] for w in workers} == {SEED, TEMPLATE}
    assert data["machine_info"]["wan_env"]["version.torch"] and "gpu" in data["machine_info"]
    assert all(b["stats"]["rounds"] == 2 and len(b["stats"]["data"]) == 2 for b in data["benchmarks"])
    assert all(b["extra_info"]["mode"] == "tiny" for b in data["benchmarks"])
    for w in workers:
        assert Path(w["log"]).exists() and _gone(w["pid"])
    result.stdout.fnmatch_lines(["*wan-bench worker 0 on cpu*", "*wan-bench worker 1 on cpu*",
                                 "*wan-bench GPU matrix*", "*merged 2 benchmark(s) into*out.json*"])
    # exactly one history file, the merged one, in the per-GPU folder: the workers saved nothing themselves
    saved = list(store.rglob("*.json"))
    assert len(saved) == 1 and saved[0].parent.parent == store / "cpu" and saved[0].name.startswith("0001_")
    assert len(json.loads(saved[0].read_text())["benchmarks"]) == 2
    run = load_run(inner.path / "out.json")
    assert set(run.benchmarks) == {SEED, TEMPLATE}

    shutil.copy(inner.path / "out.json", inner.path / "again.json")
    from wan_pipeline.cli.main import main

    assert main(["compare", str(inner.path / "out.json"), str(inner.path / "again.json")]) == 0
    cli = shutil.which("pytest-benchmark") or shutil.which("py.test-benchmark")
    assert cli, "pytest-benchmark's CLI is not on PATH"
    out = subprocess.run([cli, "compare", str(inner.path / "out.json"), str(inner.path / "again.json")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "test_generation[seed-832x1216-49f" in out.stdout and "template-640x640-81f-20step" in out.stdout


KILLER = """
import os, subprocess

def pytest_runtest_call(item):
    shard = os.path.basename(item.config.getoption("wan_shard") or "")
    if shard == "worker-%s.shard" % os.environ.get("WAN_TEST_KILL_WORKER"):
        child = subprocess.Popen(["sleep", "300"])  # something the dying worker leaves behind
        with open(os.environ["WAN_TEST_CHILD_PID"], "w") as fh:
            fh.write(str(child.pid))
        os._exit(3)
"""


def test_a_worker_that_dies_fails_its_case_clearly_and_the_other_result_is_kept(inner, monkeypatch):
    inner.makeconftest(KILLER)
    monkeypatch.setenv("WAN_TEST_KILL_WORKER", "1")
    monkeypatch.setenv("WAN_TEST_CHILD_PID", str(inner.path / "child.pid"))
    result = inner.runpytest_subprocess(*MATRIX, "--benchmark-json", "out.json", "--wan-out", str(inner.path / "out"))
    assert result.ret == 1
    result.stdout.fnmatch_lines(["wan-bench GPU matrix: 1 failed, 1 passed over 2 worker(s)"])
    data = json.loads((inner.path / "out.json").read_text())
    dead = [w for w in data["wan_workers"] if w["worker"] == 1][0]
    alive = [w for w in data["wan_workers"] if w["worker"] == 0][0]
    assert dead["status"] == "died" and dead["exit_code"] == 3 and dead["benchmarks"] == []
    assert alive["status"] == "ok" and len(alive["benchmarks"]) == 1
    assert [b["fullname"] for b in data["benchmarks"]] == alive["benchmarks"]  # the other result is kept
    lost = dead["cases"][0]
    text = result.stdout.str()
    assert f"FAILED {lost}" in text
    result.stdout.fnmatch_lines(["*wan-bench worker 1 on cpu (CUDA_VISIBLE_DEVICES='') exited with code 3 * while "
                                 "running this case.*", "Its log: *worker-1.log", "Last lines:"])
    assert "Traceback" not in text
    child = int((inner.path / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(child), "the dead worker's child process is still running"
    assert all(_gone(w["pid"]) for w in data["wan_workers"])


SLEEPER = """
import os, time
from pathlib import Path

DONE = Path(os.environ["WAN_TEST_FAST_DONE"])


def _worker(config):  # the worker's index, from its shard file's name (worker-N.shard); None in the controller
    shard = config.getoption("wan_shard")
    return None if not shard else os.path.basename(shard)[len("worker-"):-len(".shard")]


def pytest_runtest_call(item):
    if _worker(item.config) == os.environ.get("WAN_TEST_SLOW_WORKER"):
        time.sleep(300)


def pytest_unconfigure(config):
    worker = _worker(config)
    if worker is not None and worker != os.environ["WAN_TEST_SLOW_WORKER"]:
        DONE.write_text(f"{os.getpid()} {time.time()!r}")


def _exited(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class ClockFromFastWorkerExit:
    \"\"\"The controller's clock stands still until the fast worker has exited (and been reaped), then runs: the
    timeout is counted from there, so how long workers take to start or to finish on this machine cannot decide
    which of them times out.\"\"\"

    def __init__(self):
        self.started = None

    def __getattr__(self, name):
        return getattr(time, name)

    def monotonic(self):
        if self.started is None:
            if not DONE.exists() or not _exited(int(DONE.read_text().split()[0])):
                return 0.0
            self.started = time.monotonic()
        return time.monotonic() - self.started


def pytest_configure(config):
    if _worker(config) is None:  # the controller
        import wan_pipeline.launch.workers as workers

        workers.time = ClockFromFastWorkerExit()
"""
TIMEOUT_S = 5


def test_a_worker_over_the_timeout_is_stopped_and_reported(inner, monkeypatch):
    inner.makeconftest(SLEEPER)
    done = inner.path / "fast-worker-done"
    monkeypatch.setenv("WAN_TEST_SLOW_WORKER", "0")
    monkeypatch.setenv("WAN_TEST_FAST_DONE", str(done))
    result = inner.runpytest_subprocess(*MATRIX, "--wan-gpus-timeout", str(TIMEOUT_S), "--benchmark-json",
                                        "out.json", "--wan-out", str(inner.path / "out"))
    assert done.exists(), result.stdout.str()
    assert time.time() - float(done.read_text().split()[1]) < TIMEOUT_S + 60  # stopped at the timeout, not at the 300 s sleep
    assert result.ret == 1
    data = json.loads((inner.path / "out.json").read_text())
    slow = [w for w in data["wan_workers"] if w["worker"] == 0][0]
    assert slow["status"] == "timed out" and f"--wan-gpus-timeout {TIMEOUT_S} s" in slow["problem"]
    assert [w["status"] for w in data["wan_workers"] if w["worker"] == 1] == ["ok"], result.stdout.str()
    assert len(data["benchmarks"]) == 1
    result.stdout.fnmatch_lines([f"FAILED {slow['cases'][0]}*"])
    assert all(_gone(w["pid"]) for w in data["wan_workers"])


def test_more_gpus_than_exist_is_a_usage_error_naming_both_numbers(inner):
    result = inner.runpytest_subprocess(*PLAIN, "--wan-mode", "synthetic", "--wan-gpus", "3",
                                        "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --wan-gpus / WAN_GPUS '3': 3 GPUs asked for but this host has 0 "
                                 "(torch.cuda.device_count())"])
    assert "Traceback" not in result.stderr.str()


def test_collect_only_shows_the_plan_and_starts_no_worker(inner, monkeypatch):
    monkeypatch.setenv("WAN_GPUS", "3")
    result = inner.runpytest_subprocess(*PLAIN, "--wan-mode", "tiny", "--wan-preset",
                                        PRESETS + ",seed-832x1216-81f", "--collect-only", "-q",
                                        "--wan-out", str(inner.path / "out"))
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*wan-bench GPU matrix plan*", "worker 0 on cpu: 1 case(s)", "worker 1 on cpu: 1 "
                                 "case(s)", "worker 2 on cpu: 1 case(s)"])
    assert not (inner.path / "out" / "gpu-matrix").exists()

"""The benchmark matrix spread over a host's GPUs: `pytest --wan-gpus all` (issue 8).

No xdist: pytest-benchmark switches itself off under xdist, and xdist's scheduler knows nothing of model sets.
Instead the pytest session the user starts (the controller) collects as usual, shards the wan cases over one
worker per GPU so that cases loading the same weights stay on one worker (balanced by a cost estimate), and starts
one `python -m pytest` per worker with the same arguments, `CUDA_VISIBLE_DEVICES` pinned to its GPU and
`--wan-worker I --wan-shard FILE`. Each worker is an ordinary benchmarking session with its own model cache and its
own `--benchmark-json`; its test reports stream back to the controller, which shows them as its own (so the
terminal summary, the exit status and --junitxml cover every case). When the workers are done the controller runs
whatever it did not hand out (tests without a wan case) and merges the workers' pytest-benchmark JSON with its own
into one file: `--benchmark-json PATH` and/or `--benchmark-save/--benchmark-autosave` into the per-GPU storage
folder, written atomically.

A worker that dies or fails is reported (worker, device, exit code, its log's last lines); the cases it never
finished fail with that message, the other workers' results are kept, and no process of its group is left behind.

Pure parts (device parsing, sharding, argument filtering, merging) are functions of their inputs, tested on CPU.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pytest

from wan_pipeline.launch.processes import kill_group, start_group, stop_group

# ------------------------------------------------------------------------------------------------ devices


@dataclass(frozen=True)
class Device:
    """Where one worker runs: a CUDA device index as torch numbers it in the controller, or None for the CPU."""

    index: int | None

    @property
    def label(self) -> str:
        return "cpu" if self.index is None else f"GPU {self.index}"

    def visible_devices(self, parent: str | None) -> str:
        """The worker's CUDA_VISIBLE_DEVICES: its device as the driver names it (through the controller's own
        CUDA_VISIBLE_DEVICES when that is set), or empty for a CPU worker, which hides every GPU."""
        if self.index is None:
            return ""
        entries = [e.strip() for e in (parent or "").split(",") if e.strip()]
        return entries[self.index] if entries else str(self.index)


def parse_gpus(value: str, device_count: int, cpu_workers_allowed: bool = False) -> list[Device]:
    """--wan-gpus: `all`, a count N (the first N devices) or a comma list of device indices (one index: `2,`).

    With no CUDA device and `cpu_workers_allowed` (tiny mode), a count N means N CPU workers: how the sharding and
    merging are exercised without a GPU. Anything else that cannot be honoured is a usage error naming the value.
    """
    raw = str(value).strip()
    where = f"--wan-gpus / WAN_GPUS {raw!r}"
    if raw.lower() == "all":
        if device_count == 0:
            hint = " (in tiny mode give a number of CPU workers instead, e.g. --wan-gpus 2)" if cpu_workers_allowed else ""
            raise pytest.UsageError(f"{where}: this host has no CUDA device (torch.cuda.device_count() is 0){hint}")
        return [Device(i) for i in range(device_count)]
    if "," not in raw:
        try:
            count = int(raw)
        except ValueError:
            raise pytest.UsageError(f"{where}: expected all, a number of GPUs or a comma list of device indices") from None
        if count < 1:
            raise pytest.UsageError(f"{where}: the number of GPUs must be at least 1")
        if device_count == 0 and cpu_workers_allowed:
            return [Device(None) for _ in range(count)]
        if count > device_count:
            raise pytest.UsageError(f"{where}: {count} GPUs asked for but this host has {device_count} "
                                    f"(torch.cuda.device_count())")
        return [Device(i) for i in range(count)]
    indices = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        try:
            index = int(part)
        except ValueError:
            raise pytest.UsageError(f"{where}: {part!r} is not a device index") from None
        if index < 0 or index >= device_count:
            raise pytest.UsageError(f"{where}: device {index} does not exist; this host has {device_count} CUDA "
                                    f"device(s) (torch.cuda.device_count()), numbered from 0")
        if index in indices:
            raise pytest.UsageError(f"{where}: device {index} is named twice (one worker per GPU)")
        indices.append(index)
    if not indices:
        raise pytest.UsageError(f"{where}: no device index given")
    return [Device(i) for i in indices]


def parse_timeout(value: str | None) -> float | None:
    """--wan-gpus-timeout: seconds the workers may run in all; unset or 0 for no limit."""
    if value is None or not str(value).strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise pytest.UsageError(f"--wan-gpus-timeout / WAN_GPUS_TIMEOUT must be a number of seconds, got {value!r}") from None
    if seconds < 0 or seconds != seconds:
        raise pytest.UsageError(f"--wan-gpus-timeout / WAN_GPUS_TIMEOUT must be at least 0, got {value!r}")
    return seconds or None


# ------------------------------------------------------------------------------------------------ sharding


@dataclass(frozen=True)
class ShardItem:
    """One test to place. Items sharing any of `keys` stay on one worker (a model set loads once per worker; an
    expert-forward case meets its bf16 SDPA reference). `unit` is the smallest piece a group is split into when
    there are more workers than groups (cases of one preset stay together); `cost` is what balancing weighs."""

    nodeid: str
    keys: tuple[str, ...]
    unit: str
    cost: float


def _components(items: Sequence[ShardItem]) -> list[list[int]]:
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, item in enumerate(items):
        for key in item.keys:
            if key in owner:
                a, b = find(owner[key]), find(i)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                owner[key] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(items)):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def _lpt(parts: list[list[int]], bins: int, cost) -> list[list[int]]:
    """Longest-processing-time-first: each part, costliest first, to the least loaded bin (ties: fewer parts, then
    the lower bin). Deterministic for equal inputs."""
    loads = [0.0] * bins
    out: list[list[int]] = [[] for _ in range(bins)]
    counts = [0] * bins
    for part in sorted(parts, key=lambda p: (-cost(p), p[0])):
        b = min(range(bins), key=lambda k: (loads[k], counts[k], k))
        out[b].extend(part)
        loads[b] += cost(part)
        counts[b] += 1
    return [sorted(b) for b in out]


def shard(items: Sequence[ShardItem], workers: int) -> list[list[str]]:
    """Node ids per worker (in the order given). Groups of items that share a key never straddle workers; with more
    workers than groups the costliest splittable group is split by `unit` (one more model load, a shorter run)."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")

    def cost(part: list[int]) -> float:
        return sum(items[i].cost for i in part)

    parts = _components(items)
    while len(parts) < workers:
        splittable = [p for p in parts if len({items[i].unit for i in p}) > 1]
        if not splittable:
            break
        target = max(splittable, key=lambda p: (cost(p), -p[0]))
        units: dict[str, list[int]] = {}
        for i in target:
            units.setdefault(items[i].unit, []).append(i)
        halves = _lpt(list(units.values()), 2, cost)
        parts.remove(target)
        parts.extend(h for h in halves if h)
        parts.sort(key=lambda p: p[0])
    return [[items[i].nodeid for i in b] for b in _lpt(parts, workers, cost)]


def shard_item(item) -> ShardItem | None:
    """The ShardItem of a collected test with a wan case (None for any other test): keys from the weights it loads,
    its cost from the plan (model FLOPs of the forwards it times)."""
    from wan_pipeline.plan.config import ModelSetKey
    from wan_pipeline.plan.plan import make_plan
    from wan_pipeline.run.case import forward_flops
    from wan_pipeline.suite.cases import _case_of

    case = _case_of(item)
    if case is None:
        return None
    key = ModelSetKey.for_run(case.config, case.mode, None).weights()
    preset = f"{case.config.name}|{case.mode}"
    keys = [f"models:{key!r}"]
    plan = make_plan(case.config, case.mode)
    forwards = plan.forwards
    if getattr(item, "originalname", None) == "test_expert_forward":
        keys.append(f"forward-reference:{preset}")  # cosine vs the bf16 SDPA case of the same preset
        forwards = 1
    return ShardItem(item.nodeid, tuple(keys), preset, forward_flops(plan.tokens) * forwards)


# ------------------------------------------------------------------------------------------------ worker command


# Options the controller keeps for itself: its results file, its history save, its report files, the matrix.
_STRIP_WITH_VALUE = ("--wan-gpus", "--wan-gpus-timeout", "--wan-worker", "--wan-shard", "--benchmark-json",
                     "--benchmark-save", "--junitxml", "--junit-xml", "--result-log")
_STRIP_FLAG = ("--benchmark-autosave",)
_STRIP_OPTIONAL_VALUE = ("--benchmark-histogram",)


def worker_args(args: Sequence[str]) -> list[str]:
    """`args` without the options the controller handles itself (both `--opt value` and `--opt=value`)."""
    out: list[str] = []
    i = 0
    args = list(args)
    while i < len(args):
        arg = str(args[i])
        name = arg.split("=", 1)[0]
        if name in _STRIP_WITH_VALUE:
            i += 1 if "=" in arg else 2
            continue
        if name in _STRIP_FLAG:
            i += 1
            continue
        if name in _STRIP_OPTIONAL_VALUE:
            # argparse's nargs='?': the next word is the option's value unless it looks like an option
            i += 1 if "=" in arg or i + 1 >= len(args) or str(args[i + 1]).startswith("-") else 2
            continue
        out.append(arg)
        i += 1
    return out


# ------------------------------------------------------------------------------------------------ merging


@dataclass
class WorkerResult:
    """What one worker did: its assignment, how it ended and the benchmark JSON it left (None if none)."""

    index: int
    device: Device
    visible_devices: str
    nodeids: list[str]
    log: Path
    pid: int | None = None
    exit_code: int | None = None
    status: str = "not started"  # ok | tests failed | died | timed out | error
    problem: str | None = None  # why the status is not ok, in words
    data: dict | None = None
    problem_reported: bool = False  # its unfinished cases got failed reports naming the problem

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "tests failed")

    def to_json(self) -> dict:
        gpu = ((self.data or {}).get("machine_info") or {}).get("gpu")
        return {
            "worker": self.index,
            "device": self.device.label,
            "cuda_visible_devices": self.visible_devices,
            "gpu": gpu.get("name") if isinstance(gpu, dict) else None,
            "pid": self.pid,
            "exit_code": self.exit_code,
            "status": self.status,
            "problem": self.problem,
            "cases": list(self.nodeids),
            "benchmarks": [b.get("fullname") or b.get("name") for b in (self.data or {}).get("benchmarks", [])],
            "log": str(self.log),
        }


def merge(base: dict, workers: Sequence[WorkerResult], order: Sequence[str] = ()) -> dict:
    """One pytest-benchmark JSON from the controller's own output (`base`: commit_info, datetime, version and the
    benchmarks it ran itself) and the workers': machine_info from the first worker that left a file (the hardware
    the cases ran on), every benchmark (in collection `order`), and `wan_workers` recording each worker."""
    merged = dict(base)
    benchmarks = list(base.get("benchmarks") or [])
    machine_info = None
    for worker in sorted(workers, key=lambda w: w.index):
        if worker.data is None:
            continue
        if machine_info is None and isinstance(worker.data.get("machine_info"), dict):
            machine_info = worker.data["machine_info"]
        benchmarks.extend(worker.data.get("benchmarks") or [])
    rank = {nodeid: i for i, nodeid in enumerate(order)}
    merged["benchmarks"] = sorted(benchmarks, key=lambda b: rank.get(b.get("fullname"), len(rank)))  # stable
    if machine_info is not None:
        merged["machine_info"] = machine_info
    merged["wan_workers"] = [w.to_json() for w in sorted(workers, key=lambda w: w.index)]
    return merged


def gpu_models(workers: Sequence[WorkerResult]) -> list[str]:
    names = {w.to_json()["gpu"] for w in workers if w.data is not None}
    return sorted(n or "cpu" for n in names)


# ------------------------------------------------------------------------------------------------ processes


def _exit_meaning(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + (" (out of host memory?)" if -code == signal.SIGKILL else "")
    E = pytest.ExitCode
    return {E.INTERRUPTED: "interrupted", E.INTERNAL_ERROR: "pytest internal error, or the process ended itself",
            E.USAGE_ERROR: "pytest usage error", E.NO_TESTS_COLLECTED: "collected none of its cases"}.get(
        code, "ended abnormally")


def tail(path: Path, lines: int = 15) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return text.rstrip("\n").splitlines()[-lines:]


def log_section(path: Path, title: str = "wan-bench") -> list[str]:
    """The lines of one `==== title ====` terminal section in a worker's log."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    out, inside = [], False
    for line in lines:
        stripped = line.strip()
        is_sep = stripped.startswith("=") and stripped.endswith("=") and len(stripped) > 10
        if is_sep:
            inside = stripped.strip("= ") == title
            continue
        if inside:
            out.append(line)
    return out


@dataclass
class _Running:
    result: WorkerResult
    proc: subprocess.Popen
    reports: Path
    json_path: Path
    offset: int = 0
    pending: str = ""
    started: set = field(default_factory=set)  # node ids whose setup report arrived
    finished: set = field(default_factory=set)  # node ids whose teardown report arrived


# ------------------------------------------------------------------------------------------------ the controller


class MatrixController:
    """The session the user started: shards, launches, streams the workers' reports, merges their results."""

    def __init__(self, config, devices: list[Device], timeout: float | None):
        self.config = config
        self.devices = devices
        self.timeout = timeout
        self.assignments: list[tuple[Device, list[str]]] = []
        self.locations: dict[str, tuple] = {}
        self.order: list[str] = []
        self.results: list[WorkerResult] | None = None
        self.folder: Path | None = None
        self.saved: list[str] = []
        self.idle: list[Device] = []

    # -- collection
    def pytest_report_header(self, config):
        return [f"wan-bench: the wan cases go to {len(self.devices)} worker(s): "
                f"{', '.join(d.label for d in self.devices)} (--wan-gpus)"]

    @pytest.hookimpl(trylast=True)  # after -k/-m deselection and the model-set ordering
    def pytest_collection_modifyitems(self, session, config, items):
        placed = [(item, shard_item(item)) for item in items]
        wan = [(item, s) for item, s in placed if s is not None]
        if not wan:
            return
        self.order = [item.nodeid for item in items]
        self.locations = {item.nodeid: item.location for item, _ in wan}
        shards = shard([s for _, s in wan], len(self.devices))
        self.assignments = [(d, ids) for d, ids in zip(self.devices, shards) if ids]
        self.idle = [d for d, ids in zip(self.devices, shards) if not ids]
        if config.option.collectonly:
            return  # show the whole matrix; the plan is printed in the summary
        handed = {item.nodeid for item, _ in wan}
        items[:] = [item for item in items if item.nodeid not in handed]

    # -- running
    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtestloop(self, session):
        """The tests the controller kept run first (alone on the machine), then the workers. A collection error, a
        stop (-x) or an interrupt in the first part means no worker starts."""
        if self.assignments and not session.config.option.collectonly:
            session.testscollected += sum(len(ids) for _, ids in self.assignments)
        outcome = yield
        if self.assignments and not session.config.option.collectonly and not session.shouldstop \
                and not session.shouldfail:
            self.results = self._run_workers(session)
            for result in self.results:
                if not result.ok and not result.problem_reported:
                    session.testsfailed += 1  # a worker that died after its last case still fails the session
        return outcome

    def _worker_command(self, index: int, shard_file: Path, json_path: Path) -> list[str]:
        config = self.config
        args = worker_args(config.getini("addopts") or [])
        args += worker_args(shlex.split(os.environ.get("PYTEST_ADDOPTS", "")))
        args += worker_args(config.invocation_params.args)
        return [sys.executable, "-m", "pytest", *args, "-o", "addopts=", "--wan-worker", str(index),
                "--wan-shard", str(shard_file), "--benchmark-json", str(json_path)]

    def _worker_env(self, device: Device) -> dict[str, str]:
        env = dict(os.environ)
        for name in ("WAN_GPUS", "WAN_GPUS_TIMEOUT", "PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER"):
            env.pop(name, None)
        env["CUDA_VISIBLE_DEVICES"] = device.visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"))
        if device.index is None and "OMP_NUM_THREADS" not in os.environ:  # CPU workers share the cores
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(self.assignments)))
        return env

    def _write(self, line: str, **markup) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(line, **markup)

    def _run_workers(self, session) -> list[WorkerResult]:
        from wan_pipeline.suite.options import read_options

        out = read_options(self.config).out
        out = out if out.is_absolute() else Path(self.config.invocation_params.dir) / out
        self.folder = out / "gpu-matrix" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.folder.mkdir(parents=True, exist_ok=True)
        running: list[_Running] = []
        previous_term = None
        try:
            if hasattr(signal, "SIGTERM"):
                def on_term(signum, frame):
                    raise KeyboardInterrupt(f"signal {signum}")

                try:
                    previous_term = signal.signal(signal.SIGTERM, on_term)
                except ValueError:  # not the main thread
                    previous_term = None
            for index, (device, nodeids) in enumerate(self.assignments):
                base = self.folder / f"worker-{index}"
                shard_file, log = base.with_suffix(".shard"), base.with_suffix(".log")
                json_path, reports = base.with_suffix(".json"), base.with_suffix(".reports.jsonl")
                shard_file.write_text("".join(f"{n}\n" for n in nodeids))
                env = self._worker_env(device)
                result = WorkerResult(index, device, env["CUDA_VISIBLE_DEVICES"], list(nodeids), log)
                with open(log, "wb") as fh:
                    proc = start_group(self._worker_command(index, shard_file, json_path), env=env,
                                       cwd=self.config.invocation_params.dir, stdin=subprocess.DEVNULL,
                                       stdout=fh, stderr=subprocess.STDOUT)
                result.status, result.pid = "running", proc.pid
                running.append(_Running(result, proc, reports, json_path))
                self._write(f"wan-bench worker {index} on {device.label} (CUDA_VISIBLE_DEVICES="
                            f"{result.visible_devices!r}, pid {proc.pid}): {len(nodeids)} case(s), log {log}")
            for device in self.idle:
                self._write(f"wan-bench: {device.label} has no work (fewer model sets than workers)", yellow=True)
            self._wait(running)
        finally:
            for run in running:  # an interrupt, a timeout or an error here: nothing is left running
                if run.proc.poll() is None:
                    self._stop(run, "stopped: the controller was interrupted", "error")
                kill_group(run.proc.pid)
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
        return [run.result for run in running]

    def _wait(self, running: list[_Running]) -> None:
        deadline = time.monotonic() + self.timeout if self.timeout else None
        alive = list(running)
        while alive:
            for run in list(alive):
                self._forward_reports(run)
                if run.proc.poll() is not None:
                    kill_group(run.proc.pid)  # whatever it started goes with it
                    self._finish(run)
                    alive.remove(run)
            if alive and deadline is not None and time.monotonic() > deadline:
                for run in alive:
                    self._stop(run, f"timed out: still running after --wan-gpus-timeout {self.timeout:g} s",
                               "timed out")
                    self._finish(run)
                alive = []
            if alive:
                time.sleep(0.2)

    def _stop(self, run: _Running, problem: str, status: str) -> None:
        """SIGINT first (pytest finishes the session and writes the JSON of the cases done), then SIGKILL."""
        stop_group(run.proc, signal.SIGINT)
        run.result.status, run.result.problem = status, problem

    def _forward_reports(self, run: _Running) -> None:
        """Show the worker's test reports as this session's own (terminal, exit status, junitxml)."""
        try:
            with open(run.reports, "rb") as fh:
                fh.seek(run.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return
        run.offset += len(chunk)
        run.pending += chunk.decode("utf-8", errors="replace")
        *lines, run.pending = run.pending.split("\n")
        hook = self.config.hook
        for line in lines:
            if not line.strip():
                continue
            try:
                report = hook.pytest_report_from_serializable(config=self.config, data=json.loads(line))
            except Exception:
                continue
            if report is None or not hasattr(report, "when"):
                continue
            if report.nodeid not in run.started:
                run.started.add(report.nodeid)
                hook.pytest_runtest_logstart(nodeid=report.nodeid, location=tuple(report.location))
            hook.pytest_runtest_logreport(report=report)
            if report.when == "teardown":
                run.finished.add(report.nodeid)
                hook.pytest_runtest_logfinish(nodeid=report.nodeid, location=tuple(report.location))

    def _finish(self, run: _Running) -> None:
        from wan_pipeline.history.runs import HistoryFileError, load_run

        self._forward_reports(run)
        result = run.result
        code = run.proc.returncode
        result.exit_code = code
        if result.status == "running":
            E = pytest.ExitCode
            if code == E.OK:
                result.status = "ok"
            elif code == E.TESTS_FAILED:
                result.status = "tests failed"
            else:
                stopped_cleanly = code in (E.INTERRUPTED, E.USAGE_ERROR, E.NO_TESTS_COLLECTED)
                result.status = "error" if stopped_cleanly else "died"
                result.problem = f"exited with code {code} ({_exit_meaning(code)})"
        if run.json_path.exists() and run.json_path.stat().st_size:
            try:
                result.data = load_run(run.json_path).data
            except HistoryFileError as exc:
                result.problem = (result.problem + "; " if result.problem else "") + f"its results are unusable: {exc}"
                if result.ok:
                    result.status = "error"
        if not result.ok:
            self._fail_unfinished(run)
        what = {"ok": "done", "tests failed": "done, with failures"}.get(result.status, result.status)
        self._write(f"wan-bench worker {result.index} on {result.device.label}: {what} "
                    f"(exit {code}, {len((result.data or {}).get('benchmarks', []))} benchmark(s))",
                    **({} if result.status == "ok" else {"red": True}))

    def _fail_unfinished(self, run: _Running) -> None:
        """The cases a dead worker never finished fail with the reason, so the summary names each of them."""
        from _pytest.reports import TestReport

        result = run.result
        last = "\n".join(f"    {line}" for line in tail(result.log))
        for nodeid in result.nodeids:
            if nodeid in run.finished:
                continue
            state = "while running this case" if nodeid in run.started else "before reaching this case"
            message = (f"wan-bench worker {result.index} on {result.device.label} (CUDA_VISIBLE_DEVICES="
                       f"{result.visible_devices!r}) {result.problem} {state}.\nIts log: {result.log}\n"
                       f"Last lines:\n{last}")
            location = self.locations.get(nodeid, (nodeid.split("::")[0], None, nodeid))
            report = TestReport(nodeid, location, {}, "failed", message, "call")
            hook = self.config.hook
            if nodeid not in run.started:
                hook.pytest_runtest_logstart(nodeid=nodeid, location=location)
            hook.pytest_runtest_logreport(report=report)
            hook.pytest_runtest_logfinish(nodeid=nodeid, location=location)
            result.problem_reported = True

    # -- saving
    @pytest.hookimpl(wrapper=True, tryfirst=True)  # before pytest-benchmark's own saving
    def pytest_sessionfinish(self, session, exitstatus):
        if self.results is not None:
            self._save()
        return (yield)

    def _save(self) -> None:
        from wan_pipeline.fsutil import atomic_write_json

        bs = getattr(self.config, "_benchmarksession", None)
        if bs is None:
            return
        hook = self.config.hook
        save = bs.save or bs.autosave
        if not (save or bs.json):
            return
        machine_info = bs.get_machine_info()
        commit_info = hook.pytest_benchmark_generate_commit_info(config=self.config)
        hook.pytest_benchmark_update_commit_info(config=self.config, commit_info=commit_info)
        base = hook.pytest_benchmark_generate_json(config=self.config, benchmarks=bs.benchmarks, include_data=True,
                                                   machine_info=machine_info, commit_info=commit_info)
        merged = merge(base, self.results, self.order)
        # the hooks a single session applies to its JSON (the speed-up over stock diffusers, now across workers)
        hook.pytest_benchmark_update_json(config=self.config, benchmarks=bs.benchmarks, output_json=merged)
        if bs.json:
            # pytest-benchmark 5.3 keeps --benchmark-json as a path, older releases as an open file
            target = os.fspath(bs.json) if isinstance(bs.json, (str, os.PathLike)) else getattr(bs.json, "name", None)
            if isinstance(bs.json, (str, os.PathLike)):
                atomic_write_json(target, merged)
            elif isinstance(target, str) and not target.startswith("<"):
                bs.json.close()
                atomic_write_json(target, merged)
            else:  # a stream (stdout)
                bs.json.write(json.dumps(merged, indent=4, default=str).encode())
                bs.json.flush()
            self.saved.append(f"merged {len(merged['benchmarks'])} benchmark(s) into {target}")
        if save:
            if merged["benchmarks"]:
                bs.storage.save(merged, save)
                self.saved.append(f"saved the merged run ({len(merged['benchmarks'])} benchmark(s)) to "
                                  f"{bs.storage}")
            else:
                self.saved.append("nothing saved to the history: no benchmark result came back")
        bs.json, bs.save, bs.autosave = None, None, None  # saved here, merged: pytest-benchmark must not again

    # -- reporting
    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        tr = terminalreporter
        if self.assignments and self.results is None:
            if config.option.collectonly:
                tr.section("wan-bench GPU matrix plan")
                for index, (device, ids) in enumerate(self.assignments):
                    tr.write_line(f"worker {index} on {device.label}: {len(ids)} case(s)")
                    for nodeid in ids:
                        tr.write_line(f"    {nodeid}")
            return
        if self.results is None:
            return
        tr.section("wan-bench GPU matrix")
        for result in self.results:
            count = len((result.data or {}).get("benchmarks", []))
            head = (f"worker {result.index} on {result.device.label} (CUDA_VISIBLE_DEVICES="
                    f"{result.visible_devices!r}): {result.status}, exit {result.exit_code}, {len(result.nodeids)} "
                    f"case(s), {count} benchmark(s); log {result.log}")
            tr.write_line(head, **({"green": True} if result.status == "ok" else {"red": True}))
            if result.problem:
                tr.write_line(f"    {result.problem}", red=True)
                for line in ([] if result.problem_reported else tail(result.log)):  # else shown with its cases
                    tr.write_line(f"    | {line}")
            for line in log_section(result.log):
                tr.write_line(f"    {line}")
        models = gpu_models(self.results)
        if len(models) > 1:
            tr.write_line(f"the workers ran on different GPU models ({', '.join(models)}): the merged file carries "
                          f"the first worker's machine_info", yellow=True)
        for line in self.saved:
            tr.write_line(line)


# ------------------------------------------------------------------------------------------------ the worker


class MatrixWorker:
    """A session started by the controller: runs exactly its shard and streams its test reports back."""

    def __init__(self, config, index: str, shard_file: str | None):
        if shard_file is None:
            raise pytest.UsageError(f"--wan-worker {index} needs --wan-shard FILE (both are set by --wan-gpus)")
        path = Path(shard_file)
        try:
            self.nodeids = [line for line in path.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise pytest.UsageError(f"--wan-shard {shard_file!r}: cannot read: {exc.strerror or exc}") from None
        self.config = config
        self.index = index
        self.reports = path.with_suffix(".reports.jsonl")
        self.reports.write_bytes(b"")
        self.fh = None

    def pytest_report_header(self, config):
        return [f"wan-bench worker {self.index} of a --wan-gpus matrix, CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}, {len(self.nodeids)} case(s)"]

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session, config, items):
        wanted = set(self.nodeids)
        found = {item.nodeid for item in items}
        missing = [n for n in self.nodeids if n not in found]
        if missing:
            raise pytest.UsageError(f"wan-bench worker {self.index}: {len(missing)} case(s) of its shard were not "
                                    f"collected here (the worker's collection differs from the controller's): "
                                    f"{', '.join(missing[:5])}")
        kept = [item for item in items if item.nodeid in wanted]
        dropped = [item for item in items if item.nodeid not in wanted]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = kept

    def pytest_runtest_logreport(self, report):
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        if data is None:
            return
        if self.fh is None:
            self.fh = open(self.reports, "ab")
        self.fh.write((json.dumps(data, default=str) + "\n").encode())
        self.fh.flush()

    def pytest_unconfigure(self, config):
        if self.fh is not None:
            self.fh.close()


# ------------------------------------------------------------------------------------------------ wiring


def addoption(group) -> None:
    """The worker's own options, set by the controller (not for direct use)."""
    group.addoption("--wan-worker", default=None, help="internal: this session is worker N of a --wan-gpus matrix")
    group.addoption("--wan-shard", default=None, help="internal: file of the node ids a --wan-gpus worker runs")


def configure(config) -> None:
    """Register the controller (for --wan-gpus / WAN_GPUS) or the worker (for --wan-worker) plugin."""
    from wan_pipeline.suite.cases import resolved_mode
    from wan_pipeline.suite.options import _option, read_options

    worker = config.getoption("wan_worker")
    if worker is not None:
        config.pluginmanager.register(MatrixWorker(config, worker, config.getoption("wan_shard")), "wan-gpu-worker")
        return
    raw = _option(config, "--wan-gpus")
    if raw is None or not str(raw).strip():
        return
    if os.environ.get("PYTEST_XDIST_WORKER") or config.getoption("dist", "no") != "no" \
            or config.getoption("numprocesses", None):
        raise pytest.UsageError("--wan-gpus spreads the matrix with its own worker processes; do not combine it "
                                "with xdist (-n/--dist): pytest-benchmark turns itself off under xdist")
    timeout = parse_timeout(_option(config, "--wan-gpus-timeout"))
    import torch

    mode = resolved_mode(read_options(config))
    devices = parse_gpus(raw, torch.cuda.device_count(), cpu_workers_allowed=(mode == "tiny"))
    config.pluginmanager.register(MatrixController(config, devices, timeout), "wan-gpu-matrix")


__all__ = ["Device", "MatrixController", "MatrixWorker", "ShardItem", "WorkerResult", "merge", "parse_gpus",
           "parse_timeout", "shard", "shard_item", "worker_args"]

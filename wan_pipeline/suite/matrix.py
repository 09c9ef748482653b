"""`pytest --wan-gpus all`: the benchmark matrix spread over a host's GPUs, the pytest side.

No xdist: pytest-benchmark switches itself off under xdist, and xdist's scheduler knows nothing of model sets.
The session the user starts (the controller) collects as usual, shards the wan cases over one worker per GPU so
that cases loading the same weights stay on one worker (launch.shards), runs what it kept (tests without a wan
case), then starts the workers: plain `pytest --benchmark-json` processes over their node ids (launch.workers).
It prints each worker's outcome, the cases that failed and, for a worker that died or timed out, the cases it never
finished with its exit code and last log lines; it exits non-zero when any worker failed. The workers'
pytest-benchmark files are merged with its own into `--benchmark-json` and the history save (suite.saving), with a
`wan_workers` entry naming which worker and GPU ran what.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import pytest

from wan_pipeline.launch.shards import (Device, ShardItem, WorkerResult, gpu_models, log_section, merge, shard, tail,
                                        worker_args)
from wan_pipeline.suite.cases import case_of


def shard_item(item) -> ShardItem | None:
    """The ShardItem of a collected test with a wan case (None for any other test): keys from the weights it loads,
    its cost from the plan (model FLOPs of the forwards it times)."""
    from wan_pipeline.plan.config import ModelSetKey
    from wan_pipeline.plan.plan import make_plan
    from wan_pipeline.run.case import forward_flops

    case = case_of(item)
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


def full_args(config) -> list[str]:
    """The user's pytest arguments as pytest read them: ini addopts, $PYTEST_ADDOPTS, the command line. A
    sub-session gets them with `-o addopts=` and without $PYTEST_ADDOPTS, so nothing is read twice."""
    return [*(config.getini("addopts") or []), *shlex.split(os.environ.get("PYTEST_ADDOPTS", "")),
            *[str(a) for a in config.invocation_params.args]]


def sub_session_args(config) -> list[str]:
    """full_args without the result files and the matrix options: what a --wan-gpus worker runs with."""
    return worker_args(full_args(config))


# ------------------------------------------------------------------------------------------------ the controller


class MatrixController:
    """The session the user started: shards, keeps the other tests, starts the workers, merges their results."""

    def __init__(self, config, devices: list[Device], timeout: float | None, out: Path):
        self.config = config
        self.devices = devices
        self.timeout = timeout
        self.out = out
        self.assignments: list[tuple[Device, list[str]]] = []
        self.order: list[str] = []
        self.results: list[WorkerResult] | None = None
        self.idle: list[Device] = []

    def pytest_report_header(self, config):
        return [f"wan-bench: the wan cases go to {len(self.devices)} worker(s): "
                f"{', '.join(d.label for d in self.devices)} (--wan-gpus)"]

    @pytest.hookimpl(trylast=True)  # after -k/-m deselection and the model-set ordering
    def pytest_collection_modifyitems(self, session, config, items):
        wan = [(item, s) for item, s in ((item, shard_item(item)) for item in items) if s is not None]
        if not wan:
            return
        self.order = [item.nodeid for item in items]
        shards = shard([s for _, s in wan], len(self.devices))
        self.assignments = [(d, ids) for d, ids in zip(self.devices, shards) if ids]
        self.idle = [d for d, ids in zip(self.devices, shards) if not ids]
        if config.option.collectonly:
            return  # show the whole matrix; the plan is printed in the summary
        handed = {item.nodeid for item, _ in wan}
        items[:] = [item for item in items if item.nodeid not in handed]

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtestloop(self, session):
        """The tests the controller kept run first (alone on the machine), then the workers. A collection error, a
        stop (-x) or an interrupt in the first part means no worker starts."""
        outcome = yield
        if self.assignments and not session.config.option.collectonly and not session.shouldstop \
                and not session.shouldfail:
            self.results = self._run_workers()
        return outcome

    def _run_workers(self) -> list[WorkerResult]:
        from wan_pipeline.launch.workers import run_workers

        invocation = Path(self.config.invocation_params.dir)
        out = self.out if self.out.is_absolute() else invocation / self.out
        folder = out / "gpu-matrix" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        for device in self.idle:
            self._write(f"wan-bench: {device.label} has no work (fewer model sets than workers)", yellow=True)
        return run_workers(self.assignments, sub_session_args(self.config), folder, cwd=invocation,
                           timeout=self.timeout, say=self._write)

    def _write(self, line: str, **markup) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(line, **markup)

    @pytest.hookimpl(tryfirst=True)  # before the other additions (the speed-ups) see the benchmarks
    def pytest_benchmark_update_json(self, config, benchmarks, output_json):
        if self.results is not None:
            output_json.update(merge(output_json, self.results, self.order))

    def unbudgeted(self) -> int:
        """Generation cases the workers ran without a budget (their summaries say so)."""
        return sum("no budget for this card and preset" in line
                   for result in self.results or [] for line in log_section(result.log))

    def failed(self) -> bool:
        return self.results is not None and any(
            r.status != "ok" or "failed" in r.outcomes.values() for r in self.results)

    def pytest_sessionfinish(self, session, exitstatus):
        """Exit non-zero when a worker failed; a controller that kept no test of its own still ran the matrix."""
        if self.results is None:
            return
        if self.failed():
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        elif session.exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
            session.exitstatus = pytest.ExitCode.OK

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
        totals: dict[str, int] = {}
        for result in self.results:
            counts: dict[str, int] = {}
            for outcome in result.outcomes.values():
                counts[outcome] = counts.get(outcome, 0) + 1
                totals[outcome] = totals.get(outcome, 0) + 1
            unfinished = [n for n in result.nodeids if n not in result.outcomes]
            done = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no case finished"
            head = (f"worker {result.index} on {result.device.label} (CUDA_VISIBLE_DEVICES="
                    f"{result.visible_devices!r}): {result.status}, exit {result.exit_code}, {len(result.nodeids)} "
                    f"case(s): {done}; {len((result.data or {}).get('benchmarks', []))} benchmark(s); "
                    f"log {result.log}")
            good = result.status == "ok" and "failed" not in counts
            tr.write_line(head, **({"green": True} if good else {"red": True}))
            for nodeid, outcome in result.outcomes.items():
                if outcome == "failed":
                    tr.write_line(f"FAILED {nodeid} (worker {result.index}; details in its log)", red=True)
            if result.problem:
                last = tail(result.log)
                for nodeid in unfinished:
                    state = "while running this case" if nodeid in result.started else "before reaching this case"
                    totals["failed"] = totals.get("failed", 0) + 1
                    tr.write_line(f"FAILED {nodeid}", red=True)
                    tr.write_line(f"wan-bench worker {result.index} on {result.device.label} (CUDA_VISIBLE_DEVICES="
                                  f"{result.visible_devices!r}) {result.problem} {state}.")
                if not unfinished:
                    tr.write_line(f"    {result.problem}", red=True)
                tr.write_line(f"Its log: {result.log}")
                tr.write_line("Last lines:")
                for line in last:
                    tr.write_line(f"    | {line}")
            for line in log_section(result.log):
                tr.write_line(f"    {line}")
        models = gpu_models(self.results)
        if len(models) > 1:
            tr.write_line(f"the workers ran on different GPU models ({', '.join(models)}): the merged file carries "
                          f"the first worker's machine_info", yellow=True)
        total = ", ".join(f"{v} {k}" for k, v in sorted(totals.items())) or "no case finished"
        tr.write_line(f"wan-bench GPU matrix: {total} over {len(self.results)} worker(s)",
                      **({"red": True} if self.failed() else {"green": True}))


# ------------------------------------------------------------------------------------------------ the worker side


class ShardWorker:
    """--wan-shard FILE: run exactly the node ids in FILE (deselecting the rest); --wan-progress FILE: append each
    test phase's outcome as a JSON line, so the controller knows which cases a worker finished if it dies."""

    def __init__(self, shard_file: str | None, progress: str | None):
        self.nodeids = None
        if shard_file is not None:
            try:
                self.nodeids = [line for line in Path(shard_file).read_text().splitlines() if line.strip()]
            except OSError as exc:
                raise pytest.UsageError(f"--wan-shard {shard_file!r}: cannot read: {exc.strerror or exc}") from None
        self.progress = Path(progress) if progress else None
        self.fh = None

    def pytest_report_header(self, config):
        if self.nodeids is not None:
            return [f"wan-bench shard: {len(self.nodeids)} case(s), CUDA_VISIBLE_DEVICES="
                    f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}"]
        return None

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session, config, items):
        if self.nodeids is None:
            return
        wanted = set(self.nodeids)
        found = {item.nodeid for item in items}
        missing = [n for n in self.nodeids if n not in found]
        if missing:
            raise pytest.UsageError(f"--wan-shard: {len(missing)} case(s) of the shard were not collected here (the "
                                    f"collection differs from the controller's): {', '.join(missing[:5])}")
        dropped = [item for item in items if item.nodeid not in wanted]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item.nodeid in wanted]

    def pytest_runtest_logreport(self, report):
        if self.progress is None:
            return
        if self.fh is None:
            self.fh = open(self.progress, "a")
        self.fh.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome}) + "\n")
        self.fh.flush()

    def pytest_unconfigure(self, config):
        if self.fh is not None:
            self.fh.close()

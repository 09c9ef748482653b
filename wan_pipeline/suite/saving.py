"""Where pytest-benchmark keeps a session's history, and how it is saved.

Per-GPU storage: before pytest-benchmark builds its session (its configure is trylast), a file storage given by
`--benchmark-storage` (default `./.benchmarks`) becomes `<storage>/<gpu slug>` (`<gpu slug>-cap24gb` under
`--wan-memory-cap 24GB`, see storage_slug), so histories of different GPU models, or of capped and uncapped runs,
never mix and `--benchmark-compare` loads from this GPU's folder; pytest-benchmark adds its machine folder below.

Saving: pytest-benchmark's file storage writes `NNNN_name.json` in place after globbing for the next number, and
offers no hook to replace that, so two sessions saving at once can collide and an interrupted write leaves half a
file. The plugin takes `--benchmark-save/--benchmark-autosave` for file storages: the options are cleared before
pytest-benchmark reads them, and at the end the session's JSON, made by pytest-benchmark's own hooks
(`pytest_benchmark_generate_json`, then `pytest_benchmark_update_json` for every plugin's additions), is saved with
the next free number under a folder lock and renamed into place. The round data is always kept (compare's rank test
needs it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from wan_pipeline.history.runs import INCOMPLETE_KEY, history_slug  # one record of a partial session, one folder rule


@dataclass
class Saving:
    """What this session saves itself: the history name and folder, and (for a --wan-gpus controller) the
    --benchmark-json file it writes merged."""

    name: str | None = None
    storage_root: Path | None = None
    json_target: object = None
    saved: Path | None = None  # the history file this session saved


SAVING_KEY = pytest.StashKey[Saving]()



@dataclass(eq=False)  # registered as a plugin: hashed by identity
class Completeness:
    """Whether the session ran every collected test to a pass or a skip: pytest's own reports, its exit status and
    its stop flags (`-x`, `--maxfail`, Ctrl-C, a timeout's signal). A partial session is saved marked incomplete,
    so that `wan-bench compare` never takes it for a clean run."""

    collected: list[str] = field(default_factory=list)
    finished: set[str] = field(default_factory=set)
    failed: list[str] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)  # failed node id -> the first line of why
    stopped: str | None = None
    exitstatus: int | None = None

    def pytest_collection_finish(self, session):
        self.collected = [item.nodeid for item in session.items]

    def pytest_runtest_logreport(self, report):
        if report.failed and report.nodeid not in self.failed:
            self.failed.append(report.nodeid)
            self.why[report.nodeid] = _why(report)
        if report.when == "call" or report.skipped or report.failed:
            self.finished.add(report.nodeid)

    def pytest_keyboard_interrupt(self, excinfo):
        self.stopped = f"interrupted ({excinfo.typename})"

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)  # before pytest-benchmark's wrapper writes its JSON
    def pytest_sessionfinish(self, session, exitstatus):
        self.exitstatus = int(exitstatus)
        reason = session.shouldstop or session.shouldfail
        if self.stopped is None and reason:
            self.stopped = f"stopped early: {reason}"
        if self.stopped is None and int(exitstatus) == int(pytest.ExitCode.INTERRUPTED):
            self.stopped = "interrupted"
        yield

    def problems(self, workers: list | None = None) -> dict | None:
        """What makes the session partial, for the JSON's `wan_incomplete` key; None for a complete one. `workers`:
        a --wan-gpus controller's WorkerResults, whose failed and unfinished cases count as this session's."""
        failed = list(self.failed)
        not_run = [n for n in self.collected if n not in self.finished]
        reasons = [self.stopped] if self.stopped else []
        for worker in workers or []:
            failed += [n for n, outcome in worker.outcomes.items() if outcome == "failed" and n not in failed]
            not_run += [n for n in worker.nodeids if n not in worker.outcomes]
            if worker.status != "ok":
                reasons.append(f"worker {worker.index} ({worker.device.label}): {worker.status}")
        if not (reasons or failed or not_run):
            return None
        if failed:
            reasons.append(f"{len(failed)} test(s) failed")
        if not_run:
            reasons.append(f"{len(not_run)} collected test(s) did not run")
        why = {n: self.why[n] for n in failed if n in self.why}
        workers = [{"index": w.index, "status": w.status} for w in workers or []]
        return {"reasons": reasons, "failed": failed, "why": why, "not_run": not_run, "stopped": self.stopped,
                "workers": workers, "exitstatus": self.exitstatus}


def _why(report) -> str:
    """The first `E ` line of a failure's report (where pytest puts the assertion or the exception), with its phase."""
    text = getattr(report, "longreprtext", "") or ""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("E ")]
    first = lines[0][1:].strip() if lines else (text.strip().splitlines() or ["failed"])[-1].strip()
    return f"{report.when}: {first}"[:300]


COMPLETENESS_KEY = pytest.StashKey[Completeness]()


def track_completeness(config) -> Completeness:
    tracker = Completeness()
    config.stash[COMPLETENESS_KEY] = tracker
    config.pluginmanager.register(tracker, "wan-completeness")
    return tracker


def mark_incomplete(config, output_json: dict) -> list[str]:
    """Mark a session JSON of a partial session (in place); returns summary lines saying why."""
    tracker = config.stash.get(COMPLETENESS_KEY, None)
    matrix = config.pluginmanager.get_plugin("wan-gpu-matrix")  # a --wan-gpus controller: its workers count too
    problems = tracker.problems(getattr(matrix, "results", None)) if tracker is not None else None
    if problems is None:
        output_json.pop(INCOMPLETE_KEY, None)
        return []
    output_json[INCOMPLETE_KEY] = problems
    return [f"this session is marked incomplete in its JSON ({'; '.join(problems['reasons'])}): wan-bench compare "
            "fails on it"]


def file_storage_root(storage: str) -> Path | None:
    """The folder of a pytest-benchmark file storage URI (a plain path counts as file://), None for another kind."""
    if "://" not in storage:
        return Path(storage)
    if storage.startswith("file://"):
        return Path(storage[len("file://"):])
    return None


def storage_slug(gpu_slug: str, memory_cap: int | None) -> str:
    """Where a session of this GPU (and cap) keeps its history: the folder compare groups its runs by."""
    return history_slug(gpu_slug, memory_cap)


def configure_storage(config, slug: str) -> Saving:
    """Per-GPU storage and the history save taken over (see the module docstring); before pytest-benchmark's
    configure."""
    saving = Saving()
    option = config.option
    root = file_storage_root(str(getattr(option, "benchmark_storage", "") or ""))
    if root is not None:
        root = root / slug
        option.benchmark_storage = f"file://{root}"
        saving.storage_root = root
        saving.name = option.benchmark_save or option.benchmark_autosave
        option.benchmark_save = option.benchmark_autosave = None
    config.stash[SAVING_KEY] = saving
    return saving


def take_json(config) -> None:
    """This session writes --benchmark-json itself (a --wan-gpus controller: merged, even when it ran no benchmark)."""
    saving = config.stash[SAVING_KEY]
    saving.json_target, config.option.benchmark_json = getattr(config.option, "benchmark_json", None), None


def _benchmark_session(config):
    return config.pluginmanager.get_plugin("pytest-benchmark")


def session_json(config) -> dict | None:
    """The session's pytest-benchmark JSON (with every round), through pytest-benchmark's hooks; None when
    pytest-benchmark is not active."""
    bs = _benchmark_session(config)
    if bs is None:
        return None
    hook = config.hook
    benchmarks = bs.benchmarks
    commit_info = hook.pytest_benchmark_generate_commit_info(config=config)
    hook.pytest_benchmark_update_commit_info(config=config, commit_info=commit_info)
    output = hook.pytest_benchmark_generate_json(config=config, benchmarks=benchmarks, include_data=True,
                                                 machine_info=bs.get_machine_info(), commit_info=commit_info)
    hook.pytest_benchmark_update_json(config=config, benchmarks=benchmarks, output_json=output)
    return output


def finish(config) -> list[str]:
    """Write what this session took over (the history save, a merged --benchmark-json); returns summary lines."""
    from wan_pipeline.fsutil import atomic_write_json
    from wan_pipeline.history.runs import save_run

    saving = config.stash.get(SAVING_KEY, None)
    if saving is None or not (saving.name or saving.json_target is not None):
        return []
    output = session_json(config)
    if output is None:
        return []
    lines = []
    target = saving.json_target
    if target is not None and not output["benchmarks"] and "wan_workers" not in output:
        lines.append("no benchmark ran and no worker started: --benchmark-json not written")
    elif target is not None:
        name = os.fspath(target) if isinstance(target, (str, os.PathLike)) else getattr(target, "name", None)
        if isinstance(name, str) and not name.startswith("<") and name != "-":
            if not isinstance(target, (str, os.PathLike)):
                target.close()
            atomic_write_json(name, output)
        else:  # a stream (stdout)
            import json

            target.write(json.dumps(output, indent=4, default=str).encode())
            target.flush()
        lines.append(f"merged {len(output['benchmarks'])} benchmark(s) into {name}")
    if saving.name:
        if output["benchmarks"]:
            bs = _benchmark_session(config)
            path = saving.saved = save_run(saving.storage_root / bs.machine_id, output, saving.name)
            lines.append(f"saved {len(output['benchmarks'])} benchmark(s) to the history: {path}")
        else:
            lines.append("nothing saved to the history: no benchmark ran")
    return lines

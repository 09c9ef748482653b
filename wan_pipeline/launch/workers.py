"""The matrix over GPUs, the processes: one plain `python -m pytest ... --benchmark-json FILE` per worker, pinned to
its device through CUDA_VISIBLE_DEVICES, running the node ids of its shard; waited for (with an overall timeout),
and read back: exit code, benchmark JSON, the outcome of each case. A worker that dies, or is stopped at the timeout,
takes its whole process group with it: nothing it started is left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from wan_pipeline.launch.processes import kill_group, start_group, stop_group
from wan_pipeline.launch.shards import Device, WorkerResult, exit_meaning, read_progress

# What a worker must not inherit: the matrix itself, the parent's extra arguments (they are in its command line).
_PARENT_ONLY_ENV = ("WAN_GPUS", "WAN_GPUS_TIMEOUT", "PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER")


def worker_command(args: Sequence[str], shard_file: Path, progress: Path, json_path: Path) -> list[str]:
    """A worker: the user's pytest arguments (without the result files and the matrix options), its shard, its
    progress file and its own --benchmark-json; ini addopts are already part of `args`."""
    return [sys.executable, "-m", "pytest", *args, "-o", "addopts=", "--wan-shard", str(shard_file),
            "--wan-progress", str(progress), "--benchmark-json", str(json_path)]


def worker_env(device: Device, workers: int, environ: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in environ.items() if k not in _PARENT_ONLY_ENV}
    env["CUDA_VISIBLE_DEVICES"] = device.visible_devices(environ.get("CUDA_VISIBLE_DEVICES"))
    if device.index is None and "OMP_NUM_THREADS" not in environ:  # CPU workers share the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(workers, 1)))
    return env


@dataclass
class _Running:
    result: WorkerResult
    proc: subprocess.Popen
    json_path: Path
    progress: Path


def run_workers(assignments: Sequence[tuple[Device, list[str]]], args: Sequence[str], folder: Path, *,
                cwd: str | Path, timeout: float | None = None, environ: dict[str, str] | None = None,
                say: Callable[[str], None] = print) -> list[WorkerResult]:
    """Start one worker per assignment in `folder` (shard, log, progress and JSON files), wait for all of them or
    the timeout, and return what each did. An interrupt (or SIGTERM) stops every worker before it propagates."""
    environ = dict(os.environ if environ is None else environ)
    folder.mkdir(parents=True, exist_ok=True)
    running: list[_Running] = []
    previous_term = None
    try:
        try:
            def on_term(signum, frame):
                raise KeyboardInterrupt(f"signal {signum}")

            previous_term = signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread
            previous_term = None
        for index, (device, nodeids) in enumerate(assignments):
            base = folder / f"worker-{index}"
            shard_file, log = base.with_suffix(".shard"), base.with_suffix(".log")
            json_path, progress = base.with_suffix(".json"), base.with_suffix(".progress.jsonl")
            shard_file.write_text("".join(f"{n}\n" for n in nodeids))
            env = worker_env(device, len(assignments), environ)
            result = WorkerResult(index, device, env["CUDA_VISIBLE_DEVICES"], list(nodeids), log)
            with open(log, "wb") as fh:
                proc = start_group(worker_command(args, shard_file, progress, json_path), env=env, cwd=str(cwd),
                                   stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT)
            result.status, result.pid = "running", proc.pid
            running.append(_Running(result, proc, json_path, progress))
            say(f"wan-bench worker {index} on {device.label} (CUDA_VISIBLE_DEVICES={result.visible_devices!r}, "
                f"pid {proc.pid}): {len(nodeids)} case(s), log {log}")
        _wait(running, timeout, say)
    finally:
        for run in running:  # an interrupt, a timeout or an error here: nothing is left running
            if run.proc.poll() is None:
                _stop(run, "stopped: the controller was interrupted", "error")
            kill_group(run.proc.pid)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    return [run.result for run in running]


def _wait(running: list[_Running], timeout: float | None, say) -> None:
    deadline = time.monotonic() + timeout if timeout else None
    alive = list(running)
    while alive:
        for run in list(alive):
            if run.proc.poll() is not None:
                kill_group(run.proc.pid)  # whatever it started goes with it
                _finish(run, say)
                alive.remove(run)
        if alive and deadline is not None and time.monotonic() > deadline:
            for run in alive:
                _stop(run, f"timed out: still running after --wan-gpus-timeout {timeout:g} s", "timed out")
                _finish(run, say)
            alive = []
        if alive:
            time.sleep(0.2)


def _stop(run: _Running, problem: str, status: str) -> None:
    """SIGINT first (pytest finishes the session and writes the JSON of the cases done), then SIGKILL."""
    stop_group(run.proc, signal.SIGINT)
    run.result.status, run.result.problem = status, problem


def _finish(run: _Running, say) -> None:
    from wan_pipeline.history.runs import HistoryFileError, load_run

    result = run.result
    code = run.proc.returncode
    result.exit_code = code
    if result.status == "running":
        if code == 0:
            result.status = "ok"
        elif code == 1:
            result.status = "tests failed"
        else:
            result.status = "error" if code in (2, 4, 5) else "died"  # interrupted, usage error, nothing collected
            result.problem = f"exited with code {code} ({exit_meaning(code)})"
    if run.json_path.exists() and run.json_path.stat().st_size:
        try:
            result.data = load_run(run.json_path).data
        except HistoryFileError as exc:
            result.problem = (result.problem + "; " if result.problem else "") + f"its results are unusable: {exc}"
            if result.ok:
                result.status = "error"
    result.started, result.outcomes = read_progress(run.progress)
    what = {"ok": "done", "tests failed": "done, with failures"}.get(result.status, result.status)
    say(f"wan-bench worker {result.index} on {result.device.label}: {what} (exit {code}, "
        f"{len((result.data or {}).get('benchmarks', []))} benchmark(s))")

"""Benchmark runs: pytest-benchmark's JSON files in (any file, recursively; a corrupted or truncated file is
reported in `History.skipped` and left untouched), and `save_run`, which never overwrites another session's file.
Reads files only (no torch import).
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wan_pipeline.errors import WanBenchError
from wan_pipeline.fsutil import atomic_write_bytes
from wan_pipeline.measure.telemetry import gpu_slug

DEFAULT_STORAGE = ".benchmarks"  # pytest-benchmark's own default --benchmark-storage
# The top-level key the wan-bench plugin writes into the JSON of a session that did not run to the end
# (interrupted, stopped early, failed or unrun tests); its benchmark entries are left as they are.
INCOMPLETE_KEY = "wan_incomplete"  # a partial session's record (suite.saving writes it): never a clean run


def history_slug(gpu_slug: str, memory_cap: int | None) -> str:
    """The history folder of a GPU model, a capped run in its own: `<gpu slug>-cap24gb` (24 x 10^9 bytes) or
    `-cap16gib` (16 x 2^30), else `-cap<bytes>b`: a capped run emulates a smaller card and never mixes with the
    uncapped one's history (the suite saves there; compare groups runs by it)."""
    from wan_pipeline.plan.memory import cap_label

    return gpu_slug if memory_cap is None else f"{gpu_slug}-cap{cap_label(memory_cap)}"


class HistoryError(WanBenchError):
    """A history problem that makes the requested comparison impossible."""


class HistoryFileError(HistoryError):
    """A benchmark file that cannot be used (corrupted, truncated, not pytest-benchmark JSON)."""

    def __init__(self, path: Path | str, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class GpuMismatchError(HistoryError):
    """The two runs come from different GPU models."""


# --------------------------------------------------------------------------------------------------------- loading

@dataclass
class Run:
    """One pytest-benchmark session file."""

    path: Path
    data: dict

    @property
    def machine_info(self) -> dict:
        return self.data.get("machine_info") or {}

    @property
    def commit_info(self) -> dict:
        return self.data.get("commit_info") or {}

    @property
    def datetime(self) -> str:
        return str(self.data.get("datetime") or "")

    @functools.cached_property
    def benchmarks(self) -> dict[str, dict]:
        return {benchmark_key(b): b for b in self.data.get("benchmarks", [])}

    @property
    def gpu(self) -> dict | None:
        gpu = self.machine_info.get("gpu")
        return gpu if isinstance(gpu, dict) else None

    @property
    def gpu_name(self) -> str | None:
        return (self.gpu or {}).get("name")

    @property
    def gpu_slug(self) -> str:
        return gpu_slug(self.gpu_name)

    @property
    def memory_cap(self) -> int | None:
        """The allocator cap the run emulated a smaller card with (machine_info, else extra_info); None: uncapped."""
        cap = self.machine_info.get("wan_memory_cap")
        if isinstance(cap, dict) and isinstance(cap.get("cap_bytes"), int):
            return cap["cap_bytes"]
        for bench in self.data.get("benchmarks", []):
            value = (bench.get("extra_info") or {}).get("memory_cap_bytes")
            if isinstance(value, int):
                return value
        return None

    @property
    def history_slug(self) -> str:
        """The GPU model, and the cap of a capped run: runs with different ones are not comparable."""
        return history_slug(self.gpu_slug, self.memory_cap)

    @property
    def env(self) -> dict:
        """The environment fingerprint: machine_info['wan_env'], else the first benchmark's extra_info['env']."""
        env = self.machine_info.get("wan_env")
        if isinstance(env, dict):
            return env
        for bench in self.data.get("benchmarks", []):
            env = (bench.get("extra_info") or {}).get("env")
            if isinstance(env, dict):
                return env
        return {}

    @property
    def incomplete(self) -> dict | None:
        """Why the session that wrote this file was partial (reasons, failed, not_run), or None for a complete one."""
        value = self.data.get(INCOMPLETE_KEY)
        if value is None:
            return None
        return value if isinstance(value, dict) else {"reasons": [str(value)]}

    def incomplete_reason(self) -> str:
        reasons = (self.incomplete or {}).get("reasons") or ["marked incomplete"]
        return "; ".join(map(str, reasons))

    @property
    def label(self) -> str:
        commit = self.commit_info.get("id")
        commit = f" {str(commit)[:10]}" if commit and commit != "unversioned" else ""
        return f"{self.path.name} ({self.datetime[:19]}{commit})"

    def sort_key(self) -> tuple:
        return (_parse_datetime(self.datetime), self.path.name, str(self.path))


def benchmark_key(bench: dict) -> str:
    return str(bench.get("fullname") or bench.get("name"))


def _parse_datetime(text: str) -> float:
    try:
        value = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return float("-inf")
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.timezone.utc)
    return value.timestamp()


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool: what can be compared as a measurement."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_run(path: Path | str) -> Run:
    """Read one pytest-benchmark JSON file; raise HistoryFileError naming the file and the problem. Never writes."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise HistoryFileError(path, f"cannot read: {exc.strerror or exc}") from None
    if not raw.strip():
        raise HistoryFileError(path, "empty file")
    try:
        text = raw.decode("utf-8")
        data = json.loads(text)
    except UnicodeDecodeError as exc:
        raise HistoryFileError(path, f"not UTF-8 text (corrupted?): {exc.reason} at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        at_end = exc.pos >= len(text.rstrip()) - 1 or exc.msg.startswith("Unterminated")
        what = "truncated" if at_end else "corrupted"
        raise HistoryFileError(path, f"invalid JSON ({what}?): {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise HistoryFileError(path, "not a pytest-benchmark file (no 'benchmarks' list)")
    if "machine_info" in data and not isinstance(data["machine_info"], dict):
        raise HistoryFileError(path, "'machine_info' is not an object")
    for i, bench in enumerate(data["benchmarks"]):
        if not isinstance(bench, dict) or not (bench.get("fullname") or bench.get("name")):
            raise HistoryFileError(path, f"benchmark #{i} has no name")
        stats = bench.get("stats")
        if not isinstance(stats, dict) or not is_number(stats.get("median")):
            raise HistoryFileError(path, f"benchmark {benchmark_key(bench)!r} has no numeric stats.median")
        samples = stats.get("data")
        if samples is not None and (not isinstance(samples, list) or not all(is_number(v) for v in samples)):
            raise HistoryFileError(path, f"benchmark {benchmark_key(bench)!r}: stats.data is not a list of numbers")
        if bench.get("extra_info") is not None and not isinstance(bench["extra_info"], dict):
            raise HistoryFileError(path, f"benchmark {benchmark_key(bench)!r}: extra_info is not an object")
    return Run(path=path, data=data)


@dataclass
class History:
    root: Path
    runs: list[Run]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def by_gpu(self) -> dict[str, list[Run]]:
        groups: dict[str, list[Run]] = {}
        for run in self.runs:
            groups.setdefault(run.history_slug, []).append(run)
        return groups


def load_history(root: Path | str) -> History:
    """Every pytest-benchmark JSON under `root` (recursively), oldest first; unusable files go to `skipped`."""
    root = Path(root)
    if not root.exists():
        raise HistoryError(f"{root}: no such file or folder")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*.json") if p.is_file())
    runs, skipped = [], []
    for path in files:
        try:
            runs.append(load_run(path))
        except HistoryFileError as exc:
            skipped.append((path, exc.problem))
    runs.sort(key=Run.sort_key)
    return History(root=root, runs=runs, skipped=skipped)


def pick_runs(baseline: str | Path | None, current: str | Path | None) -> tuple[Run, Run, list[tuple[Path, str]]]:
    """Resolve compare's arguments: two files; a folder and a file (the folder's latest run); one folder (its latest
    two runs on the latest run's GPU); one file (it and the latest earlier run beside it on the same GPU)."""
    if baseline is None:
        baseline = DEFAULT_STORAGE
    if current is not None:
        skipped: list[tuple[Path, str]] = []
        picked = []
        for arg in (baseline, current):
            path = Path(arg)
            if path.is_dir():
                hist = load_history(path)
                skipped += hist.skipped
                if not hist.runs:
                    raise HistoryError(f"{path}: no usable benchmark file in this folder{_skipped_hint(hist.skipped)}")
                picked.append(hist.runs[-1])
            else:
                if not path.exists():
                    raise HistoryError(f"{path}: no such file or folder")
                picked.append(load_run(path))
        return picked[0], picked[1], skipped
    path = Path(baseline)
    if path.is_file():
        run = load_run(path)
        hist = load_history(path.parent)
        earlier = [r for r in hist.runs if r.sort_key() < run.sort_key() and r.path != path]
        same = [r for r in earlier if r.history_slug == run.history_slug]
        if not same:
            raise HistoryError(f"{path}: no earlier run on {run.gpu_name or 'this CPU machine'} in {path.parent} "
                               "to compare with")
        return _clean_baseline(same), run, hist.skipped
    hist = load_history(path)
    if not hist.runs:
        raise HistoryError(f"{path}: no usable benchmark file{_skipped_hint(hist.skipped)}")
    current_run = hist.runs[-1]
    same = [r for r in hist.runs[:-1] if r.history_slug == current_run.history_slug]
    if not same:
        raise HistoryError(f"{path}: only one run on {current_run.gpu_name or 'this CPU machine'} "
                           f"({current_run.path.name}); need two to compare")
    return _clean_baseline(same), current_run, hist.skipped


def _clean_baseline(candidates: list[Run]) -> Run:
    """The latest complete run of `candidates` (oldest first): a partial run is never picked as a baseline; when
    every candidate is partial, the latest (compare then fails on it)."""
    complete = [r for r in candidates if r.incomplete is None]
    return (complete or candidates)[-1]


def _skipped_hint(skipped: list[tuple[Path, str]]) -> str:
    return f" ({len(skipped)} unusable file(s) skipped, e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""


class _FolderLock:
    """An exclusive advisory lock on `folder/.wan-bench.lock` (fcntl; a no-op where fcntl is missing)."""

    def __init__(self, folder: Path):
        self.path = folder / ".wan-bench.lock"
        self.fh = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: the no-clobber link below still protects the files
            return self
        self.fh = open(self.path, "a+b")
        fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            import fcntl

            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()


def save_run(folder: Path | str, data: dict, name: str) -> Path:
    """Save a session like pytest-benchmark's storage does (`NNNN_<name>.json`, the next free number), atomically;
    two sessions saving at once get different numbers and never overwrite each other."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = (json.dumps(data, indent=4, default=str) + "\n").encode()
    with _FolderLock(folder):
        for _ in range(1000):
            numbers = [int(p.name[:4]) for p in folder.glob("[0-9][0-9][0-9][0-9]_*.json")]
            target = folder / f"{max(numbers, default=0) + 1:04d}_{name}.json"
            try:
                return atomic_write_bytes(target, payload, overwrite=False)
            except FileExistsError:
                continue
    raise HistoryError(f"{folder}: could not find a free file number to save {name}")

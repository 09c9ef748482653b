"""Benchmark history: pytest-benchmark's JSON files in, verdicts out. Reads files only (no torch import).

- `load_run(path)` / `load_history(folder)`: any pytest-benchmark JSON (recursively); a corrupted or truncated file is
  reported in `History.skipped` and left untouched.
- `compare(baseline, current, threshold=0.05, alpha=0.01, force=False)`: per benchmark the medians, their ratio, a
  one-sided Mann-Whitney U test on the per-round timings with a confidence bound on the slowdown, the stage that moved
  most, and what changed between the two runs (environment fingerprint, machine info, benchmark settings, throttling).
- `trend(history)`: e-divisive change points (energy statistic, permutation test) over each benchmark's run medians,
  with the fields that changed at the run where the step happened.
- `atomic_write_bytes` / `atomic_write_json` / `save_run`: writes that never leave a half file and never overwrite
  another session's file.

The regression rule, for a benchmark with per-round timings x (baseline) and y (current), threshold t, level alpha:
    regression  <=>  P(U >= u | no change) < alpha      (current is significantly slower, exact one-sided test)
                and  upper (1 - alpha) bound of the slowdown ratio >= 1 + t   (a slowdown of t is not ruled out)
The bound comes from the same U distribution (Hodges-Lehmann / Moses interval on log timings). So a true slowdown of
exactly t is caught with probability about 1 - alpha when the test has the power, a tiny but significant slowdown is
reported as 'slower, below threshold', and without per-round data the rule falls back to the median ratio >= 1 + t.
The exact test can reach p < alpha only when 1 / C(m + n, m) < alpha: for alpha = 0.01 that is 5 rounds a side
(4 + 6 also works); asv's stricter 0.002 two-sided (0.001 one-sided) needs 7 a side.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import math
import os
import re
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .config import ordered_stages
from .errors import WanBenchError
from .telemetry import gpu_slug

DEFAULT_THRESHOLD = 0.05
DEFAULT_ALPHA = 0.01

# machine_info keys whose change says nothing about the setup (they move from one read to the next).
_VOLATILE_MACHINE_KEYS = re.compile(
    r"^(cpu\.hz_actual.*|gpu\.(memory_used_bytes|sm_clock_mhz|mem_clock_mhz|temperature_c|power_w|pstate|"
    r"clock_event_mask|clock_event_reasons|violation_ns.*)|wan_env(\..*)?)$"
)
# machine_info keys the environment fingerprint records too (kernel, python, system, driver): left to the fingerprint,
# so that one upgrade is one line, not two.
_FINGERPRINTED_MACHINE_KEYS = re.compile(r"^(release|python_version|python_implementation|system|machine|gpu\.driver)$")
# extra_info keys that are measurements (or details of the untimed warm-up), not settings of the timed rounds.
_MEASURED_EXTRA_KEYS = re.compile(
    r"^(stages|peak_memory|gpu|throttled|env|metrics|metrics_meaningful|video|notes|load_seconds|effective_tflops"
    r"|stock_diffusers_seconds|speedup_vs_stock_diffusers|attention\.auto_timings|compile\.compile_seconds"
    r"|compile\.warmup_seconds|compile\.warmup_steps_per_pass|compile\.graphs_compiled_in_warmup|compile\.recompiles|compile\.recompiled_during_rounds"
    r"|cosine_vs_bf16_sdpa|median_s|sequence_parallel\.(?!degree$|backend$)[^.]+)(\..*)?$"
)


DEFAULT_STORAGE = ".benchmarks"  # pytest-benchmark's own default --benchmark-storage


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
            groups.setdefault(run.gpu_slug, []).append(run)
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
        same = [r for r in earlier if r.gpu_slug == run.gpu_slug]
        if not same:
            raise HistoryError(f"{path}: no earlier run on {run.gpu_name or 'this CPU machine'} in {path.parent} "
                               "to compare with")
        return same[-1], run, hist.skipped
    hist = load_history(path)
    if not hist.runs:
        raise HistoryError(f"{path}: no usable benchmark file{_skipped_hint(hist.skipped)}")
    current_run = hist.runs[-1]
    same = [r for r in hist.runs[:-1] if r.gpu_slug == current_run.gpu_slug]
    if not same:
        raise HistoryError(f"{path}: only one run on {current_run.gpu_name or 'this CPU machine'} "
                           f"({current_run.path.name}); need two to compare")
    return same[-1], current_run, hist.skipped


def _skipped_hint(skipped: list[tuple[Path, str]]) -> str:
    return f" ({len(skipped)} unusable file(s) skipped, e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""


# ------------------------------------------------------------------------------------------------- statistics

def _u_statistic(x: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney U of y against x: pairs (x_i, y_j) with y_j > x_i, ties counted one half."""
    xs = np.sort(x)
    left = np.searchsorted(xs, y, side="left")
    right = np.searchsorted(xs, y, side="right")
    return float(np.sum(left + right) / 2.0)


_EXACT_MAX_N = 60  # C(60, 30) < 2**63: exact integer counts up to here


@functools.lru_cache(maxsize=256)
def u_null_counts(m: int, n: int) -> np.ndarray:
    """Counts of U = 0..m*n over all C(m+n, m) equally likely orderings (no ties): the coefficients of the
    Gaussian binomial [m+n choose m]_q, built as prod_{i=1..m} (1 - q^(n+i)) / (1 - q^i)."""
    if m > n:
        m, n = n, m
    size = m * n + 1
    c = np.zeros(size, dtype=np.int64)
    c[0] = 1
    for i in range(1, m + 1):
        shift = n + i
        if shift < size:
            c[shift:] -= c[: size - shift].copy()
        for r in range(i):  # divide by (1 - q^i): running sums with stride i
            c[r::i] = np.cumsum(c[r::i])
    c.setflags(write=False)  # cached: shared by every caller
    return c


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


@dataclass
class RankTest:
    p_slower: float  # P(U >= u) under no change: small when y (current) is slower
    p_faster: float
    method: str
    min_p: float  # the smallest p-value these sample sizes can give
    u: float
    counts: np.ndarray | None  # exact null distribution, when used
    sigma: float | None  # normal approximation's standard deviation, when used


def mann_whitney(x: Iterable[float], y: Iterable[float]) -> RankTest:
    """One-sided Mann-Whitney U tests of y vs x: exact without ties up to 60 a side, else normal with tie and
    continuity correction."""
    x, y = np.asarray(list(x), float), np.asarray(list(y), float)
    m, n = len(x), len(y)
    u = _u_statistic(x, y)
    combined = np.concatenate([x, y])
    _, tie_counts = np.unique(combined, return_counts=True)
    ties = bool(np.any(tie_counts > 1))
    if not ties and m + n <= _EXACT_MAX_N:
        counts = u_null_counts(m, n)
        total = float(counts.sum())
        k = int(round(u))
        p_slower = float(counts[k:].sum()) / total
        p_faster = float(counts[: k + 1].sum()) / total
        return RankTest(p_slower, p_faster, "exact", 1.0 / total, u, counts, None)
    big_n = m + n
    tie_term = float(np.sum(tie_counts.astype(float) ** 3 - tie_counts)) / (big_n * (big_n - 1))
    sigma = math.sqrt(m * n / 12.0 * ((big_n + 1) - tie_term))
    mu = m * n / 2.0
    if sigma == 0:
        return RankTest(1.0, 1.0, "normal", 1.0, u, None, 0.0)
    p_slower = _normal_sf((u - mu - 0.5) / sigma)
    p_faster = _normal_sf((mu - u - 0.5) / sigma)
    return RankTest(min(1.0, p_slower), min(1.0, p_faster), "normal", _normal_sf((m * n - mu - 0.5) / sigma),
                    u, None, sigma)


def _critical_u(test: RankTest, m: int, n: int, alpha: float) -> int | None:
    """Largest c with P(U <= c) <= alpha under no change, or None when even U = 0 is more likely than alpha."""
    if test.counts is not None:
        cdf = np.cumsum(test.counts) / float(test.counts.sum())
        ok = np.nonzero(cdf <= alpha)[0]
        return int(ok[-1]) if len(ok) else None
    sigma = test.sigma or math.sqrt(m * n * (m + n + 1) / 12.0)
    c = math.floor(m * n / 2.0 - statistics.NormalDist().inv_cdf(1 - alpha) * sigma - 0.5)
    return c if c >= 0 else None


def _thin(values: np.ndarray, limit: int = 1000) -> np.ndarray:
    if len(values) <= limit:
        return values
    return np.quantile(values, (np.arange(limit) + 0.5) / limit)


def ratio_bounds(x: Iterable[float], y: Iterable[float], alpha: float) -> tuple[float, float, float]:
    """(lower, estimate, upper) of the ratio y/x as a shift of log timings: the Hodges-Lehmann estimate and the
    one-sided (1 - alpha) bounds inverted from the U distribution (0 / inf when the sizes cannot bound it).
    More than 1000 values a side are thinned to 1000 quantiles."""
    lx, ly = np.log(_thin(np.asarray(list(x), float))), np.log(_thin(np.asarray(list(y), float)))
    diffs = np.sort((ly[None, :] - lx[:, None]).ravel())
    estimate = float(math.exp(np.median(diffs)))
    m, n = len(lx), len(ly)
    c = _critical_u(mann_whitney(lx, ly), m, n, alpha)
    if c is None:
        return 0.0, estimate, math.inf
    return float(math.exp(diffs[c])), estimate, float(math.exp(diffs[m * n - c - 1]))


# ---------------------------------------------------------------------------------------------------- compare

def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict) and value:
                out.update(flatten(value, name))
            else:
                out[name] = value
    elif prefix:
        out[prefix] = obj
    return out


@dataclass
class Change:
    field: str
    baseline: Any
    current: Any

    def describe(self) -> str:
        return f"{self.field}: {_short(self.baseline)} -> {_short(self.current)}"


def _short(value: Any, limit: int = 60) -> str:
    text = "unset" if value is None else (json.dumps(value) if not isinstance(value, str) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def diff_fields(before: dict, after: dict, ignore: re.Pattern | None = None, prefix: str = "") -> list[Change]:
    a, b = flatten(before or {}), flatten(after or {})
    changes = []
    for key in sorted(set(a) | set(b)):
        if ignore is not None and ignore.match(key):
            continue
        if a.get(key) != b.get(key):
            changes.append(Change(prefix + key, a.get(key), b.get(key)))
    return changes


@dataclass
class StageDelta:
    stage: str
    baseline: float
    current: float

    @property
    def delta(self) -> float:
        return self.current - self.baseline

    @property
    def ratio(self) -> float | None:
        return self.current / self.baseline if self.baseline > 0 else None


@dataclass
class BenchmarkVerdict:
    name: str
    fullname: str
    group: str | None
    baseline_median: float
    current_median: float
    ratio: float
    baseline_rounds: int
    current_rounds: int
    status: str  # regression | improvement | slower-below-threshold | faster-below-threshold | unchanged
    regression: bool
    test: str  # how the verdict was reached
    p_slower: float | None = None
    p_faster: float | None = None
    ratio_estimate: float | None = None
    ratio_lower: float | None = None
    ratio_upper: float | None = None
    stage: StageDelta | None = None
    stages: list[StageDelta] = field(default_factory=list)
    settings_changes: list[Change] = field(default_factory=list)
    memory: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    throttling: dict[str, list[str]] = field(default_factory=dict)

    def headline(self) -> str:
        pct = (self.ratio - 1) * 100
        text = (f"{self.status.upper() if self.regression else self.status}: {self.fullname}: median "
                f"{_fmt_time(self.baseline_median)} -> {_fmt_time(self.current_median)} ({pct:+.1f} %)")
        if self.p_slower is not None:
            p = self.p_slower if self.ratio >= 1 else self.p_faster
            text += (f", p={p:.2g}, {self.baseline_rounds}/{self.current_rounds} rounds, ratio bounds "
                     f"[{self.ratio_lower:.3f}, {self.ratio_upper:.3f}]")
        return text


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.3f} us"


def _bench_throttling(bench: dict) -> list[str]:
    extra = bench.get("extra_info") or {}
    gpu = extra.get("gpu") if isinstance(extra.get("gpu"), dict) else {}
    reasons = list(gpu.get("throttle_reasons") or [])
    if extra.get("throttled") and not reasons:
        reasons = ["throttled"]
    return sorted(set(map(str, reasons)))


def verdict_for(base: dict, cur: dict, threshold: float = DEFAULT_THRESHOLD,
                alpha: float = DEFAULT_ALPHA) -> BenchmarkVerdict:
    """The verdict for one benchmark present in both runs (pytest-benchmark benchmark dicts)."""
    bstats, cstats = base["stats"], cur["stats"]
    bmed, cmed = float(bstats["median"]), float(cstats["median"])
    x = [float(v) for v in bstats.get("data") or [] if v > 0]
    y = [float(v) for v in cstats.get("data") or [] if v > 0]
    ratio = cmed / bmed if bmed > 0 else math.inf
    limit = 1.0 + threshold
    v = BenchmarkVerdict(
        name=str(cur.get("name") or benchmark_key(cur)), fullname=benchmark_key(cur), group=cur.get("group"),
        baseline_median=bmed, current_median=cmed, ratio=ratio,
        baseline_rounds=int(bstats.get("rounds") or len(x)), current_rounds=int(cstats.get("rounds") or len(y)),
        status="unchanged", regression=False, test="",
    )
    test = mann_whitney(x, y) if len(x) >= 2 and len(y) >= 2 else None
    if test is not None:
        v.p_slower, v.p_faster = test.p_slower, test.p_faster
        v.ratio_lower, v.ratio_estimate, v.ratio_upper = ratio_bounds(x, y, alpha)
    if test is None:
        missing = "baseline" if len(x) < 2 else "current"
        v.test = (f"medians only: the {missing} run has no per-round timings (stats.data; save with "
                  "--benchmark-save-data), so the Mann-Whitney test could not run")
    elif test.min_p >= alpha:
        v.test = (f"medians only: {len(x)} and {len(y)} rounds cannot reach p < {alpha:g} "
                  f"(smallest possible p {test.min_p:.3g}); the Mann-Whitney test could not decide")
    else:
        v.test = (f"Mann-Whitney U ({test.method}, one-sided) on {len(x)} vs {len(y)} rounds at alpha {alpha:g}, "
                  f"threshold {threshold * 100:g} %")
    if test is None or test.min_p >= alpha:  # the medians decide
        v.regression = ratio >= limit
        v.status = ("regression" if v.regression else "improvement" if ratio <= 1 / limit else
                    "slower-below-threshold" if ratio > 1 else "faster-below-threshold" if ratio < 1 else "unchanged")
    elif test.p_slower < alpha:
        v.regression = v.ratio_upper >= limit
        v.status = "regression" if v.regression else "slower-below-threshold"
    elif test.p_faster < alpha:
        v.status = "improvement" if v.ratio_lower <= 1 / limit else "faster-below-threshold"
    else:
        v.status = "unchanged"
    # Where the time moved.
    bstages = (base.get("extra_info") or {}).get("stages") or {}
    cstages = (cur.get("extra_info") or {}).get("stages") or {}
    v.stages = [StageDelta(s, float(bstages[s]), float(cstages[s])) for s in ordered_stages(bstages, cstages)
                if is_number(bstages.get(s)) and is_number(cstages.get(s))]
    if any(d.delta != 0 for d in v.stages):
        sign = 1.0 if cmed >= bmed else -1.0
        v.stage = max(v.stages, key=lambda d: sign * d.delta)
    v.settings_changes = diff_fields(base.get("extra_info") or {}, cur.get("extra_info") or {},
                                     _MEASURED_EXTRA_KEYS, prefix="extra_info.")
    bmem = flatten((base.get("extra_info") or {}).get("peak_memory") or {})
    cmem = flatten((cur.get("extra_info") or {}).get("peak_memory") or {})
    v.memory = {k: (bmem.get(k), cmem.get(k)) for k in sorted(set(bmem) | set(cmem))}
    v.throttling = {"baseline": _bench_throttling(base), "current": _bench_throttling(cur)}
    return v


@dataclass
class Comparison:
    baseline: Run
    current: Run
    threshold: float
    alpha: float
    forced: bool
    benchmarks: list[BenchmarkVerdict]
    only_baseline: list[str]
    only_current: list[str]
    env_changes: list[Change]
    machine_changes: list[Change]
    conditions: dict[str, tuple[Any, Any]]
    warnings: list[str] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def regressions(self) -> list[BenchmarkVerdict]:
        return [b for b in self.benchmarks if b.regression]

    @property
    def exit_code(self) -> int:
        return 1 if self.regressions else 0

    def changed_fields(self) -> list[str]:
        return [c.field for c in self.env_changes + self.machine_changes]

    def likely_causes(self, verdict: BenchmarkVerdict) -> list[str]:
        causes = [c.describe() for c in verdict.settings_changes]
        causes += [c.describe() for c in self.env_changes]
        causes += [c.describe() for c in self.machine_changes]
        new_throttle = sorted(set(verdict.throttling.get("current", [])) - set(verdict.throttling.get("baseline", [])))
        if new_throttle:
            causes.append(f"GPU throttled in the current run: {', '.join(new_throttle)}")
        return causes

    def to_json(self) -> dict:
        def change_list(changes):
            return [{"field": c.field, "baseline": c.baseline, "current": c.current} for c in changes]

        benches = []
        for b in self.benchmarks:
            d = asdict(b)
            d["stage"] = None if b.stage is None else {**asdict(b.stage), "delta": b.stage.delta, "ratio": b.stage.ratio}
            d["stages"] = [{**asdict(s), "delta": s.delta, "ratio": s.ratio} for s in b.stages]
            d["settings_changes"] = change_list(b.settings_changes)
            d["memory"] = {k: {"baseline": a, "current": c} for k, (a, c) in b.memory.items()}
            d["likely_causes"] = self.likely_causes(b) if b.status != "unchanged" else []
            for key in ("ratio", "ratio_upper"):
                if d.get(key) is not None and not math.isfinite(d[key]):
                    d[key] = None
            benches.append(d)
        return {
            "baseline": {"path": str(self.baseline.path), "datetime": self.baseline.datetime,
                         "gpu": self.baseline.gpu_name, "commit": self.baseline.commit_info.get("id")},
            "current": {"path": str(self.current.path), "datetime": self.current.datetime,
                        "gpu": self.current.gpu_name, "commit": self.current.commit_info.get("id")},
            "threshold": self.threshold, "alpha": self.alpha, "forced": self.forced,
            "regression": bool(self.regressions), "exit_code": self.exit_code,
            "benchmarks": benches, "only_in_baseline": self.only_baseline, "only_in_current": self.only_current,
            "environment_changes": change_list(self.env_changes),
            "machine_changes": change_list(self.machine_changes),
            "conditions": {k: {"baseline": a, "current": c} for k, (a, c) in self.conditions.items()},
            "warnings": self.warnings,
            "skipped_files": [{"path": str(p), "problem": why} for p, why in self.skipped],
        }

    def format_text(self) -> str:
        lines = [f"baseline: {self.baseline.path}  [{self.baseline.gpu_name or 'no GPU'}] {self.baseline.datetime}",
                 f"current:  {self.current.path}  [{self.current.gpu_name or 'no GPU'}] {self.current.datetime}",
                 f"rule: regression when significantly slower (one-sided Mann-Whitney U, p < {self.alpha:g}) and a "
                 f"slowdown of {self.threshold * 100:g} % is within the bound (medians alone when rounds are missing)"]
        for w in self.warnings:
            lines.append(f"warning: {w}")
        for path, why in self.skipped:
            lines.append(f"skipped unusable file {path}: {why}")
        for b in self.benchmarks:
            lines.append("")
            lines.append(b.headline())
            lines.append(f"  test: {b.test}")
            if b.stage is not None:
                st = b.stage
                share = ""
                total = b.current_median - b.baseline_median
                if abs(total) > 0:
                    share = f", {st.delta / total * 100:.0f} % of the change in the median"
                lines.append(f"  stage that moved most: {st.stage} {_fmt_time(st.baseline)} -> {_fmt_time(st.current)}"
                             f" ({st.delta:+.3f} s{share})")
            for c in b.settings_changes:
                lines.append(f"  setting changed: {c.describe()}")
            for key, (a, c) in b.memory.items():
                if a != c and is_number(a) and is_number(c):
                    lines.append(f"  memory {key}: {a / 2**30:.2f} GiB -> {c / 2**30:.2f} GiB")
            if b.throttling.get("baseline") or b.throttling.get("current"):
                lines.append(f"  throttling: baseline {', '.join(b.throttling['baseline']) or 'none'}; "
                             f"current {', '.join(b.throttling['current']) or 'none'}")
        if self.only_baseline:
            lines.append(f"\nonly in baseline: {', '.join(self.only_baseline)}")
        if self.only_current:
            lines.append(f"only in current: {', '.join(self.only_current)}")
        lines.append("")
        if self.env_changes or self.machine_changes:
            lines.append("what changed between the runs:")
            lines += [f"  {c.describe()}" for c in self.env_changes + self.machine_changes]
        else:
            lines.append("environment and machine: no change recorded")
        for key, (a, c) in self.conditions.items():
            lines.append(f"  condition {key}: {_short(a)} -> {_short(c)}")
        regs = self.regressions
        lines.append("")
        if regs:
            lines.append(f"VERDICT: {len(regs)} regression(s): {', '.join(r.fullname for r in regs)}")
            for r in regs:
                causes = self.likely_causes(r)
                lines.append(f"  {r.fullname}: changed at the same time: {'; '.join(causes) if causes else 'nothing recorded'}")
        else:
            lines.append(f"VERDICT: no significant regression over {self.threshold * 100:g} % "
                         f"({len(self.benchmarks)} benchmark(s) compared)")
        return "\n".join(lines)


def compare(baseline: Run | str | Path, current: Run | str | Path, threshold: float = DEFAULT_THRESHOLD,
            force: bool = False, alpha: float = DEFAULT_ALPHA) -> Comparison:
    """Compare two runs benchmark by benchmark. Raises GpuMismatchError for different GPU models unless `force`."""
    if not 0 <= threshold < 10:
        raise HistoryError(f"threshold {threshold!r} out of range (a fraction, e.g. 0.05 for 5 %)")
    if not 0 < alpha < 0.5:
        raise HistoryError(f"alpha {alpha!r} out of range (0 < alpha < 0.5)")
    base = baseline if isinstance(baseline, Run) else load_run(baseline)
    cur = current if isinstance(current, Run) else load_run(current)
    warnings = []
    if base.gpu_slug != cur.gpu_slug:
        reason = (f"different GPU models: baseline {base.path} ran on {base.gpu_name or 'no GPU'}, current "
                  f"{cur.path} on {cur.gpu_name or 'no GPU'}; their timings are not comparable")
        if not force:
            raise GpuMismatchError(reason + " (use --force to compare anyway)")
        warnings.append(reason + " (compared anyway: --force)")
    bb, cb = base.benchmarks, cur.benchmarks
    common = [k for k in cb if k in bb]
    if not common:
        raise HistoryError(f"{base.path} and {cur.path} have no benchmark in common")
    verdicts = [verdict_for(bb[k], cb[k], threshold, alpha) for k in common]
    conditions = {}
    for key in ("temperature_c", "power_w", "sm_clock_mhz", "clock_event_reasons"):
        a, c = (base.gpu or {}).get(key), (cur.gpu or {}).get(key)
        if a is not None or c is not None:
            conditions[f"gpu.{key}"] = (a, c)
    env_changes, machine_changes = setup_changes(base, cur)
    return Comparison(
        baseline=base, current=cur, threshold=threshold, alpha=alpha, forced=force, benchmarks=verdicts,
        only_baseline=[k for k in bb if k not in cb], only_current=[k for k in cb if k not in bb],
        env_changes=env_changes, machine_changes=machine_changes,
        conditions=conditions, warnings=warnings,
    )


def setup_changes(before: Run, after: Run) -> tuple[list[Change], list[Change]]:
    """(fingerprint changes, machine_info changes) between two runs; a machine_info key the fingerprint of both runs
    already records is left to the fingerprint."""
    env = diff_fields(before.env, after.env, prefix="env:")
    machine = diff_fields(before.machine_info, after.machine_info, _VOLATILE_MACHINE_KEYS, prefix="machine:")
    if before.env and after.env:
        machine = [c for c in machine if not _FINGERPRINTED_MACHINE_KEYS.match(c.field[len("machine:"):])]
    return env, machine


def run_changes(before: Run, after: Run, benchmark: str | None = None) -> list[Change]:
    """Everything recorded that differs between two runs: fingerprint, machine info, the benchmark's settings."""
    env, machine = setup_changes(before, after)
    changes = env + machine
    if benchmark is not None:
        b, a = before.benchmarks.get(benchmark), after.benchmarks.get(benchmark)
        if b is not None and a is not None:
            changes += diff_fields(b.get("extra_info") or {}, a.get("extra_info") or {}, _MEASURED_EXTRA_KEYS,
                                   prefix="extra_info.")
    return changes


# ------------------------------------------------------------------------------------------------ change points

def _energy_q(x: np.ndarray, min_size: int) -> tuple[int, float]:
    """E-divisive (Matteson & James 2014, alpha = 1): the split tau maximising
    Q(tau) = m n / (m + n) * (2 mean|X - Y| - mean_{i<j}|X_i - X_j| - mean_{i<j}|Y_i - Y_j|), X = x[:tau], Y = x[tau:]."""
    n = len(x)
    d = np.abs(x[:, None] - x[None, :])
    c = d.cumsum(0).cumsum(1)  # c[i, j] = sum d[:i+1, :j+1]
    tau = np.arange(min_size, n - min_size + 1)
    if len(tau) == 0:
        return -1, -math.inf
    m, k = tau.astype(float), (n - tau).astype(float)
    t1 = tau - 1
    total = c[n - 1, n - 1]
    left = c[t1, t1]  # sum over X x X (each pair twice)
    cross = c[t1, n - 1] - left  # sum over X x Y
    right = total - 2 * cross - left  # sum over Y x Y
    with np.errstate(divide="ignore", invalid="ignore"):
        within_x = np.where(m > 1, left / (m * (m - 1)), 0.0)
        within_y = np.where(k > 1, right / (k * (k - 1)), 0.0)
    q = m * k / n * (2 * cross / (m * k) - within_x - within_y)
    best = int(np.argmax(q))
    return int(tau[best]), float(q[best])


def change_points(values: Iterable[float], min_size: int = 2, permutations: int = 999, p_threshold: float = 0.05,
                  min_shift: float = 0.0, seed: int = 0) -> list[dict]:
    """Hierarchical e-divisive change points of a series (one value per run, oldest first), each kept when a
    permutation test gives p <= p_threshold and the segment medians differ by at least `min_shift` (in the
    series' units: pass log timings for relative steps). Small series have little power: with 8 values split 5/3 the
    smallest possible p is about 2/56.
    Returns [{'index': first index of the new level, 'p': ..., 'before': median, 'after': median}] sorted by index."""
    series = np.asarray(list(values), dtype=float)
    rng = np.random.default_rng(seed)
    found: list[int] = []
    pvalues: dict[int, float] = {}
    segments = [(0, len(series))]
    while segments:
        lo, hi = segments.pop()
        seg = series[lo:hi]
        if len(seg) < 2 * min_size or np.all(seg == seg[0]):
            continue
        tau, q = _energy_q(seg, min_size)
        if tau < 0:
            continue
        exceed = 0
        for _ in range(permutations):
            _, q_perm = _energy_q(rng.permutation(seg), min_size)
            exceed += q_perm >= q * (1 - 1e-12)
        p = (exceed + 1) / (permutations + 1)
        if p > p_threshold:
            continue
        found.append(lo + tau)
        pvalues[lo + tau] = p
        segments += [(lo, lo + tau), (lo + tau, hi)]
    found.sort()
    # Segment levels between neighbouring change points (all of them, kept or not); report the steps of min_shift+.
    result = []
    bounds = [0] + found + [len(series)]
    for i, cp in enumerate(found):
        before = float(np.median(series[bounds[i]:cp]))
        after = float(np.median(series[cp:bounds[i + 2]]))
        if abs(after - before) < min_shift:
            continue
        result.append({"index": cp, "p": pvalues[cp], "before": before, "after": after})
    return result


@dataclass
class Step:
    benchmark: str
    gpu: str
    run: Run  # the first run at the new level
    previous: Run
    before: float  # median of the run medians before the step, seconds
    after: float
    p: float
    changes: list[Change]

    @property
    def ratio(self) -> float:
        return self.after / self.before if self.before > 0 else math.inf

    def describe(self) -> str:
        changed = "; ".join(c.describe() for c in self.changes) or "nothing recorded"
        return (f"{self.benchmark} [{self.gpu}]: stepped {(self.ratio - 1) * 100:+.1f} % "
                f"({_fmt_time(self.before)} -> {_fmt_time(self.after)}, p={self.p:.3g}) at {self.run.label}; "
                f"changed since {self.previous.path.name}: {changed}")


@dataclass
class Series:
    benchmark: str
    gpu: str
    runs: list[Run]
    medians: list[float]
    steps: list[Step]


def trend(history: History | str | Path, threshold: float = DEFAULT_THRESHOLD, benchmark: str | None = None,
          min_size: int = 2, p_threshold: float = 0.05, permutations: int = 999) -> list[Series]:
    """Change points per benchmark and GPU model over a storage folder, with the fields that changed at each."""
    hist = history if isinstance(history, History) else load_history(history)
    out = []
    for gpu, runs in sorted(hist.by_gpu().items()):
        names: list[str] = []
        for run in runs:
            names += [k for k in run.benchmarks if k not in names]
        for name in names:
            if benchmark is not None and benchmark not in name:
                continue
            rs = [r for r in runs if name in r.benchmarks]
            medians = [float(r.benchmarks[name]["stats"]["median"]) for r in rs]
            steps = []
            if len(rs) >= 2 * min_size:
                logs = np.log(np.maximum(medians, 1e-12))
                for cp in change_points(logs, min_size=min_size, permutations=permutations,
                                        p_threshold=p_threshold, min_shift=0.0):
                    before, after = math.exp(cp["before"]), math.exp(cp["after"])
                    if abs(after / before - 1) < threshold:
                        continue
                    run, prev = rs[cp["index"]], rs[cp["index"] - 1]
                    steps.append(Step(name, gpu, run, prev, before, after, cp["p"], run_changes(prev, run, name)))
            out.append(Series(name, gpu, rs, medians, steps))
    return out


# -------------------------------------------------------------------------------------------------- writing

def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: setting the umask to read it is process-wide, racy with writer threads


@contextlib.contextmanager
def atomic_target(path: Path | str, overwrite: bool = True, suffix: str = ".tmp"):
    """A temporary file beside `path` to write into; when the block ends well it becomes `path` with the umask's
    permissions (replacing it, or with overwrite=False never clobbering an existing file: FileExistsError), so no
    reader ever sees half a file; when it fails the temporary file goes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the name exists: never clobbers another session's file
            os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_bytes(path: Path | str, data: bytes, overwrite: bool = True) -> Path:
    """Write `data` to `path` atomically (see atomic_target)."""
    with atomic_target(path, overwrite) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_json(path: Path | str, obj: Any, overwrite: bool = True) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=4, default=str) + "\n").encode(), overwrite=overwrite)


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


__all__ = [
    "Change", "Comparison", "BenchmarkVerdict", "GpuMismatchError", "History", "HistoryError", "HistoryFileError",
    "Run", "Series", "StageDelta", "Step", "atomic_write_bytes", "atomic_write_json", "benchmark_key",
    "change_points", "compare", "diff_fields", "flatten", "load_history", "load_run", "mann_whitney", "pick_runs",
    "ratio_bounds", "run_changes", "save_run", "trend", "u_null_counts", "verdict_for",
]

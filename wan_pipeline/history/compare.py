"""Comparing two runs: verdicts per benchmark. Reads files only (no torch import).

`compare(baseline, current, threshold=0.05, alpha=0.01, force=False)`: per benchmark the medians, their ratio, a
one-sided Mann-Whitney U test on the per-round timings with a confidence bound on the slowdown, the stage that moved
most, and what changed between the two runs (environment fingerprint, machine info, benchmark settings, throttling).

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

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wan_pipeline.history.runs import GpuMismatchError, HistoryError, Run, benchmark_key, is_number, load_run
from wan_pipeline.history.stats import mann_whitney, ratio_bounds
from wan_pipeline.plan.config import ordered_stages

DEFAULT_THRESHOLD = 0.05
DEFAULT_ALPHA = 0.01

# machine_info keys whose change says nothing about the setup (they move from one read to the next).
_VOLATILE_MACHINE_KEYS = re.compile(
    r"^(cpu\.hz_actual.*|gpu\.(memory_used_bytes|sm_clock_mhz|mem_clock_mhz|temperature_c|power_w|pstate|"
    r"clock_event_mask|clock_event_reasons|violation_ns.*)|wan_env(\..*)?|comfyui(\..*)?)$"
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
    expected: list[str] | None = None  # the --expect patterns; None: every benchmark of the baseline is expected
    allow_missing: bool = False
    gate_failures: list[str] = field(default_factory=list)  # why the current run cannot pass, besides regressions

    @property
    def regressions(self) -> list[BenchmarkVerdict]:
        return [b for b in self.benchmarks if b.regression]

    @property
    def exit_code(self) -> int:
        return 1 if self.regressions or self.gate_failures else 0

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
            "gate_failures": self.gate_failures,
            "baseline_incomplete": self.baseline.incomplete, "current_incomplete": self.current.incomplete,
            "expected": self.expected, "allow_missing": self.allow_missing,
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
        for failure in self.gate_failures:
            lines.append(f"GATE: {failure}")
        if regs:
            lines.append(f"VERDICT: {len(regs)} regression(s): {', '.join(r.fullname for r in regs)}")
            for r in regs:
                causes = self.likely_causes(r)
                lines.append(f"  {r.fullname}: changed at the same time: {'; '.join(causes) if causes else 'nothing recorded'}")
        elif self.gate_failures:
            lines.append(f"VERDICT: not a clean comparison ({len(self.gate_failures)} problem(s) above); no "
                         f"significant regression among the {len(self.benchmarks)} benchmark(s) compared")
        else:
            lines.append(f"VERDICT: no significant regression over {self.threshold * 100:g} % "
                         f"({len(self.benchmarks)} benchmark(s) compared)")
        return "\n".join(lines)


def gate_failures(base: Run, cur: Run, expected: list[str] | None = None, allow_missing: bool = False) -> list[str]:
    """Why a comparison cannot pass whatever the timings say: a run marked incomplete (interrupted, stopped early,
    failed or unrun tests), or a benchmark of the baseline missing from the current run. `expected` (fnmatch
    patterns on the benchmark names) narrows what must be present to the benchmarks matching them: each pattern must
    match a benchmark of the current run, and every baseline benchmark it matches must be there too;
    `allow_missing` accepts a smaller current run."""
    from fnmatch import fnmatchcase

    failures = []
    for which, run in (("current", cur), ("baseline", base)):
        if run.incomplete is not None:
            failures.append(f"the {which} run {run.path} is incomplete: {run.incomplete_reason()}")
    if expected:
        def matches(pattern, key, bench):
            return fnmatchcase(key, pattern) or fnmatchcase(str(bench.get("name")), pattern)

        for pattern in expected:
            if not any(matches(pattern, k, b) for k, b in cur.benchmarks.items()):
                failures.append(f"expected benchmark {pattern!r} is not in the current run {cur.path}")
                continue
            missing = [k for k, b in base.benchmarks.items() if matches(pattern, k, b) and k not in cur.benchmarks]
            if missing:
                failures.append(f"{len(missing)} benchmark(s) of the baseline matching {pattern!r} missing from "
                                f"the current run: {', '.join(missing)}")
    elif not allow_missing:
        missing = [k for k in base.benchmarks if k not in cur.benchmarks]
        if missing:
            failures.append(f"{len(missing)} benchmark(s) of the baseline missing from the current run: "
                            f"{', '.join(missing)} (name the benchmarks to expect with --expect, or pass "
                            "--allow-missing)")
    return failures


def compare(baseline: Run | str | Path, current: Run | str | Path, threshold: float = DEFAULT_THRESHOLD,
            force: bool = False, alpha: float = DEFAULT_ALPHA, expected: list[str] | None = None,
            allow_missing: bool = False) -> Comparison:
    """Compare two runs benchmark by benchmark. Raises GpuMismatchError for different GPU models or memory caps
    (capped against uncapped, or two caps) unless `force`. The comparison fails (exit code 1) on a regression and
    on any of `gate_failures`."""
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
    if base.memory_cap != cur.memory_cap:
        from wan_pipeline.plan.memory import format_bytes

        def cap(run):
            return f"a memory cap of {format_bytes(run.memory_cap)}" if run.memory_cap else "no memory cap"

        reason = (f"different memory caps: baseline {base.path} ran with {cap(base)}, current {cur.path} with "
                  f"{cap(cur)}; a capped run emulates a smaller card and its timings are not comparable")
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
        conditions=conditions, warnings=warnings, expected=list(expected) if expected else None,
        allow_missing=allow_missing, gate_failures=gate_failures(base, cur, expected, allow_missing),
    )


def setup_changes(before: Run, after: Run) -> tuple[list[Change], list[Change]]:
    """(fingerprint changes, machine_info changes) between two runs; a machine_info key the fingerprint of both runs
    already records is left to the fingerprint."""
    env = diff_fields(before.env, after.env, prefix="env:")
    machine = diff_fields(before.machine_info, after.machine_info, _VOLATILE_MACHINE_KEYS, prefix="machine:")
    if before.env and after.env:
        machine = [c for c in machine if not _FINGERPRINTED_MACHINE_KEYS.match(c.field[len("machine:"):])]
    from wan_pipeline.history.comfyui import comfyui_changes  # the server's own changes, in a user's words

    return env, machine + comfyui_changes(before.machine_info.get("comfyui"), after.machine_info.get("comfyui"))


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

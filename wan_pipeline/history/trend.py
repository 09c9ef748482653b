"""`trend(history)`: the change points of each benchmark's run medians, with the fields that changed at the run
where the step happened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wan_pipeline.history.changepoints import change_points
from wan_pipeline.history.compare import DEFAULT_THRESHOLD, Change, _fmt_time, run_changes
from wan_pipeline.history.runs import History, Run, load_history


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

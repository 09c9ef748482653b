"""How each benchmark test of the session ended, kept in its pytest-benchmark JSON (`wan_session`), and the
closing hint for cases that had no budget.

pytest-benchmark stores the timings of a test even when the test failed after them (a missed budget, a quality
threshold) and says nothing of tests that never ran (-x, an interrupt): `wan-bench budgets` reads `wan_session`
to skip failed benchmarks and partial runs. Its keys: `failed` (node id -> the first line of why) and `not_run`
(benchmark tests collected that never reached an outcome).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

import pytest

from wan_pipeline.suite.saving import SAVING_KEY


@dataclass
class SessionOutcomes:
    collected: list[str] = field(default_factory=list)  # benchmark tests, in order
    ended: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    unbudgeted: list[str] = field(default_factory=list)  # generation cases that found no budget

    def to_json(self) -> dict:
        return {"failed": dict(self.failed), "not_run": [n for n in self.collected if n not in self.ended]}


OUTCOMES_KEY = pytest.StashKey[SessionOutcomes]()


def outcomes_of(config) -> SessionOutcomes:
    return config.stash.setdefault(OUTCOMES_KEY, SessionOutcomes())


def _why(report) -> str:
    text = getattr(report, "longreprtext", "") or ""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("E ")]
    first = lines[0][1:].strip() if lines else (text.strip().splitlines() or ["failed"])[-1].strip()
    return f"{report.when}: {first}"[:300]


class OutcomeRecorder:
    """The hooks that fill the session's SessionOutcomes (registered by the plugin's configure)."""

    def __init__(self, config):
        self.outcomes = outcomes_of(config)

    def pytest_collection_finish(self, session):
        self.outcomes.collected = [item.nodeid for item in session.items
                                   if "benchmark" in getattr(item, "fixturenames", ())]

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.outcomes.ended.add(report.nodeid)
            self.outcomes.failed.setdefault(report.nodeid, _why(report))
        elif report.when == "call" or (report.when == "setup" and report.skipped):
            self.outcomes.ended.add(report.nodeid)


def budget_hint(config, unbudgeted: int) -> list[str]:
    """The closing line for cases without a budget: how to make budgets from this session's own benchmark file
    (its --benchmark-json, else the history file it saved), or how to keep one to make them from."""
    if not unbudgeted:
        return []
    saving = config.stash.get(SAVING_KEY, None)
    target = getattr(config.option, "benchmark_json", None)
    if target is None and saving is not None:
        target = saving.json_target
    name = getattr(target, "name", target)
    path = name if isinstance(name, str) and not name.startswith("<") and name != "-" else None
    if path is None and saving is not None and saving.saved is not None:
        path = str(saving.saved)
    what = f"{unbudgeted} case(s) had no budget for this card"
    if path is None:
        return [f"{what}: keep this session's results (--benchmark-json run.json or --benchmark-autosave) and make "
                f"budgets from them: wan-bench budgets --from run.json --out budgets.toml, then run again with "
                f"--wan-budgets budgets.toml"]
    return [f"{what}: make budgets from this run with: wan-bench budgets --from {shlex.quote(path)} --out "
            f"budgets.toml, then run again with --wan-budgets budgets.toml"]

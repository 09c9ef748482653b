"""The closing hint for cases that had no budget: how to make budgets from this session's own benchmark file.

Which tests of a session failed or never ran is kept by `saving.Completeness` (the JSON's `wan_incomplete`), which
`wan-bench compare` and `wan-bench budgets` both read.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

import pytest

from wan_pipeline.suite.saving import SAVING_KEY


@dataclass
class SessionOutcomes:
    unbudgeted: list[str] = field(default_factory=list)  # generation cases that found no budget


OUTCOMES_KEY = pytest.StashKey[SessionOutcomes]()


def outcomes_of(config) -> SessionOutcomes:
    return config.stash.setdefault(OUTCOMES_KEY, SessionOutcomes())


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

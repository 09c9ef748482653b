"""Inner pytest sessions (pytester subprocesses) that run this checkout's plugin on the CPU, on any machine.

The tests that start them are about CPU behaviour (tiny mode, CPU workers, no GPU in the records), so they hide
every GPU (`CUDA_VISIBLE_DEVICES=`) rather than assume the machine has none, and they load this checkout's
wan_pipeline: the installed entry point when there is one, else the plugin named with `-p` (a plain checkout,
where only the root conftest.py loads it and an inner session in a temporary folder would not see that file).
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLUGIN = "wan_pipeline.suite.plugin"


def plugin_args() -> list[str]:
    """`-p wan_pipeline.suite.plugin` where the pytest11 entry point does not load it already."""
    registered = any(ep.value == PLUGIN for ep in importlib.metadata.entry_points(group="pytest11"))
    return [] if registered else ["-p", PLUGIN]


def cpu_only(monkeypatch) -> None:
    """The environment an inner session inherits: no GPU visible, this checkout first on the import path, and
    none of the suite's own variables from the outer shell."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    for name in [n for n in os.environ if n.startswith("WAN_")] + ["PYTEST_ADDOPTS", "TORCH_COMPILE", "RANK",
                                                                   "WORLD_SIZE"]:
        monkeypatch.delenv(name, raising=False)

"""Root conftest: the wan-bench plugin is registered through the pytest11 entry point (pyproject.toml).

When the package is not installed (a plain checkout), load the plugin from the source tree instead.
"""

import importlib.metadata
import importlib.util


def _entry_point_registered() -> bool:
    return any(ep.value == "wan_pipeline.suite.plugin" for ep in importlib.metadata.entry_points(group="pytest11"))


if not _entry_point_registered() and importlib.util.find_spec("wan_pipeline.suite.plugin") is not None:
    pytest_plugins = ["wan_pipeline.suite.plugin"]

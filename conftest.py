"""Root conftest: the wan-bench plugin is registered through the pytest11 entry point (pyproject.toml).

When the package is not installed (a plain checkout), load the plugin from the source tree instead.
"""

try:
    import importlib.metadata as _md

    _registered = any(ep.value == "wan_pipeline.pytest_plugin" for ep in _md.entry_points(group="pytest11"))
except Exception:  # pragma: no cover - metadata unavailable
    _registered = False

if not _registered:
    pytest_plugins = ["wan_pipeline.pytest_plugin"]

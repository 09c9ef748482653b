"""Where pytest-benchmark keeps a session's history, and how it is saved.

Per-GPU storage: before pytest-benchmark builds its session (its configure is trylast), a file storage given by
`--benchmark-storage` (default `./.benchmarks`) becomes `<storage>/<gpu slug>`, so histories of different GPU models
never mix and `--benchmark-compare` loads from this GPU's folder; pytest-benchmark adds its machine folder below.

Saving: pytest-benchmark's file storage writes `NNNN_name.json` in place after globbing for the next number, and
offers no hook to replace that, so two sessions saving at once can collide and an interrupted write leaves half a
file. The plugin takes `--benchmark-save/--benchmark-autosave` for file storages: the options are cleared before
pytest-benchmark reads them, and at the end the session's JSON, made by pytest-benchmark's own hooks
(`pytest_benchmark_generate_json`, then `pytest_benchmark_update_json` for every plugin's additions), is saved with
the next free number under a folder lock and renamed into place. The round data is always kept (compare's rank test
needs it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Saving:
    """What this session saves itself: the history name and folder, and (for a --wan-gpus controller) the
    --benchmark-json file it writes merged."""

    name: str | None = None
    storage_root: Path | None = None
    json_target: object = None
    saved: Path | None = None  # the history file this session saved


SAVING_KEY = pytest.StashKey[Saving]()


def file_storage_root(storage: str) -> Path | None:
    """The folder of a pytest-benchmark file storage URI (a plain path counts as file://), None for another kind."""
    if "://" not in storage:
        return Path(storage)
    if storage.startswith("file://"):
        return Path(storage[len("file://"):])
    return None


def configure_storage(config, slug: str) -> Saving:
    """Per-GPU storage and the history save taken over (see the module docstring); before pytest-benchmark's
    configure."""
    saving = Saving()
    option = config.option
    root = file_storage_root(str(getattr(option, "benchmark_storage", "") or ""))
    if root is not None:
        root = root / slug
        option.benchmark_storage = f"file://{root}"
        saving.storage_root = root
        saving.name = option.benchmark_save or option.benchmark_autosave
        option.benchmark_save = option.benchmark_autosave = None
    config.stash[SAVING_KEY] = saving
    return saving


def take_json(config) -> None:
    """This session writes --benchmark-json itself (a --wan-gpus controller: merged, even when it ran no benchmark)."""
    saving = config.stash[SAVING_KEY]
    saving.json_target, config.option.benchmark_json = getattr(config.option, "benchmark_json", None), None


def _benchmark_session(config):
    return config.pluginmanager.get_plugin("pytest-benchmark")


def session_json(config) -> dict | None:
    """The session's pytest-benchmark JSON (with every round), through pytest-benchmark's hooks; None when
    pytest-benchmark is not active."""
    bs = _benchmark_session(config)
    if bs is None:
        return None
    hook = config.hook
    benchmarks = bs.benchmarks
    commit_info = hook.pytest_benchmark_generate_commit_info(config=config)
    hook.pytest_benchmark_update_commit_info(config=config, commit_info=commit_info)
    output = hook.pytest_benchmark_generate_json(config=config, benchmarks=benchmarks, include_data=True,
                                                 machine_info=bs.get_machine_info(), commit_info=commit_info)
    hook.pytest_benchmark_update_json(config=config, benchmarks=benchmarks, output_json=output)
    return output


def finish(config) -> list[str]:
    """Write what this session took over (the history save, a merged --benchmark-json); returns summary lines."""
    from wan_pipeline.fsutil import atomic_write_json
    from wan_pipeline.history.runs import save_run

    saving = config.stash.get(SAVING_KEY, None)
    if saving is None or not (saving.name or saving.json_target is not None):
        return []
    output = session_json(config)
    if output is None:
        return []
    lines = []
    target = saving.json_target
    if target is not None and not output["benchmarks"] and "wan_workers" not in output:
        lines.append("no benchmark ran and no worker started: --benchmark-json not written")
    elif target is not None:
        name = os.fspath(target) if isinstance(target, (str, os.PathLike)) else getattr(target, "name", None)
        if isinstance(name, str) and not name.startswith("<") and name != "-":
            if not isinstance(target, (str, os.PathLike)):
                target.close()
            atomic_write_json(name, output)
        else:  # a stream (stdout)
            import json

            target.write(json.dumps(output, indent=4, default=str).encode())
            target.flush()
        lines.append(f"merged {len(output['benchmarks'])} benchmark(s) into {name}")
    if saving.name:
        if output["benchmarks"]:
            bs = _benchmark_session(config)
            path = saving.saved = save_run(saving.storage_root / bs.machine_id, output, saving.name)
            lines.append(f"saved {len(output['benchmarks'])} benchmark(s) to the history: {path}")
        else:
            lines.append("nothing saved to the history: no benchmark ran")
    return lines

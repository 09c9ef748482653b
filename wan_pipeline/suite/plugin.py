"""The wan-bench pytest plugin (registered through the `pytest11` entry point): the hooks.

Options live in `options`, the matrix in `cases`, the fixtures in `fixtures` (imported here so that pytest finds
them on the plugin), per-GPU pytest-benchmark storage and the machine-info hook here. Heavy imports (torch,
diffusers) happen only when a wan benchmark actually runs.
"""

from __future__ import annotations

import os

import pytest

from wan_pipeline.plan.presets import get_preset
from wan_pipeline.suite.cases import _case_of, build_cases, stock_cases
# pytest finds fixtures on the plugin module: the session fixtures are imported into it.
from wan_pipeline.suite.fixtures import (wan_budgets, wan_forward_references, wan_model_cache,  # noqa: F401
                                         wan_options, wan_report, wan_single_gpu_outputs)
from wan_pipeline.suite.options import _OPTIONS, _option, read_options


def pytest_addoption(parser):
    group = parser.getgroup("wan-bench", "Wan 2.2 i2v benchmark suite")
    for option, env, help_text in _OPTIONS:
        group.addoption(option, default=None, help=f"{help_text} [env: {env}]")
    from wan_pipeline.suite.gpu_matrix import addoption

    addoption(group)


# ---------------------------------------------------------------------------------------------------- configure


def _in_torchrun_rank() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """--wan-sp N: this session runs again as N torchrun ranks; its exit status is rank 0's."""
    degree = read_options(config).sequence_parallel
    if degree <= 1 or _in_torchrun_rank() or config.option.collectonly:
        return None
    if _option(config, "--wan-gpus"):
        raise pytest.UsageError("--wan-sp splits each generation over the GPUs and --wan-gpus spreads the cases "
                                "over them: choose one")
    from wan_pipeline.errors import WanBenchError
    from wan_pipeline.launch.torchrun import relaunch_pytest

    try:
        options = read_options(config)
        return relaunch_pytest(config, degree, options.mode, options.out)
    except WanBenchError as exc:
        raise pytest.UsageError(f"--wan-sp {degree}: {exc}") from None


def pytest_configure(config):
    config.addinivalue_line("markers", "wan: a wan-bench generation benchmark")
    options = read_options(config)  # bad option values stop the session here, as usage errors
    for name in options.presets:
        try:
            get_preset(name)
        except Exception as exc:
            raise pytest.UsageError(str(exc)) from None
    from wan_pipeline.plan.config import default_allocator_settings

    default_allocator_settings()
    if options.sequence_parallel > 1 and _in_torchrun_rank():
        from wan_pipeline.launch.rank import start_rank

        start_rank(config, options.sequence_parallel)
    from wan_pipeline.suite.gpu_matrix import configure

    configure(config)  # --wan-gpus: the controller of a matrix spread over GPUs; --wan-worker: one of its workers


def pytest_unconfigure(config):
    from wan_pipeline.launch.rank import stop_rank

    if read_options(config).sequence_parallel > 1 and _in_torchrun_rank():
        stop_rank()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    """After every plugin's configure (pytest-benchmark's is trylast): keep histories of different GPU models in
    separate storage folders, keep the round data `wan-bench compare` tests on, and reload --benchmark-compare
    from the GPU's folder."""
    config = session.config
    session = getattr(config, "_benchmarksession", None)
    if session is None:
        return
    from wan_pipeline.measure.telemetry import gpu_slug, gpu_snapshot

    slug = gpu_slug(gpu_snapshot())
    session.machine_id = f"{session.machine_id}-{slug}"
    storage = session.storage
    if hasattr(storage, "default_machine_id"):
        storage.default_machine_id = session.machine_id
        storage.save = _atomic_save(storage)
    if session.save or session.autosave:
        session.save_data = True
    if session.compare:
        session.handle_loading()


def _atomic_save(storage):
    """pytest-benchmark's file storage save, made atomic: the next free NNNN_ number under a folder lock, written
    to a temporary file and renamed, so two sessions saving at once never clobber each other's history."""
    from wan_pipeline.history.runs import save_run

    def save(output_json, save):
        path = save_run(storage.get("x").parent, output_json, save)
        storage.logger.info(f"Saved benchmark data in: {path}")

    return save


def pytest_benchmark_update_machine_info(config, machine_info):
    """Every session's JSON carries the GPU and the environment fingerprint, whatever it benchmarked."""
    from wan_pipeline.measure.telemetry import environment_fingerprint, gpu_snapshot

    machine_info["gpu"] = gpu_snapshot()
    machine_info["wan_env"] = environment_fingerprint()


def pytest_generate_tests(metafunc):
    wanted = [n for n in ("wan_case", "wan_stock_case") if n in metafunc.fixturenames]
    if not wanted:
        return
    options = read_options(metafunc.config)
    try:
        cases = build_cases(options)
        if wanted[0] == "wan_stock_case":
            cases = stock_cases(cases)
    except Exception as exc:  # a bad preset or workflow: one clear collection error
        from wan_pipeline.errors import WanBenchError

        if isinstance(exc, WanBenchError):
            raise pytest.UsageError(str(exc)) from None
        raise
    metafunc.parametrize(wanted[0], cases, ids=[c.id for c in cases])


def pytest_collection_modifyitems(session, config, items):
    """Group wan cases by the weights they load (stable otherwise), so each model set loads once."""
    from wan_pipeline.plan.config import ModelSetKey

    def load_order(indexed):
        index, item = indexed
        case = _case_of(item)
        if case is None:
            return (0, "", index)
        return (1, repr(ModelSetKey.for_run(case.config, case.mode, None).weights()), index)

    items[:] = [item for _, item in sorted(enumerate(items), key=load_order)]



def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Add each generation's speed-up over the stock diffusers pipeline, and each split generation's speed-up over
    one GPU, measured in the same session."""
    from wan_pipeline.run.parallel import add_scaling_to_json

    lines = getattr(config, "_wan_report", None)
    scaling_lines = add_scaling_to_json(output_json.get("benchmarks", []))
    if lines is not None:
        lines.extend(scaling_lines)
    stock = {}
    for bench in output_json.get("benchmarks", []):
        info = bench.get("extra_info") or {}
        if bench.get("name", "").startswith("test_stock_diffusers[") and info.get("preset"):
            stock[(info["preset"], info.get("mode"))] = bench["stats"]["median"]
    for bench in output_json.get("benchmarks", []):
        info = bench.get("extra_info") or {}
        ref = stock.get((info.get("preset"), info.get("mode")))
        if bench.get("name", "").startswith("test_generation[") and ref:
            info["stock_diffusers_seconds"] = ref
            info["speedup_vs_stock_diffusers"] = round(ref / bench["stats"]["median"], 3)
            if lines is not None:
                lines.append(f"{bench['name']}: {info['speedup_vs_stock_diffusers']}x the stock diffusers "
                             f"pipeline ({ref:.2f} s)")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = getattr(config, "_wan_report", None)
    if lines:
        terminalreporter.section("wan-bench")
        for line in lines:
            terminalreporter.write_line(line)

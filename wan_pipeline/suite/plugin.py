"""The wan-bench pytest plugin (registered through the `pytest11` entry point): the hooks.

Options live in `options` (parsed once into `config.stash`), the matrix and its stock references in `cases`, the
fixtures in `fixtures` (imported here so that pytest finds them on the plugin), storage and saving in `saving`, the
matrix over GPUs in `matrix`. Heavy imports (torch, diffusers) happen only when a wan benchmark actually runs.
"""

from __future__ import annotations

import pytest

from wan_pipeline.suite import outcomes, saving
from wan_pipeline.suite.cases import (References, add_stock_speedups, build_cases, case_of, memory_skips,
                                      stock_cases)
from wan_pipeline.suite.comfyui import machine_info_entry, wan_comfyui  # noqa: F401
# pytest finds fixtures on the plugin module: the session fixtures are imported into it.
from wan_pipeline.suite.fixtures import (report_lines, wan_budgets,  # noqa: F401
                                         wan_forward_references, wan_missing_budgets, wan_model_cache,
                                         wan_options, wan_report, wan_single_gpu_outputs)
from wan_pipeline.suite.matrix import MatrixController, ShardWorker, full_args
from wan_pipeline.suite.options import add_options, rounds_arguments
from wan_pipeline.suite.options import wan_options as options_of
from wan_pipeline.suite.progress import track_progress, wan_round_progress  # noqa: F401
from wan_pipeline.suite.startup import check_option_files

REFERENCES_KEY = pytest.StashKey[References]()
MEMORY_CAP_KEY = pytest.StashKey[object]()  # what apply_memory_cap did (None: no cap)


def pytest_addoption(parser):
    add_options(parser)


def pytest_load_initial_conftests(early_config, parser, args):
    """$WAN_ROUNDS is the default of --benchmark-min-rounds: put before the user's arguments, theirs win."""
    args[:] = rounds_arguments() + args


# ---------------------------------------------------------------------------------------------------- configure


def _usage_error(where: str, exc: Exception):
    return pytest.UsageError(f"{where}: {exc}" if where else str(exc))


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """--wan-sp N: this session runs again as N torchrun ranks; its exit status is rank 0's."""
    from wan_pipeline.launch.rank import in_torchrun_rank

    options = options_of(config)
    degree = options.sequence_parallel
    if degree <= 1 or in_torchrun_rank() or config.option.collectonly:
        return None
    if options.gpus:
        raise pytest.UsageError("--wan-sp splits each generation over the GPUs and --wan-gpus spreads the cases "
                                "over them: choose one")
    from wan_pipeline.errors import WanBenchError
    from wan_pipeline.launch.torchrun import relaunch_pytest

    try:  # rank 0 keeps the result files; the rank entry point strips them from the others
        return relaunch_pytest(degree, options.mode, full_args(config), options.out, config.invocation_params.dir)
    except WanBenchError as exc:
        raise _usage_error(f"--wan-sp {degree}", exc) from None


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark builds its session from the options (its configure is trylast)
def pytest_configure(config):
    config.addinivalue_line("markers", "wan(reference=False, measured_against_reference=False): a wan-bench "
                                       "generation benchmark; `reference` marks the stock reference of its case's "
                                       "key, `measured_against_reference` a test whose speed-up over it is recorded")
    from wan_pipeline.errors import WanBenchError
    from wan_pipeline.launch.rank import check_world_size, in_torchrun_rank
    from wan_pipeline.measure.telemetry import gpu_slug, gpu_snapshot
    from wan_pipeline.plan.config import default_allocator_settings

    options = options_of(config)
    default_allocator_settings()
    check_option_files(options)  # budgets, workflow and models folder: usage errors before anything runs
    if options.sequence_parallel > 1 and in_torchrun_rank():
        try:
            check_world_size(options.sequence_parallel)
        except WanBenchError as exc:
            raise _usage_error("--wan-sp", exc) from None
    cap_info = None
    if options.memory_cap is not None and not (options.gpus and not config.getoption("wan_shard")):
        from wan_pipeline.run.memory import apply_memory_cap  # before anything is allocated on a card

        try:
            cap_info = apply_memory_cap(options.memory_cap)
        except WanBenchError as exc:
            raise _usage_error("--wan-memory-cap", exc) from None
    config.stash[MEMORY_CAP_KEY] = cap_info
    saving.configure_storage(config, saving.storage_slug(gpu_slug(gpu_snapshot()), options.memory_cap))
    config.stash[REFERENCES_KEY] = References()
    saving.track_completeness(config)
    track_progress(config)
    shard, progress = config.getoption("wan_shard"), config.getoption("wan_progress")
    if shard or progress:
        config.pluginmanager.register(ShardWorker(shard, progress), "wan-shard-worker")
    if options.gpus and not shard:
        config.pluginmanager.register(_matrix_controller(config, options), "wan-gpu-matrix")
        saving.take_json(config)


def _matrix_controller(config, options) -> MatrixController:
    import os

    from wan_pipeline.launch.shards import GpuSelectionError, parse_gpus
    from wan_pipeline.suite.cases import resolved_mode

    if os.environ.get("PYTEST_XDIST_WORKER") or config.getoption("dist", "no") != "no" \
            or config.getoption("numprocesses", None):
        raise pytest.UsageError("--wan-gpus spreads the matrix with its own worker processes; do not combine it "
                                "with xdist (-n/--dist): pytest-benchmark turns itself off under xdist")
    import torch

    try:
        devices = parse_gpus(options.gpus, torch.cuda.device_count(),
                             cpu_workers_allowed=(resolved_mode(options) == "tiny"))
    except GpuSelectionError as exc:
        raise _usage_error("", exc) from None
    return MatrixController(config, devices, options.gpus_timeout, options.out)


# ---------------------------------------------------------------------------------------------------- collection


def pytest_report_header(config):
    """The model source at the top of every session, with the reason `auto` chose it."""
    from wan_pipeline.suite.cases import mode_and_reason

    mode, reason = mode_and_reason(options_of(config))
    return f"wan-bench: {mode} models ({reason})"


def pytest_benchmark_update_machine_info(config, machine_info):
    """Every session's JSON carries the GPU and the environment fingerprint, whatever it benchmarked."""
    from wan_pipeline.measure.telemetry import environment_fingerprint, gpu_snapshot

    machine_info["gpu"] = gpu_snapshot()
    machine_info["wan_env"] = environment_fingerprint()
    cap = options_of(config).memory_cap
    machine_info["wan_memory_cap"] = config.stash.get(MEMORY_CAP_KEY, None) or (
        None if cap is None else {"cap_bytes": cap, "applied": False, "why": "capped in the --wan-gpus workers"})
    comfyui = machine_info_entry(config)
    if comfyui is not None:
        machine_info["comfyui"] = comfyui


def pytest_generate_tests(metafunc):
    wanted = [n for n in ("wan_case", "wan_stock_case") if n in metafunc.fixturenames]
    if not wanted:
        return
    from wan_pipeline.errors import WanBenchError

    options = options_of(metafunc.config)
    try:
        cases = build_cases(options, metafunc.config)
        if wanted[0] == "wan_stock_case":
            cases = stock_cases(cases)
        unfit = memory_skips(cases, options, stock=wanted[0] == "wan_stock_case")
    except WanBenchError as exc:  # a bad workflow, a cap no case fits: one clear usage error
        raise pytest.UsageError(str(exc)) from None
    params = [pytest.param(c, id=c.id, marks=[pytest.mark.skip(reason=unfit[c.id])] if c.id in unfit else [])
              for c in cases]
    metafunc.parametrize(wanted[0], params)


def pytest_collection_modifyitems(session, config, items):
    """Group wan cases by the weights they load (stable otherwise), so each model set loads once; link each
    generation to its stock reference."""
    from wan_pipeline.plan.config import ModelSetKey

    references = config.stash[REFERENCES_KEY]
    for item in items:
        references.add(item)

    def load_order(indexed):
        index, item = indexed
        case = case_of(item)
        if case is None or getattr(case, "backend", None) == "comfyui":
            return (0, "", index)
        return (1, repr(ModelSetKey.for_run(case.config, case.mode, None).weights()), index)

    items[:] = [item for _, item in sorted(enumerate(items), key=load_order)]


# ---------------------------------------------------------------------------------------------------- results


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Add each generation's speed-up over the stock diffusers pipeline, and each split generation's speed-up over
    one GPU, measured in the same session (in a --wan-gpus controller: across its workers)."""
    from wan_pipeline.run.parallel import add_scaling_to_json

    found = output_json.get("benchmarks", [])
    lines = add_scaling_to_json(found) + add_stock_speedups(found, config.stash[REFERENCES_KEY])
    lines += saving.mark_incomplete(config, output_json)
    report = report_lines(config)
    report.extend(line for line in lines if line not in report)  # the JSON and the history save both call this


def pytest_sessionfinish(session, exitstatus):
    """After pytest-benchmark's own finish: save the history (atomically) and write a merged --benchmark-json."""
    config = session.config
    report_lines(config).extend(saving.finish(config))
    if not config.getoption("wan_shard"):  # a --wan-gpus worker's controller says it, with the merged file
        controller = config.pluginmanager.get_plugin("wan-gpu-matrix")
        missing = len(outcomes.outcomes_of(config).unbudgeted) + (controller.unbudgeted() if controller else 0)
        report_lines(config).extend(outcomes.budget_hint(config, missing))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = report_lines(config)
    if lines:
        terminalreporter.section("wan-bench")
        for line in lines:
            terminalreporter.write_line(line)

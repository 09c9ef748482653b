"""The wan-bench pytest plugin (registered through the `pytest11` entry point).

Options (each with an environment variable), the benchmark matrix as parametrized `wan_case`s, the session's
model cache fixture, budgets, per-GPU pytest-benchmark storage and the machine-info hook. Heavy imports (torch,
diffusers) happen only when a wan benchmark actually runs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from .config import ATTENTION_BACKENDS, LORA_ROUNDINGS, MODES, PRECISIONS, RESIDENCIES
from .presets import DEFAULT_MATRIX, get_preset

_OPTIONS = (
    # (option, env var, help)
    ("--wan-mode", "WAN_MODE", f"model source: auto (default), {', '.join(MODES)}"),
    ("--wan-models", "WAN_MODELS_DIR", "ComfyUI models folder or diffusers folder (real mode)"),
    ("--wan-preset", "WAN_PRESET", "comma-separated presets (default: the matrix that fits the hardware)"),
    ("--wan-budgets", "WAN_BUDGETS", "budgets TOML (default: fixtures/budgets.toml)"),
    ("--wan-out", "WAN_OUT", "folder for videos and result records (default: wan-bench-out)"),
    ("--wan-attention", "WAN_ATTENTION", f"comma-separated attention backends ({', '.join(ATTENTION_BACKENDS)})"),
    ("--wan-precision", "WAN_PRECISION", f"comma-separated precisions ({', '.join(PRECISIONS)})"),
    ("--wan-lora-rounding", "WAN_LORA_ROUNDING", "LoRA merged into fp8 weights: comfyui (default: ComfyUI's "
                                                 "stochastic rounding, seeded per weight) or nearest"),
    ("--wan-compile", "TORCH_COMPILE", "0, 1 or both (default: $TORCH_COMPILE, else 0)"),
    ("--wan-rounds", "WAN_ROUNDS", "timed rounds per case (default 5: the fewest that compare's rank test can judge)"),
    ("--wan-warmup", "WAN_WARMUP", "untimed warm-up generations per case (default 1)"),
    ("--wan-workflow", "WAN_WORKFLOW", "benchmark this ComfyUI workflow file and its matrix variants"),
    ("--wan-video", "WAN_VIDEO", "saved clips: mp4 (needs imageio-ffmpeg), webp or none; default auto: none for "
                                 "synthetic runs (full-size noise), mp4 otherwise"),
    ("--wan-gpus", "WAN_GPUS", "spread the wan cases over GPUs, one worker pinned per GPU: all, a count or a comma "
                               "list of device indices (tiny mode on a CPU: a count of CPU workers)"),
    ("--wan-gpus-timeout", "WAN_GPUS_TIMEOUT", "seconds the --wan-gpus workers may run in all (default: no limit)"),
    ("--wan-residency", "WAN_RESIDENCY", "what stays on the GPU: auto (default: everything that fits), resident, "
                                         "offload-text-encoder or offload-idle-expert"),
    ("--wan-vae-bands", "WAN_VAE_BANDS", "run the VAE in N bands of rows one after another, as ComfyUI's tiled VAE "
                                         "nodes (less memory; default 1: the whole frame)"),
    ("--wan-sp", "WAN_SP", "sequence parallel: rerun the session as N torchrun ranks (NCCL, one per GPU); every case "
                           "runs on one GPU and split over N (Ulysses), with speed-up and scaling efficiency"),
)


def pytest_addoption(parser):
    group = parser.getgroup("wan-bench", "Wan 2.2 i2v benchmark suite")
    for option, env, help_text in _OPTIONS:
        group.addoption(option, default=None, help=f"{help_text} [env: {env}]")
    from .gpu_matrix import addoption

    addoption(group)


def _option(config, option: str) -> str | None:
    value = config.getoption(option.lstrip("-").replace("-", "_"))
    if value is None:
        env = dict((o, e) for o, e, _ in _OPTIONS)[option]
        value = os.environ.get(env) or None
    return value


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


@dataclass(frozen=True)
class WanOptions:
    mode: str
    models_dir: str | None
    presets: tuple[str, ...]
    budgets: str | None
    out: Path
    attention: tuple[str, ...]
    precision: tuple[str, ...]
    compile: tuple[bool, ...]
    rounds: int
    warmup: int
    workflow: str | None
    video: str = "auto"
    sequence_parallel: int = 1
    residency: str = "auto"
    vae_bands: int = 1
    lora_rounding: str = "comfyui"


def _compile_values(value: str | None) -> tuple[bool, ...]:
    from .config import ConfigError, compile_values

    try:
        return compile_values(value)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None


def _int_option(config, option: str, default: int, minimum: int) -> int:
    raw = _option(config, option)
    try:
        value = int(raw) if raw is not None else default
    except ValueError:
        raise pytest.UsageError(f"{option} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise pytest.UsageError(f"{option} must be at least {minimum}, got {value}")
    return value


def read_options(config) -> WanOptions:
    mode = _choice(_option(config, "--wan-mode") or "auto", "--wan-mode", ("auto",) + MODES)
    attention = tuple(_csv(_option(config, "--wan-attention")) or ["sdpa"])
    precision = tuple(_csv(_option(config, "--wan-precision")) or ["auto"])
    for name, values, allowed in (("--wan-attention", attention, ATTENTION_BACKENDS),
                                  ("--wan-precision", precision, PRECISIONS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise pytest.UsageError(f"{name}: unknown value(s) {bad}; choose from {allowed}")
    return WanOptions(
        mode=mode,
        models_dir=_option(config, "--wan-models"),
        presets=tuple(_csv(_option(config, "--wan-preset"))),
        budgets=_option(config, "--wan-budgets"),
        out=Path(_option(config, "--wan-out") or "wan-bench-out"),
        attention=attention,
        precision=precision,
        compile=_compile_values(_option(config, "--wan-compile")),
        rounds=_int_option(config, "--wan-rounds", 5, 1),
        warmup=_int_option(config, "--wan-warmup", 1, 0),
        workflow=_option(config, "--wan-workflow"),
        video=_choice((_option(config, "--wan-video") or "auto").lower(), "--wan-video", VIDEO_CHOICES),
        sequence_parallel=_int_option(config, "--wan-sp", 1, 1),
        residency=_choice(_option(config, "--wan-residency") or "auto", "--wan-residency", RESIDENCIES),
        lora_rounding=_choice(_option(config, "--wan-lora-rounding") or "comfyui", "--wan-lora-rounding",
                              LORA_ROUNDINGS),
        vae_bands=_int_option(config, "--wan-vae-bands", 1, 1),
    )


def _choice(value: str, option: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise pytest.UsageError(f"{option}: unknown value {value!r}; choose from {allowed}")
    return value


VIDEO_CHOICES = ("auto", "mp4", "webp", "none")


def clip_format(video: str, mode: str) -> str | None:
    """The container a case's clip is written in, or None for no clip. Synthetic weights make full-size noise that
    shows nothing: 49 frames of 832x1216 took 11.8 s to write as webp (41 MB) on a 2-core CPU."""
    if video == "auto":
        return None if mode == "synthetic" else "mp4"
    return None if video == "none" else video


def quality_metrics_wanted(mode: str) -> bool:
    """Clip metrics are computed for real weights and for tiny runs (cheap, they exercise the code); synthetic
    weights are random, so their full-size clip's metrics would be meaningless numbers."""
    return mode != "synthetic"


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
    from .distributed import relaunch_pytest
    from .errors import WanBenchError

    try:
        return relaunch_pytest(config, degree)
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
    from .config import default_allocator_settings

    default_allocator_settings()
    if options.sequence_parallel > 1 and _in_torchrun_rank():
        from .distributed import start_rank

        start_rank(config, options.sequence_parallel)
    from .gpu_matrix import configure

    configure(config)  # --wan-gpus: the controller of a matrix spread over GPUs; --wan-worker: one of its workers


def pytest_unconfigure(config):
    from .distributed import stop_rank

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
    from .telemetry import gpu_slug, gpu_snapshot

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
    from .history import save_run

    def save(output_json, save):
        path = save_run(storage.get("x").parent, output_json, save)
        storage.logger.info(f"Saved benchmark data in: {path}")

    return save


def pytest_benchmark_update_machine_info(config, machine_info):
    """Every session's JSON carries the GPU and the environment fingerprint, whatever it benchmarked."""
    from .telemetry import environment_fingerprint, gpu_snapshot

    machine_info["gpu"] = gpu_snapshot()
    machine_info["wan_env"] = environment_fingerprint()


# ---------------------------------------------------------------------------------------------------- the matrix


def resolved_mode(options: WanOptions) -> str:
    from .models import resolve_mode

    return resolve_mode(options.mode, options.models_dir)


def default_presets(mode: str) -> tuple[str, ...]:
    """The matrix that fits the hardware: every preset whose working set fits the card (all of them on a CPU)."""
    if mode == "tiny":
        return DEFAULT_MATRIX
    import torch

    from .models import working_memory_estimate
    from .plan import make_plan

    total = torch.cuda.get_device_properties(0).total_memory
    expert_bytes = 14.3e9  # one A14B expert in fp8 storage: the least a run can keep resident
    fits = []
    for name in DEFAULT_MATRIX:
        plan = make_plan(get_preset(name), mode)
        if expert_bytes + working_memory_estimate(plan.tokens, plan.width, plan.height) <= total:
            fits.append(name)
    return tuple(fits)


def build_cases(options: WanOptions):
    from .case import WanCase
    from .models import resolve_run_precision

    mode = resolved_mode(options)
    if options.workflow:
        from .workflow import load_workflow_configs, locate_input_image, workflow_matrix

        configs = [v for c in load_workflow_configs(options.workflow)
                   for v in workflow_matrix(locate_input_image(c, options.workflow, options.models_dir, mode))]
    else:
        configs = [get_preset(n) for n in (options.presets or default_presets(mode))]
    degrees = (1, options.sequence_parallel) if options.sequence_parallel > 1 else (1,)
    cases = []
    for config in configs:
        for precision in options.precision:
            for compile_on in options.compile:
                for attention in options.attention:
                    for degree in degrees:
                        case_config = config.replace(attention=attention, precision=precision, compile=compile_on,
                                                     sequence_parallel=degree, residency=options.residency,
                                                     vae_bands=options.vae_bands,
                                                     lora_rounding=options.lora_rounding)
                        cases.append(WanCase(resolve_run_precision(case_config, mode, options.models_dir), mode))
    return cases


def stock_cases(cases):
    """One stock-diffusers case per two-pass preset of the matrix (bf16, default attention)."""
    seen, out = set(), []
    for case in cases:
        cfg = case.config
        if len(cfg.passes) == 2 and cfg.name not in seen:
            seen.add(cfg.name)
            out.append(type(case)(cfg.replace(attention="sdpa", precision="bf16", compile=False, sequence_parallel=1),
                                  case.mode))
    return out


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
        from .errors import WanBenchError

        if isinstance(exc, WanBenchError):
            raise pytest.UsageError(str(exc)) from None
        raise
    metafunc.parametrize(wanted[0], cases, ids=[c.id for c in cases])


def _case_of(item):
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    return callspec.params.get("wan_case") or callspec.params.get("wan_stock_case")


def pytest_collection_modifyitems(session, config, items):
    """Group wan cases by the weights they load (stable otherwise), so each model set loads once."""
    from .config import ModelSetKey

    def load_order(indexed):
        index, item = indexed
        case = _case_of(item)
        if case is None:
            return (0, "", index)
        return (1, repr(ModelSetKey.for_run(case.config, case.mode, None).weights()), index)

    items[:] = [item for _, item in sorted(enumerate(items), key=load_order)]


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def wan_options(pytestconfig) -> WanOptions:
    return read_options(pytestconfig)


@pytest.fixture(scope="session")
def wan_model_cache(wan_options):
    """One model set resident at a time, shared by every test that needs the same weights."""
    from .cache import ModelCache
    from .distributed import rank_device

    cache = ModelCache(models_dir=wan_options.models_dir, device=rank_device())
    yield cache
    cache.evict()


@pytest.fixture(scope="session")
def wan_budgets(wan_options):
    from .budgets import load_budgets
    from .errors import WanBenchError

    try:
        return load_budgets(wan_options.budgets)
    except WanBenchError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.fixture(scope="session")
def wan_forward_references():
    """bf16 SDPA expert outputs by (preset, mode): what faster modes are compared with."""
    return {}


@pytest.fixture(scope="session")
def wan_single_gpu_outputs():
    """Final latents and sampled frames of the one-GPU cases, by case id: what --wan-sp cases are compared with."""
    return {}


@pytest.fixture(scope="session")
def wan_report(pytestconfig):
    """Lines the terminal summary prints at the end (budgets checked or missing, quality skipped, throttling)."""
    lines: list[str] = []
    pytestconfig._wan_report = lines
    return lines


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Add each generation's speed-up over the stock diffusers pipeline, and each split generation's speed-up over
    one GPU, measured in the same session."""
    from .distributed import add_scaling_to_json

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


@contextlib.contextmanager
def out_of_memory_isolation(case, cache):
    """Turn a CUDA out-of-memory error into a clear failure of this case, free the memory, let the rest run."""
    import torch

    from .plan import make_plan

    message = None
    try:
        yield
    except torch.OutOfMemoryError as exc:
        allocated = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        reserved = torch.cuda.memory_reserved() if torch.cuda.is_available() else 0
        first_line = (str(exc).strip().splitlines() or ["out of memory"])[0].split(". GPU")[0]
        message = (f"{case.id}: out of GPU memory at {make_plan(case.config, case.mode).tokens} tokens "
                   f"({allocated / 2**30:.1f} GiB allocated, {reserved / 2**30:.1f} GiB reserved at failure): "
                   f"{first_line}. The model set was evicted; the session goes on.")
    if message is not None:
        cache.evict()
        pytest.fail(message, pytrace=False)

"""The wan-bench pytest options: declared with argparse types whose defaults come from the environment variables, so a
bad value (on the command line or in the environment) is a usage error at start-up, and turned once into one
`WanOptions` kept in `config.stash`.

Timed rounds are pytest-benchmark's `--benchmark-min-rounds` (default 5, the fewest that compare's rank test can
judge): for a benchmark slower than `--benchmark-max-time` it is exactly the number of rounds pytest-benchmark runs,
which is what the wan tests pass to `benchmark.pedantic`. `WAN_ROUNDS` sets it (the command line wins). The wan
warm-up is not pytest-benchmark's: `--benchmark-warmup-iterations` caps calibration runs of the whole function
(100000 by default, off unless `--benchmark-warmup`); `--wan-warmup` counts reduced generations (the first step of
each pass) run once per shape and kernel.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from wan_pipeline.plan.config import ATTENTION_BACKENDS, LORA_ROUNDINGS, MODES, PRECISIONS, RESIDENCIES

VIDEO_CHOICES = ("auto", "mp4", "webp", "none")


# ---------------------------------------------------------------------------------------------------- value types
# Each raises argparse.ArgumentTypeError: pytest reports it as `error: argument --wan-x: <message>`, a usage error.


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def _csv_of(allowed: tuple[str, ...]):
    def parse(value: str) -> tuple[str, ...]:
        values = _csv(value)
        bad = [v for v in values if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown value(s) {bad}; choose from {allowed}")
        return values

    return parse


def _one_of(allowed: tuple[str, ...], lower: bool = False):
    def parse(value: str) -> str:
        value = value.strip().lower() if lower else value.strip()
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"unknown value {value!r}; choose from {allowed}")
        return value

    return parse


def _presets(value: str) -> tuple[str, ...]:
    from wan_pipeline.plan.presets import get_preset

    names = _csv(value)
    for name in names:
        try:
            get_preset(name)
        except Exception as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return names


def _compile(value: str) -> tuple[bool, ...]:
    from wan_pipeline.plan.config import ConfigError, compile_values

    try:
        return compile_values(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _integer(minimum: int):
    def parse(value: str) -> int:
        try:
            number = int(str(value).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        return number

    return parse


def _seconds(value: str) -> float | None:
    """Seconds; 0 (or empty) for no limit."""
    if not str(value).strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {value!r}") from None
    if seconds < 0 or seconds != seconds:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value!r}")
    return seconds or None


def _gpus(value: str) -> str | None:
    """The syntax of --wan-gpus (all, a count or a comma list); the devices are checked against the host later."""
    from wan_pipeline.launch.shards import GpuSelectionError, parse_gpus_spec

    if not str(value).strip():
        return None
    try:
        parse_gpus_spec(value)
    except GpuSelectionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return str(value).strip()


def _memory_cap(value: str) -> int | None:
    """--wan-memory-cap: bytes (24GB = 24 x 10^9, 16GiB = 16 x 2^30), or None for the whole card."""
    from wan_pipeline.plan.memory import MemoryCapError, parse_memory_size

    if not str(value).strip():
        return None
    try:
        return parse_memory_size(value)
    except MemoryCapError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
def _vae_bands(value: str) -> int:
    from wan_pipeline.plan.config import vae_bands_value

    return vae_bands_value(value)


def _optional(value: str) -> str | None:
    return value or None


# ---------------------------------------------------------------------------------------------------- declarations

# (option, env var, default when neither is set, type, help)
_OPTIONS = (
    ("--wan-mode", "WAN_MODE", "auto", _one_of(("auto",) + MODES), f"model source: auto (default), {', '.join(MODES)}"),
    ("--wan-models", "WAN_MODELS_DIR", "", _optional, "ComfyUI models folder or diffusers folder (real mode)"),
    ("--wan-preset", "WAN_PRESET", "", _presets, "comma-separated presets (default: the matrix that fits the hardware)"),
    ("--wan-budgets", "WAN_BUDGETS", "", _optional,
     "budgets TOML (default: the budgets.toml shipped in wan_pipeline/plan)"),
    ("--wan-out", "WAN_OUT", "wan-bench-out", Path, "folder for videos and result records (default: wan-bench-out)"),
    ("--wan-attention", "WAN_ATTENTION", "sdpa", _csv_of(ATTENTION_BACKENDS),
     f"comma-separated attention backends ({', '.join(ATTENTION_BACKENDS)}; default sdpa)"),
    ("--wan-precision", "WAN_PRECISION", "auto", _csv_of(PRECISIONS),
     f"comma-separated precisions ({', '.join(PRECISIONS)}; default auto)"),
    ("--wan-lora-rounding", "WAN_LORA_ROUNDING", "comfyui", _one_of(LORA_ROUNDINGS),
     "LoRA merged into fp8 weights: comfyui (default: ComfyUI's stochastic rounding, seeded per weight) or nearest"),
    ("--wan-compile", "TORCH_COMPILE", "0", _compile, "0, 1 or both (default: $TORCH_COMPILE, else 0)"),
    ("--wan-warmup", "WAN_WARMUP", "1", _integer(0),
     "untimed warm-up generations per case, each the first step of every pass (default 1); timed rounds are "
     "--benchmark-min-rounds (or $WAN_ROUNDS), default 5"),
    ("--wan-workflow", "WAN_WORKFLOW", "", _optional, "benchmark this ComfyUI workflow file and its matrix variants"),
    ("--wan-video", "WAN_VIDEO", "auto", _one_of(VIDEO_CHOICES, lower=True),
     "saved clips: mp4 (needs imageio-ffmpeg), webp or none; default auto: none for synthetic runs (full-size "
     "noise), else mp4 (webp where imageio-ffmpeg is not installed)"),
    ("--wan-gpus", "WAN_GPUS", "", _gpus, "spread the wan cases over GPUs, one worker pinned per GPU: all, a count or "
                                          "a comma list of device indices (tiny mode on a CPU: a count of CPU workers)"),
    ("--wan-gpus-timeout", "WAN_GPUS_TIMEOUT", "", _seconds,
     "seconds the --wan-gpus workers may run in all (default: no limit)"),
    ("--wan-residency", "WAN_RESIDENCY", "auto", _one_of(RESIDENCIES),
     "what stays on the GPU: auto (default: the fastest that fits), resident, offload-text-encoder, "
     "offload-idle-expert or stream-expert (experts in pinned host memory, streamed block by block)"),
    ("--wan-memory-cap", "WAN_MEMORY_CAP", "", _memory_cap,
     "cap the CUDA allocator at SIZE to emulate a smaller card's memory (not its speed), e.g. 24GB (GB = 10^9 "
     "bytes) or 16GiB (GiB = 2^30 bytes); residency, VAE bands and the default matrix plan for the cap"),
    ("--wan-vae-bands", "WAN_VAE_BANDS", "1", _vae_bands,
     "run the VAE in N bands of rows one after another, as ComfyUI's tiled VAE nodes (less memory; default 1: the "
     "whole frame)"),
    ("--wan-sp", "WAN_SP", "1", _integer(1),
     "sequence parallel: rerun the session as N torchrun ranks (NCCL, one per GPU); every case runs on one GPU and "
     "split over N (Ulysses), with speed-up and scaling efficiency"),
    ("--wan-comfyui", "WAN_COMFYUI_URL", "", _optional,
     "run --wan-workflow's matrix on this ComfyUI server (http://HOST:PORT) instead of the in-process pipeline"),
    ("--wan-comfyui-rounds", "WAN_COMFYUI_ROUNDS", "warm", _one_of(("warm", "cold")),
     "ComfyUI rounds: warm (default: a new noise seed each round, as a user's next generation) or cold (POST /free "
     "before each: models unloaded, cache dropped)"),
    ("--wan-comfyui-timeout", "WAN_COMFYUI_TIMEOUT", "600", _seconds,
     "seconds without an event from the ComfyUI server before a round counts as hung and is interrupted "
     "(default 600; 0: no limit)"),
)

ROUNDS_ENV = "WAN_ROUNDS"


def add_options(parser) -> None:
    group = parser.getgroup("wan-bench", "Wan 2.2 i2v benchmark suite")
    for option, env, default, kind, help_text in _OPTIONS:
        # a string default goes through `type` too: a bad environment value is the same usage error
        group.addoption(option, default=os.environ.get(env, default), type=kind, metavar="VALUE",
                        help=f"{help_text} [env: {env}]")
    group.addoption("--wan-shard", default=None, metavar="FILE",
                    help="run only the node ids listed in FILE (how --wan-gpus hands each worker its cases)")
    group.addoption("--wan-progress", default=None, metavar="FILE",
                    help="append each test's outcome to FILE as a JSON line (how a --wan-gpus worker reports back)")


def rounds_arguments(environ=os.environ) -> list[str]:
    """$WAN_ROUNDS as pytest-benchmark's option, placed before the user's arguments so that theirs win."""
    value = environ.get(ROUNDS_ENV, "").strip()
    return [f"--benchmark-min-rounds={value}"] if value else []


# ---------------------------------------------------------------------------------------------------- parsed once


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
    memory_cap: int | None = None  # bytes; None: the whole card
    lora_rounding: str = "comfyui"
    gpus: str | None = None
    gpus_timeout: float | None = None
    benchmark_only: bool = False  # pytest-benchmark's --benchmark-only: a benchmark run, not a test run
    comfyui: str | None = None  # a ComfyUI server's URL: the backend of every case
    comfyui_rounds: str = "warm"
    comfyui_timeout: float | None = 600.0  # None: no limit


OPTIONS_KEY = pytest.StashKey[WanOptions]()


def wan_options(config) -> WanOptions:
    """The session's options, built from the parsed command line on first use and kept in `config.stash`."""
    if OPTIONS_KEY not in config.stash:
        get = config.getoption
        config.stash[OPTIONS_KEY] = WanOptions(
            mode=get("wan_mode"), models_dir=get("wan_models"), presets=get("wan_preset") or (),
            budgets=get("wan_budgets"), out=get("wan_out"), attention=get("wan_attention") or ("sdpa",),
            precision=get("wan_precision") or ("auto",), compile=get("wan_compile"),
            rounds=get("benchmark_min_rounds", 5), warmup=get("wan_warmup"), workflow=get("wan_workflow"),
            video=get("wan_video"), sequence_parallel=get("wan_sp"), residency=get("wan_residency"),
            vae_bands=get("wan_vae_bands"), memory_cap=get("wan_memory_cap"), lora_rounding=get("wan_lora_rounding"),
            gpus=get("wan_gpus"), gpus_timeout=get("wan_gpus_timeout"), benchmark_only=bool(get("benchmark_only", False)),
            comfyui=get("wan_comfyui"), comfyui_rounds=get("wan_comfyui_rounds"),
            comfyui_timeout=get("wan_comfyui_timeout"))
    return config.stash[OPTIONS_KEY]


def clip_format(video: str, mode: str) -> str | None:
    """The container a case's clip is written in, or None for no clip. Synthetic weights make full-size noise that
    shows nothing: 49 frames of 832x1216 took 11.8 s to write as webp (41 MB) on a 2-core CPU. `auto` writes mp4
    where imageio-ffmpeg is installed and webp (Pillow) where it is not: a missing encoder is no reason for a case
    to fail; `--wan-video mp4` asks for mp4 and says what is missing."""
    if video == "auto":
        from wan_pipeline.measure.media import mp4_writable

        return None if mode == "synthetic" else ("mp4" if mp4_writable() else "webp")
    return None if video == "none" else video


def quality_metrics_wanted(mode: str) -> bool:
    """Clip metrics are computed for real weights and for tiny runs (cheap, they exercise the code); synthetic
    weights are random, so their full-size clip's metrics would be meaningless numbers."""
    return mode != "synthetic"

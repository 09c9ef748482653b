"""The wan-bench pytest options (each with an environment variable) and `read_options`, which turns them into one
`WanOptions` or a usage error naming the option.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from wan_pipeline.plan.config import ATTENTION_BACKENDS, LORA_ROUNDINGS, MODES, PRECISIONS, RESIDENCIES

_OPTIONS = (
    # (option, env var, help)
    ("--wan-mode", "WAN_MODE", f"model source: auto (default), {', '.join(MODES)}"),
    ("--wan-models", "WAN_MODELS_DIR", "ComfyUI models folder or diffusers folder (real mode)"),
    ("--wan-preset", "WAN_PRESET", "comma-separated presets (default: the matrix that fits the hardware)"),
    ("--wan-budgets", "WAN_BUDGETS", "budgets TOML (default: the budgets.toml shipped in wan_pipeline/plan)"),
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
    from wan_pipeline.plan.config import ConfigError, compile_values

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

"""Plan: everything about a run that follows from its configuration alone, before any model is loaded.

Sigmas and timesteps per pass, latent shape, token count, model forwards, the latent hand-over between passes,
and (tiny mode) the reduced geometry the run actually uses. Pure functions; the plan JSON keys are stable.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from wan_pipeline.plan import schedule
from wan_pipeline.plan.config import PassConfig, RunConfig

VAE_SPATIAL = 8
VAE_TEMPORAL = 4
PATCH = (1, 2, 2)
LATENT_CHANNELS = 16

# Tiny mode runs every preset at a reduced geometry so a CPU finishes a whole generation in seconds.
TINY_SPATIAL_DIVISOR = 16
TINY_LATENT_FRAME_DIVISOR = 8


@dataclass(frozen=True)
class PassPlan:
    config: PassConfig
    sigmas: tuple[float, ...]  # the sigmas the pass visits, first to last inclusive
    timesteps: tuple[float, ...]  # model timestep at each sigma the model is called at
    forwards: int

    @property
    def steps_run(self) -> int:
        return max(len(self.sigmas) - 1, 0)


@dataclass(frozen=True)
class Plan:
    config: RunConfig
    mode: str
    width: int
    height: int
    frames: int
    latent_frames: int
    latent_shape: tuple[int, int, int, int, int]
    tokens: int
    passes: tuple[PassPlan, ...]
    handover_scales: tuple[float, ...]
    scaled_from: tuple[int, int, int] | None = None  # tiny mode: the preset's own width, height, frames

    @property
    def forwards(self) -> int:
        return sum(p.forwards for p in self.passes)

    @property
    def handover_scale(self) -> float | None:
        return self.handover_scales[0] if self.handover_scales else None

    def to_json(self) -> dict:
        return {
            "preset": self.config.name,
            "width": self.width,
            "height": self.height,
            "frames": self.frames,
            "latent_frames": self.latent_frames,
            "latent_shape": list(self.latent_shape),
            "tokens": self.tokens,
            "fps": self.config.fps,
            "seed": self.config.seed,
            "mode": self.mode,
            "forwards": self.forwards,
            "handover_scale": self.handover_scale,
            "handover_scales": list(self.handover_scales),
            "scaled_from": list(self.scaled_from) if self.scaled_from else None,
            "attention": self.config.attention,
            "precision": self.config.precision,
            "compile": self.config.compile,
            "passes": [
                {
                    "expert": p.config.expert,
                    "model_file": p.config.model_file,
                    "lora_file": p.config.lora_file,
                    "lora_strength": p.config.lora_strength,
                    "shift": p.config.shift,
                    "steps": p.config.steps,
                    "start_step": p.config.start_at_step,
                    "end_step": p.config.end_at_step,
                    "add_noise": p.config.add_noise,
                    "return_leftover_noise": p.config.return_with_leftover_noise,
                    "cfg": p.config.cfg,
                    "sampler": p.config.sampler,
                    "scheduler": p.config.scheduler,
                    "sigmas": list(p.sigmas),
                    "timesteps": list(p.timesteps),
                    "forwards": p.forwards,
                }
                for p in self.passes
            ],
        }


def uses_cfg(cfg: float) -> bool:
    """ComfyUI skips the negative prompt entirely when cfg is 1.0 (math.isclose)."""
    return not math.isclose(cfg, 1.0)


def plan_pass(p: PassConfig) -> PassPlan:
    full = schedule.simple_sigmas(p.shift, p.steps)
    sigmas = schedule.slice_sigmas(full, p.start_at_step, p.end_at_step, p.return_with_leftover_noise)
    steps = max(len(sigmas) - 1, 0)
    calls = sigmas[:-1] if steps else sigmas[:0]
    return PassPlan(
        config=p,
        sigmas=tuple(float(s) for s in sigmas),
        timesteps=tuple(float(t) for t in schedule.model_timesteps(calls)),
        forwards=steps * (2 if uses_cfg(p.cfg) else 1),
    )


def warmup_plan(plan: Plan, steps_per_pass: int = 1) -> Plan:
    """The plan cut to its first `steps_per_pass` steps in each pass. A warm-up meets every model, shape and kernel
    of the run once (what compiling, autotuning and lazy init need) without the steps that only repeat them."""

    if steps_per_pass < 1:
        raise ValueError(f"a warm-up runs at least one step of each pass, got steps_per_pass={steps_per_pass}")

    def cut(p: PassPlan) -> PassPlan:
        if not p.steps_run:
            return p  # a pass that makes no step stays as it is
        steps = min(p.steps_run, steps_per_pass)
        return dataclasses.replace(p, sigmas=p.sigmas[:steps + 1], timesteps=p.timesteps[:steps],
                                   forwards=steps * (p.forwards // p.steps_run))

    return dataclasses.replace(plan, passes=tuple(cut(p) for p in plan.passes))


def latent_frames(length: int) -> int:
    return (length - 1) // VAE_TEMPORAL + 1


def token_count(width: int, height: int, length: int) -> int:
    return latent_frames(length) * (height // VAE_SPATIAL // PATCH[1]) * (width // VAE_SPATIAL // PATCH[2])


def tiny_geometry(width: int, height: int, length: int) -> tuple[int, int, int]:
    """The reduced geometry tiny mode uses: 1/16 of each side (multiple of 16, at least 32), 1/8 of the latent frames."""

    def side(x: int) -> int:
        return max(32, round(x / TINY_SPATIAL_DIVISOR / 16) * 16)

    lat = max(2, math.ceil(latent_frames(length) / TINY_LATENT_FRAME_DIVISOR))
    return side(width), side(height), (lat - 1) * VAE_TEMPORAL + 1


def make_plan(config: RunConfig, mode: str) -> Plan:
    config = config.validate()
    width, height, frames = config.width, config.height, config.length
    scaled_from = None
    if mode == "tiny":
        scaled_from = (width, height, frames)
        width, height, frames = tiny_geometry(width, height, frames)
    passes = tuple(plan_pass(p) for p in config.passes)
    scales = []
    for prev, nxt in zip(passes, passes[1:]):
        if prev.sigmas and nxt.sigmas:
            scales.append(schedule.handover_scale(prev.sigmas[-1], nxt.sigmas[0]))
        else:
            scales.append(1.0)  # a pass that makes no step hands its input latent on unchanged
    lat = latent_frames(frames)
    return Plan(
        config=config,
        mode=mode,
        width=width,
        height=height,
        frames=frames,
        latent_frames=lat,
        latent_shape=(config.batch_size, LATENT_CHANNELS, lat, height // VAE_SPATIAL, width // VAE_SPATIAL),
        tokens=token_count(width, height, frames),
        passes=passes,
        handover_scales=tuple(scales),
        scaled_from=scaled_from,
    )

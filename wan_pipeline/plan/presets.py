"""Named run configurations with stable names: tests, budgets and history key on them."""

from __future__ import annotations

import dataclasses

from wan_pipeline.plan.config import ConfigError, RunConfig, two_pass

# The users' variant: 832x1216 portrait, 4-step LoRA on both experts, split at 2, CFG 1.0, shift 5.0 / 6.0.
_SEED_PASSES = two_pass(shift_high=5.0, shift_low=6.0, steps=4, split=2, cfg=1.0, lora=True)
_SEED = RunConfig(name="seed-832x1216-49f", passes=_SEED_PASSES, width=832, height=1216, length=49, fps=16)


def _with_cfg(base: RunConfig, cfg: float, name: str) -> RunConfig:
    high, low = base.passes
    return base.replace(name=name, passes=(dataclasses.replace(high, cfg=cfg), dataclasses.replace(low, cfg=cfg)))


PRESETS: dict[str, RunConfig] = {
    c.name: c
    for c in (
        _SEED,
        _SEED.replace(name="seed-832x1216-81f", length=81),
        _SEED.replace(name="seed-832x1216-161f", length=161),
        _with_cfg(_SEED, 3.5, "seed-832x1216-49f-cfg3.5"),
        _with_cfg(_SEED, 7.0, "seed-832x1216-49f-cfg7.0"),
        RunConfig(
            name="template-640x640-81f-4step",
            passes=two_pass(shift_high=5.0, shift_low=5.0, steps=4, split=2, cfg=1.0, lora=True),
            width=640,
            height=640,
            length=81,
            fps=16,
        ),
        RunConfig(
            name="template-640x640-81f-20step",
            passes=two_pass(shift_high=5.0, shift_low=5.0, steps=20, split=10, cfg=3.5, lora=False),
            width=640,
            height=640,
            length=81,
            fps=16,
        ),
    )
}

# The matrix a run covers when nobody selects presets, cheapest first.
DEFAULT_MATRIX = (
    "seed-832x1216-49f",
    "seed-832x1216-49f-cfg3.5",
    "seed-832x1216-49f-cfg7.0",
    "seed-832x1216-81f",
    "template-640x640-81f-4step",
    "template-640x640-81f-20step",
    "seed-832x1216-161f",
)


def get_preset(name: str) -> RunConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None

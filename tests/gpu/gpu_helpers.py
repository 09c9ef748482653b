"""Shared by the GPU tier's tests."""

import torch


def tiny_models(device, preset="seed-832x1216-49f", **changes):
    """The tiny model set of `preset` built on `device` (bf16): the A14B classes at a size that runs in seconds."""
    from wan_pipeline.run.cache import ModelCache
    from wan_pipeline.plan.presets import get_preset

    cache = ModelCache(device=device)
    plan, prepared = cache.prepare(get_preset(preset).replace(**changes), "tiny")
    return cache, plan, prepared


"""Reference points for speed and numerics: stock diffusers' pipeline, and a single expert forward.

The stock `WanImageToVideoPipeline` runs on the very modules of the cached model set (same experts, VAE and
text encoder, bf16, diffusers' own attention and VAE forwards), so our pipeline's speed is reported as a ratio measured in the
same session. The expert forward is the unit the speed targets are stated in; its output is compared with the
bf16 SDPA output on the same inputs.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from wan_pipeline.plan.plan import Plan
from wan_pipeline.run.models import TEXT_CONTEXT, ModelSet

STOCK_BOUNDARY_RATIO = 0.9  # Wan 2.2 A14B's expert switch: timestep >= 900 runs the high-noise expert


class StockTokenizer:
    """The HF tokenizer call diffusers' pipeline makes, answered by the model set's own tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, prompts, padding="max_length", max_length=TEXT_CONTEXT, truncation=True, **_):
        rows = [self.tokenizer.tokenize(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
        ids = [(r.ids + [0] * max_length)[:max_length] for r in rows]
        mask = [(r.attention_mask + [0] * max_length)[:max_length] for r in rows]
        return SimpleNamespace(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))


def reset_stock_attention(models: ModelSet) -> None:
    """Back to diffusers' default attention backend (native SDPA) on every expert."""
    from wan_pipeline.run.attention import use_diffusers_default

    for expert in models.experts.values():
        use_diffusers_default(expert)


def stock_pipeline(models: ModelSet, plan: Plan):
    """diffusers' WanImageToVideoPipeline over the model set, euler with the first pass's shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    from wan_pipeline.run import vae_kernels

    vae_kernels.restore(models.vae)  # diffusers' own VAE modules, whatever our pipeline set on this model set
    if set(models.experts) != {"high", "low"}:
        raise ValueError("the stock pipeline needs both experts")
    reset_stock_attention(models)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=plan.passes[0].config.shift)
    return WanImageToVideoPipeline(
        tokenizer=StockTokenizer(models.tokenizer), text_encoder=models.text_encoder, vae=models.vae,
        scheduler=scheduler, transformer=models.experts["high"], transformer_2=models.experts["low"],
        boundary_ratio=STOCK_BOUNDARY_RATIO,
    )


def run_stock(pipe, plan: Plan, image: np.ndarray) -> np.ndarray:
    """One stock generation, text to frames; returns the pipeline's own float frames (synchronised). Nothing is
    added to what diffusers does: this is the timed function of the reference benchmark."""
    from PIL import Image

    steps = plan.passes[0].config.steps
    video = pipe(
        image=Image.fromarray(image), prompt=plan.config.prompt, negative_prompt=plan.config.negative_prompt,
        height=plan.height, width=plan.width, num_frames=plan.frames, num_inference_steps=steps,
        guidance_scale=plan.passes[0].config.cfg, generator=torch.Generator("cpu").manual_seed(plan.config.seed),
        output_type="np",
    ).frames[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return video


def forward_inputs(plan: Plan, models: ModelSet, seed: int = 0):
    """Deterministic inputs of one expert forward at the plan's shape (first step: timestep 1000)."""
    expert = next(iter(models.experts.values()))
    b, c, t, h, w = plan.latent_shape
    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((b, expert.config.in_channels, t, h, w), generator=g)
    context = torch.randn((b, TEXT_CONTEXT, expert.config.text_dim), generator=g) * 0.1
    timestep = torch.full((b,), float(plan.passes[0].timesteps[0]) if plan.passes[0].timesteps else 1000.0)
    return (x.to(models.device, models.dtype), timestep.to(models.device), context.to(models.device, models.dtype))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-30))

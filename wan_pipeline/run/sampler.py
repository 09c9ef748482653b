"""The two-pass sampler with ComfyUI's exact semantics (docs/comfyui.md, sections 3-8), k-diffusion style.

`sample_euler` is a short function over a sigma list; `run_pass` wraps it the way KSamplerAdvanced does: noise
from a CPU float32 generator seeded like ComfyUI, latent normalisation in/out, noise scaling at the start,
inverse noise scaling at the end. `denoiser` is ComfyUI's model wrapper for a flow (CONST) model with CFG.
"""

from __future__ import annotations

from typing import Callable

import torch

from wan_pipeline.plan.plan import PassPlan, uses_cfg

# Wan 2.1 latent normalisation (ComfyUI latent_formats.Wan21; the same numbers as AutoencoderKLWan's config).
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, len(WAN21_LATENTS_MEAN)) + (1,) * (x.ndim - 2)
    mean = torch.tensor(WAN21_LATENTS_MEAN, dtype=x.dtype, device=x.device).reshape(shape)
    std = torch.tensor(WAN21_LATENTS_STD, dtype=x.dtype, device=x.device).reshape(shape)
    return mean, std


def process_latent_in(latent: torch.Tensor) -> torch.Tensor:
    """VAE latent -> model space: (latent - mean) / std."""
    mean, std = _stats(latent)
    return (latent - mean) / std  # ComfyUI multiplies by the latent format's scale_factor, 1.0 for Wan


def process_latent_out(latent: torch.Tensor) -> torch.Tensor:
    """Model space -> VAE latent: latent * std + mean."""
    mean, std = _stats(latent)
    return latent * std + mean


def comfy_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """ComfyUI's prepare_noise: torch.manual_seed(seed), then randn in float32 on the CPU."""
    generator = torch.manual_seed(seed)
    return torch.randn(shape, dtype=torch.float32, generator=generator, device="cpu")


def sample_euler(denoise: Denoiser, x: torch.Tensor, sigmas: list[float],
                 callback: Callable[[int, float], None] | None = None) -> torch.Tensor:
    """k-diffusion's Euler (no churn): d = (x - denoised) / sigma; x += d * (sigma_next - sigma)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        d = (x - denoised) / sigma
        x = x + d * (sigma_next - sigma)
        if callback is not None:
            callback(i, sigma)
    return x


def run_pass(denoise: Denoiser, latent: torch.Tensor, plan: PassPlan, seed: int,
             callback: Callable[[int, float], None] | None = None) -> torch.Tensor:
    """One KSamplerAdvanced: VAE-space latent in, VAE-space latent out (float32, on the latent's device)."""
    if not plan.sigmas:
        return latent  # start at or past the last step: ComfyUI hands the input back untouched
    sigmas = torch.tensor(plan.sigmas, dtype=torch.float32)
    if plan.config.add_noise:
        noise = comfy_noise(tuple(latent.shape), seed).to(latent.device)
    else:
        noise = torch.zeros_like(latent)
    if torch.count_nonzero(latent) > 0:
        latent = process_latent_in(latent)
    sigma0, sigma_last = sigmas[0].to(latent.device), sigmas[-1].to(latent.device)
    x = sigma0 * noise + (1.0 - sigma0) * latent
    x = sample_euler(denoise, x, [float(s) for s in sigmas], callback)
    x = x / (1.0 - sigma_last)
    return process_latent_out(x)


def flow_denoiser(model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                  concat: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None,
                  cfg: float, dtype: torch.dtype) -> Denoiser:
    """ComfyUI's wrapper of a flow model: input cat(x, concat) in the model dtype, timestep sigma*1000,
    denoised = x - out*sigma in float32; CFG on the denoised values, the negative prompt skipped at cfg 1.0."""
    skip_uncond = not uses_cfg(cfg)
    if not skip_uncond and negative is None:
        raise ValueError("cfg != 1.0 needs the negative prompt's conditioning")

    concat = concat.to(dtype)  # constant over the pass: cast once, not at every forward

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        sigma_t = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)
        timestep = sigma_t * 1000.0
        inp = torch.cat([x.to(dtype), concat], dim=1)
        sigma_b = sigma_t.reshape((-1,) + (1,) * (x.ndim - 1))
        cond = x - model(inp, timestep, positive).float() * sigma_b
        if skip_uncond:
            return cond
        uncond = x - model(inp, timestep, negative).float() * sigma_b
        return uncond + (cond - uncond) * cfg

    return denoise

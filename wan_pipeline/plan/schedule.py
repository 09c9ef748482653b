"""ComfyUI's flow-matching sigma math, reproduced in float32 (docs/comfyui.md, sections 1-5).

Pure functions over numbers: the flow sigma table of ModelSamplingSD3 / ModelSamplingDiscreteFlow, the `simple`
scheduler, and KSamplerAdvanced's step slicing. ComfyUI computes these in torch float32; numpy float32 gives the
same bits for these element-wise operations.
"""

from __future__ import annotations

import numpy as np

TIMESTEPS = 1000
MULTIPLIER = 1000.0


def time_snr_shift(shift: float, t: np.ndarray) -> np.ndarray:
    """sigma(t) = shift*t / (1 + (shift-1)*t), in float32 like ComfyUI's `time_snr_shift`."""
    t = np.asarray(t, dtype=np.float32)
    if shift == 1.0:
        return t
    a = np.float32(shift)
    return (a * t / (np.float32(1.0) + (a - np.float32(1.0)) * t)).astype(np.float32)


def flow_sigma_table(shift: float, timesteps: int = TIMESTEPS, multiplier: float = MULTIPLIER) -> np.ndarray:
    """The 1000-entry sigma table ComfyUI builds for a flow model with the given shift (ascending)."""
    t = (np.arange(1, timesteps + 1, dtype=np.int64) / timesteps).astype(np.float32)
    t = (t * np.float32(multiplier)).astype(np.float32)  # ComfyUI passes timesteps (t*multiplier) ...
    return time_snr_shift(shift, (t / np.float32(multiplier)).astype(np.float32))  # ... and divides back


def simple_sigmas(shift: float, steps: int) -> np.ndarray:
    """ComfyUI's `simple` scheduler: `steps` evenly strided entries from the top of the table, then 0."""
    table = flow_sigma_table(shift)
    stride = len(table) / steps
    picked = [float(table[-(1 + int(x * stride))]) for x in range(steps)]
    return np.array(picked + [0.0], dtype=np.float32)


def slice_sigmas(
    sigmas: np.ndarray, start_at_step: int, end_at_step: int, return_with_leftover_noise: bool
) -> np.ndarray:
    """KSamplerAdvanced's slicing: cut at end (zeroing the last sigma unless leftover noise is returned), then start.

    Returns an empty array when the start lies at or past the last step: ComfyUI then returns its input latent
    unchanged and the pass makes no model call.
    """
    sigmas = np.array(sigmas, dtype=np.float32, copy=True)
    if end_at_step < len(sigmas) - 1:
        sigmas = sigmas[: end_at_step + 1].copy()
        if not return_with_leftover_noise:
            sigmas[-1] = 0.0
    if start_at_step < len(sigmas) - 1:
        return sigmas[start_at_step:]
    return np.zeros(0, dtype=np.float32)


def model_timesteps(sigmas: np.ndarray, multiplier: float = MULTIPLIER) -> np.ndarray:
    """The timestep the model sees for each sigma it is called at (sigma * 1000, float32)."""
    return (np.asarray(sigmas, dtype=np.float32) * np.float32(multiplier)).astype(np.float32)


def handover_scale(previous_last_sigma: float, next_first_sigma: float) -> float:
    """Factor from one pass's last Euler state to the next pass's starting state (docs/comfyui.md, section 5).

    A pass ends with inverse noise scaling x / (1 - sigma_last); the next starts with
    sigma0*noise + (1 - sigma0)*latent. With no new noise the next pass starts from
    (1 - sigma0_next) / (1 - sigma_last_prev) times the previous state: 0.857143 for shift 5 -> 6 at step 2,
    1.0 for equal shifts. New noise, if the next pass adds any, comes on top.
    """
    one = np.float32(1.0)
    return float((one - np.float32(next_first_sigma)) / (one - np.float32(previous_last_sigma)))

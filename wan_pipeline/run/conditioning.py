"""Conditioning: text through UMT5, the start image through the VAE (ComfyUI's WanImageToVideo), and decode.

Each function takes the ModelSet and tensors and returns tensors; nothing here times or places models.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from wan_pipeline.errors import WanBenchError
from wan_pipeline.measure.media import center_crop_box, read_image
from wan_pipeline.plan.plan import Plan
from wan_pipeline.run.memory import pinned_copy
from wan_pipeline.run.sampler import process_latent_in


def test_card(width: int = 832, height: int = 1216) -> np.ndarray:
    """A deterministic start image (gradients, rings and bars) for runs that name no image."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = width / 2, height / 2
    r = np.hypot(x - cx, y - cy) / max(width, height)
    img = np.stack([
        0.5 + 0.5 * np.sin(r * 40.0),
        x / max(width - 1, 1),
        y / max(height - 1, 1),
    ], axis=-1)
    bars = ((x // max(width // 8, 1)) % 2 == 0) & (y > height * 0.8)
    img[bars] = [0.9, 0.9, 0.2]
    return (img.clip(0, 1) * 255).astype(np.uint8)


def start_image(path: str | None, width: int, height: int) -> np.ndarray:
    """The run's start image as uint8 HxWx3 (the test card when the configuration names none)."""
    if path is None:
        return test_card(width, height)
    return read_image(path)


def upscale_center(image: np.ndarray, width: int, height: int) -> torch.Tensor:
    """ComfyUI's common_upscale(..., "bilinear", "center") of a uint8 image -> float32 [H, W, 3] in [0, 1]."""
    src_h, src_w = image.shape[:2]
    x, y, w, h = center_crop_box(src_w, src_h, width, height)
    t = torch.from_numpy(np.ascontiguousarray(image[y:y + h, x:x + w, :3])).float().div(255.0)
    t = t.permute(2, 0, 1).unsqueeze(0)
    t = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)
    return t[0].permute(1, 2, 0)


@torch.no_grad()
def encode_text(models, text: str) -> torch.Tensor:
    """UMT5 hidden states [1, L>=512, d_model] in the compute dtype, zeroed past the end token (as ComfyUI)."""
    tokens = models.tokenizer.tokenize(text)
    device = models.device
    input_ids = torch.tensor([tokens.ids], dtype=torch.long, device=device)
    attention_mask = torch.tensor([tokens.attention_mask], dtype=torch.long, device=device)
    hidden = models.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    hidden = hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)
    return hidden.to(models.dtype)


def _vae_dtype(vae) -> torch.dtype:
    return next(vae.parameters()).dtype


@torch.no_grad()
def image_conditioning(models, image01: torch.Tensor, plan: Plan, vae_bands=None) -> torch.Tensor:
    """WanImageToVideo: the start frame then 0.5 gray, VAE-encoded (mean), normalised, behind a 4-channel mask
    that is 1 on the first latent frame. Returns [B, 20, T_lat, H/8, W/8] float32. With `vae_bands`
    (vae_split.VaeBands) the VAE encodes bands of rows: one per sequence-parallel rank, or one after another."""
    frames, height, width = plan.frames, plan.height, plan.width
    vae = models.vae
    # [1, 3, T, H, W] in [-1, 1], built on the device: 0.5 gray is exactly 0 there, so only the start frame travels
    # (a 600 MB float32 video built on the host: on the 2 x H100 host image encode took 3.76 s with both ranks
    # building theirs at once, against 2.31 s for one process alone)
    x = torch.zeros((1, 3, frames, height, width), dtype=_vae_dtype(vae), device=models.device)
    x[0, :, 0] = (image01.to(models.device).permute(2, 0, 1) * 2.0 - 1.0).to(x.dtype)
    encode = lambda pixels: vae.encode(pixels).latent_dist.mode()  # noqa: E731
    latent = (vae_bands.encode(encode, x) if vae_bands else encode(x)).float()
    latent = process_latent_in(latent)
    b, _, t, h, w = plan.latent_shape
    if latent.shape[2:] != (t, h, w):
        raise WanBenchError(f"VAE returned a latent of shape {tuple(latent.shape)}, the plan expects "
                            f"{(t, h, w)} after the channels")
    mask = torch.zeros((1, 4, t, h, w), dtype=torch.float32, device=latent.device)
    mask[:, :, 0] = 1.0
    return torch.cat([mask, latent], dim=1).expand(b, -1, -1, -1, -1).contiguous()


@torch.no_grad()
def to_uint8_frames(pixels01: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 as ComfyUI's SaveVideo / SaveImage write them: ``x * 255`` clamped, then truncated
    toward zero by the uint8 cast (not rounded: 0.999 * 255 = 254.7 gives 254)."""
    return (pixels01 * 255.0).clamp(0, 255).to(torch.uint8)


def decode(models, latent: torch.Tensor, vae_bands=None) -> np.ndarray:
    """VAE latent [B, 16, T, h, w] -> uint8 frames [T', H, W, 3] of the first batch item (with `vae_bands`, in
    bands of rows)."""
    vae = models.vae
    z = latent[:1].to(models.device, _vae_dtype(vae))
    run = lambda part: vae.decode(part).sample  # noqa: E731  [1, 3, T', H, W] in [-1, 1]
    pixels = vae_bands.decode(run, z) if vae_bands else run(z)
    pixels = ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    frames = to_uint8_frames(pixels[0].permute(1, 2, 3, 0)).contiguous()
    return host_array(frames)


def host_array(t: torch.Tensor) -> np.ndarray:
    """A device tensor as an ordinary numpy array, staged through page-locked memory on a GPU (`pinned_copy`): a copy
    straight into pageable memory goes through the driver's small staging buffer at a fraction of the bus speed.
    torch's host allocator keeps the page-locked block (rounded up to a power of two) for the next call; the array
    returned owns pageable memory, so the rounds a benchmark keeps pin nothing."""
    if t.device.type != "cuda":
        return t.cpu().numpy()
    staged = pinned_copy(t)  # synchronous; a plain host copy where nothing can be pinned
    return staged.numpy().copy() if staged.is_pinned() else staged.numpy()

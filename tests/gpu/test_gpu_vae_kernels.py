"""vae_kernels on a GPU (channels-last convolutions, causal padding left to the convolution, bf16 nearest
upsampling, compiled RMS norm + SiLU) against diffusers' own modules on the same VAE, and restore."""

import pytest
import torch

from wan_pipeline.run import vae_kernels
from wan_pipeline.run.models import TINY_VAE, random_vae
from wan_pipeline.run.reference import cosine

pytestmark = pytest.mark.gpu


@pytest.fixture
def deterministic_cudnn(monkeypatch):
    """cuDNN's deterministic algorithms: the same convolution on the same layout gives the same bits."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


def _encode_decode(vae, clip):
    with torch.no_grad():
        latent = vae.encode(clip).latent_dist.mode()
        return latent, vae.decode(latent).sample


@pytest.mark.parametrize("fuse_norms, compiled", [(False, False), (True, False), (True, True)],
                         ids=["channels-last", "fused-norms-eager", "fused-norms-compiled"])
def test_gpu_vae_kernels_compute_what_diffusers_computes(cuda, deterministic_cudnn, fuse_norms, compiled):
    vae = random_vae(TINY_VAE, cuda, torch.bfloat16, seed=3)
    g = torch.Generator("cpu").manual_seed(0)
    clip = (torch.rand((1, 3, 9, 64, 96), generator=g) * 2 - 1).to(cuda, torch.bfloat16)
    stock_latent, stock_frames = _encode_decode(vae, clip)
    notes = vae_kernels.apply(vae, channels_last=True, fuse_norms=fuse_norms, compiled=compiled)
    assert "convolutions channels-last" in notes[0] and ("RMS norm fused" in notes[0]) is fuse_norms
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last_3d)
               for m in vae.modules() if isinstance(m, torch.nn.Conv3d))
    latent, frames = _encode_decode(vae, clip)
    assert latent.shape == stock_latent.shape and frames.shape == stock_frames.shape
    # bf16 activations: other convolution algorithms and one rounding instead of several, not other math
    assert cosine(latent, stock_latent) > 0.999 and cosine(frames, stock_frames) > 0.999
    vae_kernels.restore(vae)
    again_latent, again_frames = _encode_decode(vae, clip)
    assert torch.equal(again_latent, stock_latent) and torch.equal(again_frames, stock_frames)

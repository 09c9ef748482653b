"""The VAE's faster forwards compute what diffusers' modules compute, and `restore` gives the stock modules back
(the stock diffusers reference runs on the same VAE object)."""

import pytest
import torch

from wan_pipeline.run import vae_kernels
from wan_pipeline.run.models import TINY_VAE, random_vae


@pytest.fixture(scope="module")
def vae():
    return random_vae(TINY_VAE, torch.device("cpu"), torch.float32, seed=3)


@pytest.fixture(scope="module")
def clip():
    g = torch.Generator().manual_seed(0)
    return torch.rand((1, 3, 9, 32, 48), generator=g) * 2 - 1


def _encode_decode(vae, clip):
    with torch.no_grad():
        latent = vae.encode(clip).latent_dist.mode()
        return latent, vae.decode(latent).sample


@pytest.mark.parametrize("channels_last", [False, True])
def test_faster_forwards_compute_what_diffusers_computes_and_restore_gives_the_stock_modules_back(vae, clip,
                                                                                                   channels_last):
    stock_latent, stock_frames = _encode_decode(vae, clip)
    stock_keys = list(vae.state_dict())
    notes = vae_kernels.apply(vae, channels_last=channels_last, fuse_norms=True, compiled=False)
    assert "pad only time by hand" in notes[0] and "RMS norm fused with the SiLU" in notes[0]
    assert ("channels-last" in notes[0]) is channels_last
    assert list(vae.state_dict()) == stock_keys  # no module added or dropped
    assert not any(isinstance(m, torch.nn.SiLU) for m in vae.modules())  # every SiLU is inside a fused norm
    latent, frames = _encode_decode(vae, clip)
    torch.testing.assert_close(latent, stock_latent, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(frames, stock_frames, rtol=1e-4, atol=1e-5)

    vae_kernels.restore(vae)
    assert not any("forward" in m.__dict__ for m in vae.modules())
    assert any(isinstance(m, torch.nn.SiLU) for m in vae.modules())
    assert all(m.weight.is_contiguous() for m in vae.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
    latent, frames = _encode_decode(vae, clip)
    assert torch.equal(latent, stock_latent) and torch.equal(frames, stock_frames)


def test_applying_the_same_settings_twice_changes_nothing_and_other_settings_start_from_stock(vae):
    first = vae_kernels.apply(vae, channels_last=False, fuse_norms=True, compiled=False)
    patched = {name: m.__dict__.get("forward") for name, m in vae.named_modules()}
    assert vae_kernels.apply(vae, channels_last=False, fuse_norms=True, compiled=False) == first
    assert {name: m.__dict__.get("forward") for name, m in vae.named_modules()} == patched
    notes = vae_kernels.apply(vae, channels_last=False, fuse_norms=False, compiled=False)
    assert "RMS norm" not in notes[0]
    assert any(isinstance(m, torch.nn.SiLU) for m in vae.modules())
    assert not any("forward" in m.__dict__ for m in vae.modules() if type(m).__name__ == "WanRMS_norm")
    vae_kernels.restore(vae)


def test_only_norms_followed_by_silu_are_fused_and_restore_leaves_other_overrides_alone(vae):
    vae_kernels.apply(vae, channels_last=False, fuse_norms=True, compiled=False)
    norms = [m for m in vae.modules() if type(m).__name__ == "WanRMS_norm"]
    attention_norms = [m for m in norms if m.gamma.dim() == 3]  # images=True: the mid-block attention's 4-D norm
    assert attention_norms and not any("forward" in m.__dict__ for m in attention_norms)
    assert all("forward" in m.__dict__ for m in norms if m.gamma.dim() == 4)
    someone_elses = attention_norms[0]
    someone_elses.forward = lambda x: x  # e.g. a hook another library set on a module apply() left alone
    vae_kernels.restore(vae)
    assert "forward" in someone_elses.__dict__
    del someone_elses.forward


def test_fused_norm_in_bf16_rounds_once_where_diffusers_rounds_three_times(vae):
    norm = next(m for m in vae.modules() if type(m).__name__ == "WanRMS_norm")
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, norm.gamma.shape[0], 3, 5, 7), generator=g) * 3
    exact = torch.nn.functional.silu(norm(x))  # float32 throughout
    stock = torch.nn.functional.silu(norm.to(torch.bfloat16)(x.bfloat16())).float()
    fused = vae_kernels.rms_norm(x.bfloat16(), norm.gamma, norm.scale, norm.bias, silu=True).float()
    norm.float()
    assert (fused - exact).abs().max() <= (stock - exact).abs().max()
    torch.testing.assert_close(fused, exact, rtol=2 ** -8, atol=2 ** -8)


def test_the_stock_reference_gets_diffusers_vae_back():
    from types import SimpleNamespace

    from wan_pipeline.run import reference

    vae = random_vae(TINY_VAE, torch.device("cpu"), torch.float32, seed=4)
    vae_kernels.apply(vae, channels_last=False, fuse_norms=True, compiled=False)
    models = SimpleNamespace(experts={}, vae=vae)
    with pytest.raises(ValueError, match="both experts"):
        reference.stock_pipeline(models, plan=None)
    assert not any("forward" in m.__dict__ for m in vae.modules())

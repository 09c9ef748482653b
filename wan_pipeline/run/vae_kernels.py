"""The Wan VAE's memory-bound work cut down; the stock reference gets diffusers' own modules back.

On one H100 a 49-frame 832x1216 decode took 3.2 s of which the convolutions were the smaller part: cuDNN turned
NCDHW into NDHWC and back around every convolution, each RMS norm was six float32/bf16 passes over the
activations, then SiLU, then a zero-padded copy before each causal convolution. Here:

- convolution weights are kept channels-last, so cuDNN runs NDHWC end to end (the activations follow);
- a causal convolution pads only time by hand; its spatial zero padding is the convolution's own (the same
  values up to the convolution algorithm's rounding);
- nearest-neighbour upsampling runs in the activations' dtype (diffusers goes through float32; nearest copies
  values, so the result is the same);
- with `fuse_norms` (compile on), each RMS norm that diffusers follows with SiLU and that SiLU are one kernel
  (torch.compile, dynamic shapes), in float32 throughout with one rounding at the end. The mid-block attention's
  norm (4-D, at the lowest resolution) stays diffusers'.

Each change is set on the module instances and undone by `restore`, so the same VAE object can serve the stock
diffusers pipeline unchanged. The patched forwards are the diffusers modules' computations, rearranged.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

_PATCHED = "_wan_bench_vae_kernels"  # set on the VAE: what apply() changed
_STOCK_NONLINEARITY = "_wan_bench_stock_nonlinearity"
# module class -> the norms that diffusers follows with that module's `nonlinearity` (SiLU)
_NORMS_BEFORE_SILU = {"WanResidualBlock": ("norm1", "norm2"), "WanEncoder3d": ("norm_out",),
                      "WanDecoder3d": ("norm_out",)}


def rms_norm(x: torch.Tensor, gamma: torch.Tensor, scale: float, bias, silu: bool) -> torch.Tensor:
    """WanRMS_norm over the channel dimension (1), optionally followed by SiLU, computed in float32.
    `gamma` and a tensor `bias` hold one value per channel (any shape)."""
    per_channel = (1, -1) + (1,) * (x.dim() - 2)
    y = F.normalize(x.float(), dim=1) * scale * gamma.float().reshape(per_channel)
    if isinstance(bias, torch.Tensor):
        y = y + bias.float().reshape(per_channel)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


@functools.cache
def _compiled_rms_norm():
    return torch.compile(rms_norm, dynamic=True)


def _causal_conv_forward(conv: nn.Conv3d, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    """WanCausalConv3d.forward with the spatial zero padding left to the convolution."""
    pad_w, _, pad_h, _, pad_t, _ = conv._padding
    if cache_x is not None and pad_t > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        pad_t -= cache_x.shape[2]
    if pad_t > 0:
        x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
    return F.conv3d(x, conv.weight, conv.bias, conv.stride, (0, pad_h, pad_w), conv.dilation, conv.groups)


def _norm_silu_forward(norm: nn.Module, x: torch.Tensor, compiled: bool) -> torch.Tensor:
    fn = _compiled_rms_norm() if compiled else rms_norm
    # plain tensors, not Parameters: compile keeps parameter shapes static, which would pin the channel count
    bias = norm.bias.detach() if isinstance(norm.bias, torch.Tensor) else norm.bias
    return fn(x, norm.gamma.detach(), norm.scale, bias, True)


def apply(vae: nn.Module, *, channels_last: bool, fuse_norms: bool, compiled: bool = True) -> list[str]:
    """Speed up `vae` in place (undo with `restore`); a second call with the same settings changes nothing.
    Returns notes for the result record."""
    settings = {"channels_last": channels_last, "fuse_norms": fuse_norms, "compiled": compiled}
    state = vae.__dict__.get(_PATCHED)
    if state is not None and state["settings"] == settings:
        return state["notes"]
    restore(vae)
    forwards, silus, convs, done = [], [], [], []  # what restore() undoes, and only that

    def override(module: nn.Module, forward) -> None:
        module.forward = forward
        forwards.append(module)

    for module in vae.modules():
        kind = type(module).__name__
        if kind == "WanCausalConv3d" and hasattr(module, "_padding"):
            override(module, functools.partial(_causal_conv_forward, module))
        elif kind == "WanUpsample" and module.mode in ("nearest", "nearest-exact"):
            override(module, functools.partial(nn.Upsample.forward, module))  # without WanUpsample's float32 trip
    causal = sum(type(m).__name__ == "WanCausalConv3d" for m in forwards)
    if causal:
        done.append(f"{causal} causal convolutions pad only time by hand")
    if channels_last:
        for module in vae.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                fmt = torch.channels_last_3d if isinstance(module, nn.Conv3d) else torch.channels_last
                module.weight.data = module.weight.data.contiguous(memory_format=fmt)
                convs.append(module)
        done.append("convolutions channels-last")
    if fuse_norms:  # only the norms followed by SiLU: one compiled graph family (5-D, SiLU), few recompiles
        fused = 0
        for module in vae.modules():
            names = _NORMS_BEFORE_SILU.get(type(module).__name__, ())
            if names and isinstance(getattr(module, "nonlinearity", None), nn.SiLU):
                for name in names:
                    norm = getattr(module, name)
                    override(norm, functools.partial(_norm_silu_forward, norm, compiled=compiled))
                    fused += 1
                module.__dict__[_STOCK_NONLINEARITY] = module.nonlinearity  # kept, not registered as a child
                module.nonlinearity = nn.Identity()
                silus.append(module)
        done.append(f"RMS norm fused with the SiLU after it in {fused} places"
                    + (" (torch.compile)" if compiled else ""))
    notes = [f"VAE: {'; '.join(done)}"] if done else []
    vae.__dict__[_PATCHED] = {"settings": settings, "notes": notes, "forwards": forwards, "silus": silus,
                              "convs": convs}
    return notes


def restore(vae: nn.Module) -> None:
    """diffusers' own forwards, SiLU modules and contiguous weights back, on exactly the modules `apply` changed
    (no-op on an untouched VAE)."""
    state = vae.__dict__.pop(_PATCHED, None)
    if state is None:
        return
    for module in state["forwards"]:
        module.__dict__.pop("forward", None)
    for module in state["silus"]:
        module.nonlinearity = module.__dict__.pop(_STOCK_NONLINEARITY)
    for module in state["convs"]:
        module.weight.data = module.weight.data.contiguous()

"""Precision modes of the experts' linear layers: bf16/fp16, fp8 storage upcast per layer, fp8 matmul.

`fp8-scaled-mm` runs the transformer blocks' Linear layers the way ComfyUI runs fp8_scaled files on sm >= 8.9
(docs/comfyui.md, section 10): weight float8_e4m3fn with a per-tensor scale, input clamped to +-448 and cast to fp8 (or divided
by the file's `scale_input` when it has one), then `torch._scaled_mm` with float output in the compute dtype.
`fp8-scaled-mm-fast` is the same with `use_fast_accum=True`, the accumulation torchao's float8 inference uses:
Hopper's fp8 tensor cores accumulate in reduced precision between the periodic fp32 promotions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wan_pipeline.errors import WanBenchError
from wan_pipeline.plan.config import FP8_PRECISIONS

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def quantize_fp8(value: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``value / scale`` rounded to nearest float8_e4m3fn, saturating at +-448 (what ComfyUI stores)."""
    return (value.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_per_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_fp8, scale) with weight ~= weight_fp8.float() * scale, scale = amax / 448."""
    amax = weight.detach().abs().amax().float().clamp(min=1e-12)
    scale = (amax / FP8_MAX).reshape(())
    return quantize_fp8(weight, scale), scale


class Fp8Linear(nn.Module):
    """A Linear whose weight is stored in float8_e4m3fn with a per-tensor scale.

    matmul=False upcasts the weight to the compute dtype per call (fp8 storage, bf16 math);
    matmul=True multiplies in fp8 with torch._scaled_mm (Hopper/Ada fp8 tensor cores), fast_accum=True with the
    tensor cores' fast accumulation.
    """

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype, matmul: bool, input_scale: torch.Tensor | None = None,
                 fast_accum: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight_fp8.shape
        self.weight = nn.Parameter(weight_fp8, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale.float().reshape(()).to(weight_fp8.device))
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        if input_scale is not None:
            self.register_buffer("input_scale", input_scale.float().reshape(()).to(weight_fp8.device))
        else:
            self.input_scale = None
        self.compute_dtype = compute_dtype
        self.matmul = matmul
        self.fast_accum = fast_accum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.matmul:
            w = self.weight.to(self.compute_dtype) * self.weight_scale.to(self.compute_dtype)
            return F.linear(x.to(self.compute_dtype), w, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.input_scale is None:
            scale_a = torch.ones((), device=x.device, dtype=torch.float32)
            xq = x2.clamp(-FP8_MAX, FP8_MAX).to(FP8)
        else:
            scale_a = self.input_scale
            xq = quantize_fp8(x2, scale_a)
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=scale_a, scale_b=self.weight_scale, bias=self.bias,
                               out_dtype=self.compute_dtype, use_fast_accum=self.fast_accum)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        matmul = ("fp8 fast-accum" if self.fast_accum else "fp8") if self.matmul else "upcast"
        return f"in={self.in_features}, out={self.out_features}, matmul={matmul}"


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` is what ComfyUI does with the template's fp8_scaled files on this device: fp8 matmul on sm >= 8.9,
    fp8 storage upcast per layer on older GPUs, and plain float math on a CPU."""
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "bf16"
    return "fp8-scaled-mm" if torch.cuda.get_device_capability(device) >= (8, 9) else "fp8-upcast"


def check_fp8_matmul(device: torch.device, precision: str = "fp8-scaled-mm") -> None:
    if device.type != "cuda":
        raise WanBenchError(f"precision {precision} needs a CUDA GPU (torch._scaled_mm); this run is on the CPU")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise WanBenchError(
            f"precision {precision} needs compute capability 8.9+ (Ada/Hopper); "
            f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use fp8-upcast or bf16"
        )


def _swap_for_fp8(root: nn.Module, name: str, dtype: torch.dtype, matmul: bool, fast_accum: bool = False,
                  file_scale: torch.Tensor | None = None) -> None:
    """Replace `root`'s Linear `name` with an Fp8Linear. A weight already stored in fp8 with its file scale (an
    fp8_scaled file) keeps both; a weight loaded from an fp8 file into the compute dtype goes back to its file values
    with `file_scale` (dequantized then divided: the rounding is far below fp8's spacing); others are quantized per
    tensor."""
    linear = root.get_submodule(name)
    weight = linear.weight.data
    stored_scale = getattr(linear, "weight_scale", None)
    if weight.dtype == FP8 and stored_scale is not None:
        wq, scale = weight, stored_scale
    elif file_scale is not None:
        scale = file_scale.float().reshape(()).to(weight.device)
        wq = quantize_fp8(weight, scale)
    else:
        wq, scale = quantize_per_tensor(weight)
    bias = None if linear.bias is None else linear.bias.data
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr,
            Fp8Linear(wq, scale, bias, dtype, matmul, getattr(linear, "input_scale", None), fast_accum))


def apply_precision(transformer: nn.Module, precision: str, dtype: torch.dtype,
                    run_on: torch.device | None = None) -> list[str]:
    """Swap the transformer blocks' Linear layers for Fp8Linear when an fp8 mode is asked for.

    A weight already stored in fp8 (a real fp8_scaled file) keeps its file scale; others are quantized per tensor.
    `run_on` is the device the model will run on (it may be parked in CPU memory now). Returns notes for the
    result record.
    """
    if precision not in FP8_PRECISIONS:
        return []
    matmul = precision != "fp8-upcast"
    fast_accum = precision == "fp8-scaled-mm-fast"
    device = next(transformer.parameters()).device
    if matmul:
        check_fp8_matmul(run_on or device, precision)
    blocks = getattr(transformer, "blocks", None)
    if blocks is None:
        raise WanBenchError(f"precision {precision}: {type(transformer).__name__} has no transformer blocks")
    swapped = 0
    for block in blocks:
        for name in [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]:
            _swap_for_fp8(block, name, dtype, matmul, fast_accum)
            swapped += 1
    if device.type == "cuda":
        torch.cuda.empty_cache()
    kind = "fp8 storage upcast per layer"
    if matmul:
        kind = "fp8 x fp8 torch._scaled_mm" + (" with fast accumulation" if fast_accum else "")
    return [f"precision {precision}: {swapped} block Linear layers as {kind}"]


def store_text_encoder_fp8(text_encoder: nn.Module, dtype: torch.dtype,
                           file_scales: dict[str, torch.Tensor] | None = None) -> list[str]:
    """UMT5's block Linear layers in fp8 storage, upcast per layer: how ComfyUI runs umt5_xxl_fp8_e4m3fn_scaled, the
    text encoder of the Wan 2.2 templates. A weight loaded from an fp8 file goes back to its file values with its
    file scale; others are quantized per tensor (_swap_for_fp8).

    The feed-forward output projections (`wo`) stay in the compute dtype: transformers' UMT5 casts its hidden states
    to `wo`'s weight dtype, which would push activations through fp8.
    """
    names = [n for n, m in text_encoder.named_modules()
             if isinstance(m, nn.Linear) and ".block." in f".{n}" and not n.endswith(".wo")]
    for name in names:
        _swap_for_fp8(text_encoder, name, dtype, matmul=False, file_scale=(file_scales or {}).get(f"{name}.weight"))
    swapped = len(names)
    if swapped and next(text_encoder.parameters()).is_cuda:
        torch.cuda.empty_cache()
    return [f"text encoder: {swapped} block Linear layers in fp8 storage, upcast per layer (as ComfyUI runs "
            f"umt5_xxl_fp8_e4m3fn_scaled)"]

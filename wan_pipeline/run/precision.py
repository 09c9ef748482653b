"""Precision modes of the experts' linear layers: bf16/fp16, fp8 storage upcast per layer, fp8 matmul.

`fp8-upcast` / `fp8-upcast-fp16` keep the weights in float8_e4m3fn and multiply in bf16 / float16, the weight cast
to the compute dtype and scaled per call: what ComfyUI does with fp8_scaled files under UNETLoader's weight_dtype
"default" (float16 is its compute dtype for Wan on NVIDIA GPUs). `fp8-scaled-mm` / `fp8-scaled-mm-fp16` multiply
in fp8: input clamped to +-448 and cast to fp8 (or divided by the file's `scale_input`), then `torch._scaled_mm`
with output in the compute dtype, what ComfyUI does with weight_dtype `fp8_e4m3fn_fast` on sm >= 8.9.
`fp8-scaled-mm-fast` adds `use_fast_accum=True`, the accumulation torchao's float8 inference uses.

`stochastic_round_fp8` is ComfyUI's requantization of a LoRA-patched fp8 weight, rewritten from its behaviour:
float16 first, then each magnitude's fp8 mantissa rounded down or up with probability given by the remainder,
the random draws from a generator seeded per tensor name (`key_seed`), on the device the merge runs on.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from wan_pipeline.errors import WanBenchError
from wan_pipeline.plan.config import FP8_MATMUL_PRECISIONS, FP8_PRECISIONS

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


def key_seed(key: str) -> int:
    """The seed ComfyUI's patcher gives a weight's rounding: the CRC-32 of its name (``diffusion_model.`` + the
    original Wan name, e.g. ``diffusion_model.blocks.0.self_attn.q.weight``)."""
    return zlib.crc32(key.encode("latin-1"))


_E4M3_BIAS, _E4M3_MANTISSA, _E4M3_TOP = 7, 3, 15
_SR_SLICE_ELEMENTS = 4096 * 4096  # rows are rounded in slices of about this many elements, one draw per slice


def _stochastic_fp8_part(value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One slice: float16 arithmetic throughout, as the reference does (the sums and the draws are float16)."""
    x = value.to(torch.float16)
    mag = x.abs()
    sign = torch.where(mag == 0, 0, torch.sign(x))
    biased = torch.clamp(torch.floor(torch.log2(mag)) + _E4M3_BIAS, 0, _E4M3_TOP)  # 0: subnormal range
    normal = biased != 0
    steps = 2**_E4M3_MANTISSA
    # position inside the binade in units of one fp8 mantissa step, plus U[0, 1), floored: round up with
    # probability equal to the remainder
    frac = torch.where(normal, (mag / (2.0 ** (biased - _E4M3_BIAS)) - 1.0) * steps,
                       mag / (2.0 ** (-_E4M3_BIAS + 1 - _E4M3_MANTISSA)))
    frac = frac + torch.rand(frac.size(), dtype=frac.dtype, layout=frac.layout, device=frac.device,
                             generator=generator)
    mant = frac.floor() / steps
    out = sign * torch.where(normal, (2.0 ** (biased - _E4M3_BIAS)) * (1.0 + mant), (2.0 ** (-_E4M3_BIAS + 1)) * mant)
    return out.clamp(-FP8_MAX, FP8_MAX)


def stochastic_round_fp8(value: torch.Tensor, seed: int) -> torch.Tensor:
    """``value`` (float32) to float8_e4m3fn with ComfyUI's stochastic rounding (float16 cast first), on
    ``value``'s device: CPU and CUDA generators give different draws, so the merge runs where ComfyUI's does."""
    generator = torch.Generator(device=value.device)
    generator.manual_seed(seed)
    out = torch.empty_like(value, dtype=FP8)
    if value.dim() == 0:
        return _stochastic_fp8_part(value, generator).to(FP8)
    parts = max(1, value.numel() / _SR_SLICE_ELEMENTS)
    rows = max(1, round(value.shape[0] / parts))
    for i in range(0, value.shape[0], rows):
        out[i:i + rows].copy_(_stochastic_fp8_part(value[i:i + rows], generator))
    return out


class Fp8Linear(nn.Module):
    """A Linear whose weight is stored in float8_e4m3fn with a per-tensor scale.

    matmul=False upcasts the weight to the compute dtype per call (fp8 storage, bf16/fp16 math) and applies the
    scale where ComfyUI's scaled-fp8 Linear does: on the weight when it has fewer elements than the input, else on
    the input;
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
            x = x.to(self.compute_dtype)
            w = self.weight.to(self.compute_dtype)
            scale = self.weight_scale.to(self.compute_dtype)
            if w.numel() < x.numel():
                return F.linear(x, w * scale, self.bias)
            return F.linear(x * scale, w, self.bias)
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


def resolve_precision(requested: str, device: torch.device, *, weight_dtype: str = "default",
                      file_format: str = "fp8_scaled", fp8_matmul_file: bool = False) -> str:
    """`auto` is what ComfyUI 0.3.64 does with these files on this device (nodes.py UNETLoader, comfy/ops.py
    pick_operations, model_management.unet_dtype / unet_manual_cast):

    - on a CPU, float32 math (reported as `bf16`: tiny and CPU runs compute in float32 whatever the name);
    - on a GPU, Wan computes in float16 (its supported dtypes list float16 first, and every NVIDIA card it runs on
      passes should_use_fp16): an fp8 file is dequantized per layer and multiplied in float16 (`fp8-upcast-fp16`);
    - fp8 matmul (`fp8-scaled-mm-fp16`) only where fp8 compute exists (sm >= 8.9) and fp8 optimizations are on:
      weight_dtype `fp8_e4m3fn_fast`, or an fp8_scaled file whose `scaled_fp8` marker does not have two elements
      (`fp8_matmul_file`; the two-element marker is how a file asks for full-precision matmul);
    - a bf16/fp16/fp32 file with weight_dtype "default" runs in float16 (`fp16`).

    Synthetic and tiny runs stand for the template's fp8_scaled files with weight_dtype "default".
    """
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "bf16"
    fp8_compute = torch.cuda.get_device_capability(device) >= (8, 9)
    if file_format in ("bf16", "fp16", "fp32") and weight_dtype == "default":
        return "fp16"
    if fp8_compute and (weight_dtype == "fp8_e4m3fn_fast" or (fp8_matmul_file and file_format == "fp8_scaled")):
        return "fp8-scaled-mm-fp16"
    return "fp8-upcast-fp16"


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


def block_quantizer(precision: str, dtype: torch.dtype, run_on: torch.device):
    """The function that swaps one transformer block's Linear layers for Fp8Linear in `precision` (returns how many
    it swapped), or None when `precision` keeps the weights as they are. A block is swapped on the device it is on:
    a host build hands each block to it while the block is still on the device, so no full-precision copy of the
    expert ever has to sit in host memory."""
    if precision not in FP8_PRECISIONS:
        return None
    matmul = precision in FP8_MATMUL_PRECISIONS
    fast_accum = precision == "fp8-scaled-mm-fast"
    if matmul:
        check_fp8_matmul(run_on, precision)

    def quantize(block: nn.Module) -> int:
        names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        for name in names:
            _swap_for_fp8(block, name, dtype, matmul, fast_accum)
        return len(names)

    return quantize


def apply_precision(transformer: nn.Module, precision: str, dtype: torch.dtype,
                    run_on: torch.device | None = None, stage_on: torch.device | None = None) -> list[str]:
    """Swap the transformer blocks' Linear layers for Fp8Linear when an fp8 mode is asked for.

    A weight already stored in fp8 (a real fp8_scaled file) keeps its file scale; others are quantized per tensor.
    `run_on` is the device the model will run on (it may be parked in CPU memory now). `stage_on`: a model kept in
    host memory is quantized there one block at a time (the block comes to that device, is swapped, goes back to
    pinned host memory), so the values are those of an on-device quantization and the device holds one block.
    Blocks already swapped (a host build quantizes each block as it is built) are left as they are and counted.
    Returns notes for the result record.
    """
    if precision not in FP8_PRECISIONS:
        return []
    device = next(transformer.parameters()).device
    quantize = block_quantizer(precision, dtype, run_on or device)
    blocks = getattr(transformer, "blocks", None)
    if blocks is None:
        raise WanBenchError(f"precision {precision}: {type(transformer).__name__} has no transformer blocks")
    for block in blocks:
        if not any(isinstance(m, nn.Linear) for m in block.modules()):
            continue  # swapped already
        if stage_on is not None:
            block.to(stage_on)
        quantize(block)
        if stage_on is not None:
            from wan_pipeline.run.memory import to_host

            to_host(block)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    swapped = sum(isinstance(m, Fp8Linear) for m in blocks.modules())
    kind = "fp8 storage upcast per layer"
    if precision in FP8_MATMUL_PRECISIONS:
        kind = "fp8 x fp8 torch._scaled_mm" + (" with fast accumulation" if precision == "fp8-scaled-mm-fast" else "")
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

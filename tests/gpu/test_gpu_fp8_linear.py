"""precision.Fp8Linear's fp8 x fp8 `torch._scaled_mm` against the bf16 matmul of the same dequantized weight."""

import pytest
import torch
import torch.nn.functional as F

from wan_pipeline.errors import WanBenchError
from wan_pipeline.run.precision import FP8, FP8_MAX, Fp8Linear, check_fp8_matmul, quantize_per_tensor
from wan_pipeline.run.reference import cosine

pytestmark = pytest.mark.gpu


@pytest.fixture
def fp8_device(cuda):
    try:
        check_fp8_matmul(cuda)
    except WanBenchError as exc:
        pytest.skip(str(exc))
    return cuda


def _layer(device, out_features=1024, in_features=512, seed=0):
    g = torch.Generator("cpu").manual_seed(seed)
    weight = (torch.randn(out_features, in_features, generator=g) * in_features ** -0.5).to(device, torch.bfloat16)
    bias = (torch.randn(out_features, generator=g) * 0.1).to(device, torch.bfloat16)
    x = torch.randn(4, 64, in_features, generator=g).to(device, torch.bfloat16)
    return weight, bias, x


@pytest.mark.parametrize("fast_accum", [False, True])
def test_scaled_mm_linear_matches_the_dequantized_bf16_reference(fp8_device, fast_accum):
    weight, bias, x = _layer(fp8_device)
    wq, scale = quantize_per_tensor(weight)
    assert wq.dtype == FP8
    layer = Fp8Linear(wq, scale, bias, torch.bfloat16, matmul=True, fast_accum=fast_accum)
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (4, 64, 1024) and out.dtype == torch.bfloat16
    dequantized = wq.to(torch.bfloat16) * scale.to(torch.bfloat16)
    reference = F.linear(x, dequantized, bias)  # fp8 storage, bf16 math
    # fp8-upcast puts the scale where ComfyUI's scaled-fp8 Linear does: on the smaller of weight and input (here
    # the input, 131,072 elements against the weight's 524,288)
    assert wq.numel() > x.numel()
    upcast = Fp8Linear(wq, scale, bias, torch.bfloat16, matmul=False)(x)
    assert torch.equal(upcast, F.linear(x * scale.to(torch.bfloat16), wq.to(torch.bfloat16), bias))
    assert cosine(upcast, reference) > 0.99999
    # The fp8 matmul also rounds the activations to E4M3 (3 mantissa bits): close, not equal, to the reference.
    assert cosine(out, reference) > 0.998
    # Exactly the product of the quantized operands, accumulated wide and rounded once to bf16.
    xq = x.clamp(-FP8_MAX, FP8_MAX).to(FP8).float()
    exact = (xq @ (wq.float() * scale).t() + bias.float()).to(torch.bfloat16)
    torch.testing.assert_close(out, exact, rtol=2e-2, atol=2e-2)
    assert cosine(out, exact) > 0.99999


def test_scaled_mm_linear_with_the_files_input_scale(fp8_device):
    weight, bias, x = _layer(fp8_device, seed=1)
    x = x * 600  # beyond E4M3's range: a file's scale_input brings it back
    wq, scale = quantize_per_tensor(weight)
    input_scale = (x.abs().amax().float() / FP8_MAX).reshape(())
    layer = Fp8Linear(wq, scale, bias, torch.bfloat16, matmul=True, input_scale=input_scale)
    with torch.no_grad():
        out = layer(x)
    reference = F.linear(x, wq.to(torch.bfloat16) * scale.to(torch.bfloat16), bias)
    assert torch.isfinite(out).all() and cosine(out, reference) > 0.998

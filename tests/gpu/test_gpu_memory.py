"""The memory cap on a real device: the allocator refuses past the cap, host-built experts hold the on-device
build's values, staged fp8 quantization matches the on-device one, and streamed experts compute what resident ones
do while holding a fraction of them."""

import gc
import os
import subprocess
import sys

import pytest
import torch

from wan_pipeline.run.models import A14B_TRANSFORMER, random_transformer

pytestmark = pytest.mark.gpu

SMALL_A14B = dict(A14B_TRANSFORMER, num_layers=4)  # the A14B block, four of them


def _state(module):
    return {k: t.detach().cpu() for k, t in [*module.named_parameters(), *module.named_buffers()]}


def _tensors(module):
    return [t for _, t in [*module.named_parameters(), *module.named_buffers()]]


@pytest.fixture(autouse=True)
def _free_the_device(cuda):
    """Each test here builds experts of several GB: what one leaves (a failure keeps its locals) must not crowd the
    next one's measurements."""
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _assert_same(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype, (what, k, x.dtype, y.dtype)
        same = torch.equal(x.view(torch.uint8), y.view(torch.uint8)) if x.dtype == torch.float8_e4m3fn else \
            torch.equal(x, y)
        assert same, (what, k, x.dtype, (x.float() - y.float()).abs().max().item())


def test_a_capped_allocator_refuses_past_the_cap_and_a_cap_above_the_card_is_refused():
    code = (
        "import torch\n"
        "from wan_pipeline.run.memory import apply_memory_cap\n"
        "from wan_pipeline.plan.memory import MemoryCapError\n"
        "total = torch.cuda.get_device_properties(0).total_memory\n"
        "try:\n"
        "    apply_memory_cap(total + 1)\n"
        "    raise SystemExit('a cap above the card was accepted')\n"
        "except MemoryCapError as exc:\n"
        "    assert 'larger than GPU 0' in str(exc), exc\n"
        "info = apply_memory_cap(2 * 10**9)\n"
        "assert info['applied'] and abs(info['fraction'] - 2e9 / total) < 1e-6, info\n"
        "x = torch.empty(10**9, dtype=torch.uint8, device='cuda')\n"
        "try:\n"
        "    torch.empty(2 * 10**9, dtype=torch.uint8, device='cuda')\n"
        "    raise SystemExit('an allocation past the cap succeeded')\n"
        "except torch.OutOfMemoryError:\n"
        "    print('capped')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert out.returncode == 0 and "capped" in out.stdout, out.stderr


def test_a_host_built_expert_has_the_on_device_build_values(cuda):
    torch.cuda.synchronize(cuda)
    torch.cuda.reset_peak_memory_stats(cuda)
    base = torch.cuda.memory_allocated(cuda)  # what earlier tests of the session still hold
    hosted = random_transformer(SMALL_A14B, cuda, torch.bfloat16, seed=3, in_host=True)
    host_peak = torch.cuda.max_memory_allocated(cuda) - base
    assert all(t.device.type == "cpu" and t.is_pinned() for t in _state(hosted).values())
    plain = random_transformer(SMALL_A14B, cuda, torch.bfloat16, seed=3)
    a, b = _state(hosted), _state(plain)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    block = sum(t.numel() * t.element_size() for t in plain.blocks[0].parameters())
    assert host_peak < 2 * block  # the device held about one submodule at a time, never the expert


def test_staged_fp8_quantization_matches_the_on_device_one(cuda):
    from wan_pipeline.run.precision import apply_precision

    hosted = random_transformer(SMALL_A14B, cuda, torch.bfloat16, seed=4, in_host=True)
    plain = random_transformer(SMALL_A14B, cuda, torch.bfloat16, seed=4)
    _assert_same(_state(hosted), _state(plain), "before quantization")
    apply_precision(hosted, "fp8-upcast", torch.bfloat16, run_on=cuda, stage_on=cuda)
    apply_precision(plain, "fp8-upcast", torch.bfloat16, run_on=cuda)
    assert all(t.device.type == "cpu" for t in _tensors(hosted.blocks))  # staged back to the host, block by block
    _assert_same(_state(hosted), _state(plain), "after quantization")


def test_a_host_build_quantized_block_by_block_matches_the_on_device_build_quantized(cuda):
    """What a capped synthetic run builds: each block swapped to fp8 on the device as it is built, then moved to
    pinned host memory, bitwise the on-device build quantized afterwards. The device held one bf16 block and the
    float32 temporaries of quantizing its largest weight, well under the eight-block expert."""
    from wan_pipeline.run.precision import apply_precision, block_quantizer

    config = dict(A14B_TRANSFORMER, num_layers=8)
    torch.cuda.synchronize(cuda)
    torch.cuda.reset_peak_memory_stats(cuda)
    base = torch.cuda.memory_allocated(cuda)
    hosted = random_transformer(config, cuda, torch.bfloat16, seed=6, in_host=True,
                                quantize_block=block_quantizer("fp8-scaled-mm-fast", torch.bfloat16, cuda))
    host_peak = torch.cuda.max_memory_allocated(cuda) - base
    assert all(t.device.type == "cpu" and t.is_pinned() for t in _tensors(hosted))
    plain = random_transformer(config, cuda, torch.bfloat16, seed=6)
    block = sum(t.numel() * t.element_size() for t in plain.blocks[0].parameters())
    apply_precision(plain, "fp8-scaled-mm-fast", torch.bfloat16, run_on=cuda)
    _assert_same(_state(hosted), _state(plain), "quantized while building vs after")
    assert host_peak < 3 * block, (host_peak, block)


@torch.no_grad()
def test_a_streamed_expert_computes_what_the_resident_one_does_in_less_memory(cuda):
    from wan_pipeline.run.memory import enable_streaming, tensor_bytes

    expert = random_transformer(SMALL_A14B, cuda, torch.bfloat16, seed=5)
    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(1, 36, 2, 16, 16, generator=g).to(cuda, torch.bfloat16)
    context = torch.randn(1, 512, 4096, generator=g).to(cuda, torch.bfloat16)
    timestep = torch.tensor([900.0], device=cuda)

    def forward():
        return expert(hidden_states=x, timestep=timestep, encoder_hidden_states=context, return_dict=False)[0]

    resident = forward()
    weights = tensor_bytes(expert)
    info = enable_streaming(expert, cuda)  # pins the expert's tensors in host memory once, then hooks the blocks
    assert info["bytes_per_forward"] == weights and all(t.device.type == "cpu" for t in _tensors(expert))
    torch.cuda.synchronize(cuda)
    torch.cuda.reset_peak_memory_stats(cuda)
    base = torch.cuda.memory_allocated(cuda)
    streamed = forward()
    torch.cuda.synchronize(cuda)
    torch.testing.assert_close(streamed, resident, rtol=0, atol=0)  # the same kernels on the same values
    assert torch.cuda.max_memory_allocated(cuda) - base < weights * 0.75  # 4 blocks, two on the device at a time

"""Attention kernels: which implementation ran (from kernel names), refusals with reasons, auto, diffusers' backends
set through `set_attention_backend`, the router for the project's own kernels, and the FP8 attention's scaling
arithmetic (simulated on the CPU)."""

import pytest
import torch
import torch.nn.functional as F

from wan_pipeline.run import attention
from wan_pipeline.run.fp8_attention import FP8_E4M3_MAX, O_HEADROOM, SOFTMAX_SCALE, _quantize

# Kernel names as the profiler reported them on an H100 (torch 2.11, cuDNN 9.19).
CUDNN_FP8 = "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f8_knob_32_64x256x128_4x1x1_cga1x1x1_kernel0_0"
FP8_CAST = ("void at::native::vectorized_elementwise_kernel<4, at::native::float8_copy_kernel_cuda(at::Tensor"
            "IteratorBase&)::{lambda(c10::BFloat16)#1}, std::array<char*, 2ul> >")


@pytest.mark.parametrize("names, family", [
    (["Memset (Device)", CUDNN_FP8, FP8_CAST], "cudnn-fp8-attention"),
    (["cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_bf16_knob_7_64x128x128"], "cudnn-attention"),
    (["void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>"], "flash-attention-2"),
    (["_attn_fwd"], "sageattention (triton)"),
    (["aten::_scaled_dot_product_flash_attention_for_cpu"], "sdpa-cpu-flash"),
    (["void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<flash::CollectiveMainloopFwd"
      "Sm90<2, cute::tuple<cute::C<1>, cute::C<1>, cute::C<1> >, cute::tuple<cute::C<128>, cute::C<176>, "
      "cute::C<128> >, 128, cutlass::bfloat16_t, float, cutlass::arch::Sm90, false>>>>"], "flash-attention-3"),
    (["void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<flash::CollectiveMainloopFwd"
      "Sm90<2, cute::tuple<cute::C<1> >, 128, cutlass::float_e4m3_t, float, cutlass::arch::Sm90, false>>>>"],
     "flash-attention-3-fp8"),
    (["some_gemm"], "unknown (some_gemm)"),
])
def test_the_family_comes_from_the_kernels_that_ran(names, family):
    assert attention.classify_kernels(names) == family


@pytest.mark.parametrize("name, reason", [
    ("cudnn-fp8", "cudnn-fp8 needs a CUDA GPU; this run is on the CPU"),
    ("sdpa-cudnn", "needs a CUDA GPU; this run is on the CPU"),
    ("sage", "needs a CUDA GPU"),
    ("fa3", "needs a CUDA GPU"),
    ("fa3-fp8", "needs a CUDA GPU"),
])
def test_a_kernel_that_cannot_run_here_is_refused_with_its_reason(name, reason):
    assert reason in attention.availability(name, torch.device("cpu"))
    with pytest.raises(attention.AttentionUnavailable, match=f"attention backend '{name}' cannot run: .*{reason}"):
        attention.choose(name, tokens=64, heads=2, head_dim=16, device=torch.device("cpu"), dtype=torch.float32)


def test_fp8_attention_says_why_it_cannot_run_without_cuda(monkeypatch):
    from wan_pipeline.run import fp8_attention

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU box, also where this one has a GPU
    assert fp8_attention.available() == "CUDA is not available to torch (no GPU visible, or a CPU-only torch build)"


def test_fp8_attention_says_why_it_cannot_run_on_a_card_that_is_not_hopper(monkeypatch):
    from wan_pipeline.run import fp8_attention

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA L40S")
    assert fp8_attention.available() == "FP8 attention here targets Hopper (sm_90); cuda:0 is NVIDIA L40S (sm_89)"


def test_auto_times_what_runs_and_says_which_it_picked():
    kernel, choice = attention.choose("auto", tokens=256, heads=2, head_dim=16, device=torch.device("cpu"),
                                      dtype=torch.float32)
    assert set(choice.timings) == {"sdpa"}  # the GPU-only candidates are not candidates on a CPU
    assert choice.backend == kernel.name == "sdpa" and choice.kernel == "sdpa-cpu-flash"


def test_the_installed_kernel_is_what_the_transformer_calls():
    from wan_pipeline.run.models import TINY_TRANSFORMER, random_transformer

    model = random_transformer(TINY_TRANSFORMER, torch.device("cpu"), torch.float32, seed=0)
    calls = []

    def counting(q, k, v):
        calls.append(tuple(q.shape))
        return attention._sdpa_bhsd(q, k, v)

    count = attention.install(model, attention.AttentionKernel("counting", counting))
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, 1, 4, 4)
    with torch.no_grad():
        model(hidden_states=x, timestep=torch.tensor([500.0]),
              encoder_hidden_states=torch.randn(1, 8, cfg.text_dim), return_dict=False)
    assert count == 2 * cfg.num_layers and len(calls) == 2 * cfg.num_layers  # self- and cross-attention


def simulated_fp8_sdpa(q, k, v):
    """The FP8 attention's arithmetic on the CPU: E4M3 q/k/v with per-tensor scales, P quantized with
    SOFTMAX_SCALE, O written in E4M3 with scale_v / O_HEADROOM and dequantized (what the cuDNN graph is given)."""
    q8, _, dq = _quantize(q)
    k8, _, dk = _quantize(k)
    v8, sv, dv = _quantize(v)
    s = (q8.float() @ k8.float().transpose(-1, -2)) * dq * dk * q.shape[-1] ** -0.5
    p8 = (torch.softmax(s, dim=-1) * SOFTMAX_SCALE).to(torch.float8_e4m3fn)
    o = (p8.float() @ v8.float()) / SOFTMAX_SCALE * dv
    o8 = (o * sv / O_HEADROOM).to(torch.float8_e4m3fn)
    return o8.float() * dv * O_HEADROOM


@pytest.mark.parametrize("q_scale", [1.0, 4.0])
def test_the_fp8_scaling_keeps_attention_within_cosine_0_99(q_scale):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 512, 64) for _ in range(3))
    q = q * q_scale
    exact = F.scaled_dot_product_attention(q, k, v)
    approx = simulated_fp8_sdpa(q, k, v)
    cosine = F.cosine_similarity(exact.flatten(), approx.flatten(), dim=0).item()
    assert cosine > 0.99, cosine
    # |O| <= amax(V), so the O scale never saturates the E4M3 range
    assert (approx.abs().max() <= v.abs().max() * 1.07).item()


def test_quantize_maps_the_largest_value_to_the_top_of_e4m3():
    x = torch.tensor([[0.5, -2.0, 1.0]], dtype=torch.bfloat16)
    x8, scale, descale = _quantize(x)
    assert x8.dtype == torch.float8_e4m3fn and x8.float().abs().max().item() == FP8_E4M3_MAX
    assert scale.item() == pytest.approx(FP8_E4M3_MAX / 2.0) and (scale * descale).item() == pytest.approx(1.0)
    zeros8, zero_scale, _ = _quantize(torch.zeros(3, dtype=torch.bfloat16))
    assert torch.isfinite(zero_scale) and zeros8.float().eq(0).all()


def test_a_kernel_is_resolved_and_profiled_once_per_shape(monkeypatch):
    profiled = []
    real = attention.profile_kernel
    monkeypatch.setattr(attention, "profile_kernel", lambda *a: profiled.append(1) or real(*a))
    shape = dict(tokens=192, heads=2, head_dim=16, device=torch.device("cpu"), dtype=torch.float32)
    first = attention.choose("sdpa", **shape)
    assert attention.choose("sdpa", **shape) is first and len(profiled) == 1  # the next case of the matrix
    attention.choose("sdpa", **dict(shape, tokens=320))  # another shape is resolved again
    assert len(profiled) == 2


def test_cudnn_fp8_runs_fp8_over_long_key_sequences_and_bf16_sdpa_over_the_text(monkeypatch):
    from wan_pipeline.run import attention, fp8_attention

    calls = []
    monkeypatch.setattr(fp8_attention, "fp8_sdpa", lambda q, k, v: calls.append(k.shape[2]) or torch.zeros_like(q))
    attend = attention._cudnn_fp8()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1024, 2, 16, generator=g)
    text = [torch.randn(1, 512, 2, 16, generator=g) for _ in range(2)]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), text[0].transpose(1, 2), text[1].transpose(1, 2)).transpose(1, 2)
    assert torch.equal(attend(q, *text), expected) and calls == []  # cross-attention over 512 text tokens
    long_kv = torch.randn(1, attention.FP8_MIN_KV_TOKENS, 2, 16, generator=g)
    attend(q, long_kv, long_kv)
    assert calls == [attention.FP8_MIN_KV_TOKENS]
    attend(q[:, :64], q[:, :64], q[:, :64])  # self-attention stays FP8 however short
    assert calls == [attention.FP8_MIN_KV_TOKENS, 64]
    assert "notes" not in attention.KernelChoice("sdpa", "sdpa", "cudnn-attention", (), {}).to_json()
    choice = attention.KernelChoice("cudnn-fp8", "cudnn-fp8", "cudnn-fp8-attention", (), {})
    assert choice.to_json()["notes"] == [attention.FP8_SHORT_KV_NOTE]


def _tiny_expert():
    from wan_pipeline.run.models import TINY_TRANSFORMER, random_transformer

    return random_transformer(TINY_TRANSFORMER, torch.device("cpu"), torch.float32, seed=0)


def _forward(model):
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_channels, 1, 4, 4, generator=g)
    text = torch.randn(1, 8, cfg.text_dim, generator=g)
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text, return_dict=False)[0]


def test_diffusers_backends_are_set_through_set_attention_backend_and_own_kernels_through_the_router():
    from diffusers.models.attention_dispatch import AttentionBackendName

    model = _tiny_expert()
    processors = attention._processors(model)
    kernel, choice = attention.choose("sdpa-math", tokens=64, heads=2, head_dim=16, device=torch.device("cpu"),
                                      dtype=torch.float32)
    assert kernel.diffusers_backend == "_native_math" and choice.to_json()["via"] == "diffusers:_native_math"
    assert attention.install(model, kernel) == len(processors) == 2 * model.config.num_layers
    assert {p._attention_backend for p in processors} == {AttentionBackendName._NATIVE_MATH}
    by_diffusers = _forward(model)
    calls = []
    own = attention.AttentionKernel("own", lambda q, k, v: calls.append(1) or attention._sdpa_bhsd(q, k, v))
    attention.install(model, own)  # a project kernel after a diffusers backend, on the same modules
    assert torch.allclose(_forward(model), by_diffusers, atol=1e-5) and len(calls) == len(processors)
    attention.use_diffusers_default(model)  # and back, as the stock reference does
    assert {p._attention_backend for p in processors} == {AttentionBackendName.NATIVE}
    assert torch.allclose(_forward(model), by_diffusers, atol=1e-5) and len(calls) == len(processors)


@pytest.mark.parametrize("version, own", [("1.0.6", True), ("2.1.1", False), ("2.2.0+cu128", False)])
def test_sageattention_older_than_diffusers_minimum_runs_the_projects_own_call(monkeypatch, version, own):
    monkeypatch.setattr(attention.importlib.metadata, "version", lambda name: version)
    assert attention.own_sage() is own
    assert attention._diffusers_backend("sage") == (None if own else "sage")


def _pretend_hopper(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def test_fa3_says_why_it_cannot_run(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert "built for Hopper (sm_90); this card is sm_89" in attention.availability("fa3", cuda)
    _pretend_hopper(monkeypatch)
    real_find_spec = attention.importlib.util.find_spec
    monkeypatch.setattr(attention.importlib.util, "find_spec",
                        lambda name: None if name == "fa3_fwd_interface" else real_find_spec(name))
    assert "fa3-fwd is not installed (pip install fa3-fwd" in attention.availability("fa3-fp8", cuda)


def _fake_fa3(monkeypatch):
    """A stand-in `fa3_fwd_interface` that records what it was given and answers with SDPA (the routing and the
    per-head scales are what is checked here; the kernel itself is checked on a Hopper card in tests/gpu)."""
    import sys
    import types

    calls = []

    def _flash_attn_forward(q, k, v, q_descale=None, k_descale=None, v_descale=None, softmax_scale=None,
                            causal=False):
        calls.append((q.dtype, k.shape[1], None if q_descale is None else tuple(q_descale.shape)))
        if q.dtype == torch.float8_e4m3fn:
            q, k, v = (t.float() * d[:, None, :, None] for t, d in ((q, q_descale), (k, k_descale), (v, v_descale)))
        return attention._sdpa_bhsd(q, k, v).to(torch.bfloat16), None, None, None

    module = types.ModuleType("fa3_fwd_interface")
    module._flash_attn_forward = _flash_attn_forward
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", module)
    return calls


def test_fa3_fp8_quantizes_self_attention_per_head_and_runs_the_text_in_bf16(monkeypatch):
    calls = _fake_fa3(monkeypatch)
    attend = attention._fa3(fp8=True)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2304, 2, 16, generator=g, dtype=torch.bfloat16)
    text = torch.randn(1, 512, 2, 16, generator=g, dtype=torch.bfloat16)
    attend(q, text, text)
    assert calls == [(torch.bfloat16, 512, None)]  # cross-attention over the text
    out = attend(q, q, q)
    assert calls[-1] == (torch.float8_e4m3fn, 2304, (1, 2)) and out.dtype == torch.bfloat16
    cosine = F.cosine_similarity(out.float().flatten(), attention._sdpa_bhsd(q, q, q).float().flatten(), dim=0)
    assert cosine > 0.99


def test_per_head_quantization_maps_each_heads_largest_value_to_the_top_of_e4m3():
    x = torch.zeros(1, 3, 2, 4, dtype=torch.bfloat16)
    x[0, 1, 0, 2], x[0, 2, 1, 0] = -2.0, 0.25
    x8, descale = attention.quantize_per_head(x)
    assert x8.dtype == torch.float8_e4m3fn and descale.shape == (1, 2) and descale.dtype == torch.float32
    assert x8[0, 1, 0, 2].float().item() == -FP8_E4M3_MAX and x8[0, 2, 1, 0].float().item() == FP8_E4M3_MAX
    assert descale[0].tolist() == pytest.approx([2.0 / FP8_E4M3_MAX, 0.25 / FP8_E4M3_MAX])

"""Every attention backend that runs on this card against torch SDPA at a Wan shape (40 heads of 128), and the kernel
recorded for a run is the one a profiler sees."""

import pytest
import torch

from wan_pipeline.run import attention
from wan_pipeline.plan.config import ATTENTION_BACKENDS
from wan_pipeline.run.reference import cosine

pytestmark = pytest.mark.gpu

HEADS, HEAD_DIM = 40, 128  # the A14B experts
TOKENS = 4096  # self-attention at a small Wan latent; the 832x1216x49 run has 51,376
TEXT = 512  # cross-attention: the text tokens
# Cosine to bf16 SDPA on random inputs each backend must reach: bf16 kernels agree to rounding; sageattention 1.0.6
# quantizes Q and K to int8 (0.99991 measured at 51,376 tokens); cuDNN FP8 runs both matmuls in E4M3 (0.9982), as
# does FlashAttention-3's FP8 forward (per-head scales here).
MIN_COSINE = {"sage": 0.999, "cudnn-fp8": 0.995, "fa3-fp8": 0.995}
BACKENDS = [b for b in ATTENTION_BACKENDS if b != "auto"]
# The implementation the profiler must name for a backend that forces one (None: any; the default and the math
# backend are whatever torch picks or composes)
FAMILY = {"sdpa-flash": ("flash-attention-2",), "sdpa-cudnn": ("cudnn-attention",),
          "sdpa-efficient": ("mem-efficient-attention",), "sage": ("sageattention", "sageattention (triton)"),
          "flash-attn": ("flash-attention-2",), "cudnn-fp8": ("cudnn-fp8-attention",),
          "fa3": ("flash-attention-3",), "fa3-fp8": ("flash-attention-3-fp8",)}


def _runnable(name, device):
    reason = attention.availability(name, device)
    if reason:
        pytest.skip(f"{name} cannot run here: {reason}")


def _qkv(device, tokens, kv_tokens):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, tokens, HEADS, HEAD_DIM, generator=g, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(1, kv_tokens, HEADS, HEAD_DIM, generator=g, device=device, dtype=torch.bfloat16)
            for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("kv_tokens", [TOKENS, TEXT], ids=["self", "cross"])
def test_backend_agrees_with_sdpa_at_a_wan_shape(cuda, name, kv_tokens):
    _runnable(name, cuda)
    q, k, v = _qkv(cuda, TOKENS, kv_tokens)
    with torch.no_grad():
        expected = attention.attention_function("sdpa", cuda)(q, k, v)
        out = attention.attention_function(name, cuda)(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    similarity = cosine(out, expected)
    assert similarity >= MIN_COSINE.get(name, 0.9999), f"{name}: cosine {similarity:.6f} to bf16 SDPA"


def test_fp8_attention_runs_on_hopper_with_the_cudnn_frontend(cuda):
    import importlib.util

    from wan_pipeline.run.fp8_attention import available

    capability = torch.cuda.get_device_capability(cuda)
    if capability != (9, 0):
        pytest.skip(f"cuDNN FP8 attention targets Hopper (sm_90); this card is sm_{capability[0]}{capability[1]}")
    if importlib.util.find_spec("cudnn") is None:
        pytest.skip("nvidia-cudnn-frontend is not installed (pip install nvidia-cudnn-frontend)")
    assert available(cuda) is None


@pytest.mark.parametrize("name", ["sdpa", *FAMILY])
def test_the_kernel_recorded_is_the_one_the_profiler_saw(cuda, name):
    _runnable(name, cuda)
    kernel, choice = attention.choose(name, tokens=TOKENS, heads=HEADS, head_dim=HEAD_DIM, device=cuda,
                                      dtype=torch.bfloat16)
    assert choice.backend == kernel.name == name and choice.kernel_names
    assert attention.classify_kernels(list(choice.kernel_names)) == choice.kernel
    assert not choice.kernel.startswith("unknown"), choice.kernel_names
    if name in FAMILY:
        assert choice.kernel in FAMILY[name], (choice.kernel, choice.kernel_names)
    # An independent profiler pass over the installed function names the same implementation.
    from torch.profiler import ProfilerActivity, profile

    q, k, v = attention.probe_tensors(TOKENS, HEADS, HEAD_DIM, cuda, torch.bfloat16)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        kernel(q, k, v)
        torch.cuda.synchronize(cuda)
    seen = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert attention.classify_kernels(seen) == choice.kernel, seen


def test_auto_times_every_backend_that_runs_here_and_records_the_fastest(cuda):
    kernel, choice = attention.choose("auto", tokens=TOKENS, heads=HEADS, head_dim=HEAD_DIM, device=cuda,
                                      dtype=torch.bfloat16)
    runnable = {n for n in attention.AUTO_CANDIDATES if attention.availability(n, cuda) is None}
    assert set(choice.timings) == runnable
    times = {n: t for n, t in choice.timings.items() if isinstance(t, float)}
    assert choice.backend == kernel.name == min(times, key=times.get)
    assert not choice.kernel.startswith("unknown"), choice.kernel_names


@pytest.mark.parametrize("name", ["cudnn-fp8", "fa3", "fa3-fp8", "sdpa-cudnn"])
def test_a_compiled_expert_runs_the_backend_in_one_graph_and_agrees_with_sdpa(cuda, name):
    """The project's own kernels are custom operators: regional compile with fullgraph=True must trace through them
    (no graph break) and give the eager forward's output."""
    _runnable(name, cuda)
    from wan_pipeline.run.models import TINY_TRANSFORMER, random_transformer

    torch._dynamo.reset()
    model = random_transformer(dict(TINY_TRANSFORMER, attention_head_dim=HEAD_DIM, num_layers=1), cuda,
                               torch.bfloat16, seed=0)
    cfg = model.config
    g = torch.Generator(device=cuda).manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, cfg.in_channels, 2, 32, 32, generator=g, device=cuda,
                                            dtype=torch.bfloat16),
                  timestep=torch.tensor([500.0], device=cuda),
                  encoder_hidden_states=torch.randn(1, TEXT, cfg.text_dim, generator=g, device=cuda,
                                                    dtype=torch.bfloat16), return_dict=False)
    with torch.no_grad():
        attention.install(model, attention.kernel_for("sdpa", cuda, torch.bfloat16))
        expected = model(**inputs)[0]
        attention.install(model, attention.kernel_for(name, cuda, torch.bfloat16))
        eager = model(**inputs)[0]
        model.compile_repeated_blocks(fullgraph=True)
        compiled = model(**inputs)[0]
    assert cosine(eager, expected) >= MIN_COSINE.get(name, 0.9999), (name, cosine(eager, expected))
    assert cosine(compiled, eager) >= 0.999, (name, cosine(compiled, eager))

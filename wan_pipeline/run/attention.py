"""Attention kernels for the experts, and proof of which one actually ran.

Each backend is a function over (batch, tokens, heads, head_dim) tensors, installed into diffusers' Wan attention
processors. A backend that cannot run here (not installed, wrong card) is an error with the reason, never a silent
fallback; `auto` times the ones that run at the run's shape and picks the fastest. The kernel that executed is
read from a one-off profiler pass (GPU kernel names), not from the flag.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from wan_pipeline.errors import WanBenchError

_SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}


class AttentionUnavailable(WanBenchError):
    """The asked-for attention kernel cannot run on this machine; the message says why."""


def _sdpa(backend: SDPBackend | None) -> Callable:
    def attend(q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if backend is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2)

    return attend


def _sage() -> Callable:
    from sageattention import sageattn

    def attend(q, k, v):
        return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)

    return attend


def _flash_attn() -> Callable:
    from flash_attn import flash_attn_func

    def attend(q, k, v):
        return flash_attn_func(q, k, v)

    return attend


# cudnn-fp8: cross-attention over fewer key/value tokens than this (the experts' 512 text tokens) runs torch SDPA in
# bf16: there the FP8 kernel's work is small and quantizing the 51k-token query costs more than it saves (H100:
# 3.63 ms in FP8 against 0.92 ms). Self-attention always runs FP8, however short.
FP8_MIN_KV_TOKENS = 2048
FP8_SHORT_KV_NOTE = (f"cross-attention over fewer than {FP8_MIN_KV_TOKENS} key tokens (the text) runs torch SDPA in "
                     f"bf16")


def _cudnn_fp8() -> Callable:
    from wan_pipeline.run import fp8_attention

    short_kv = _sdpa(None)

    def attend(q, k, v):  # diffusers' [batch, tokens, heads, head_dim] viewed as [batch, heads, tokens, head_dim]
        if k.shape[1] < min(q.shape[1], FP8_MIN_KV_TOKENS):  # cross-attention over a short text
            return short_kv(q, k, v)
        return fp8_attention.fp8_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    return attend


def availability(name: str, device: torch.device) -> str | None:
    """None when `name` can run on `device`, else the reason it cannot."""
    if name in ("sdpa", "sdpa-math"):
        return None
    if device.type != "cuda":
        return f"{name} needs a CUDA GPU; this run is on the CPU"
    major, _ = torch.cuda.get_device_capability(device)
    if name == "sdpa-cudnn" and not torch.backends.cudnn.is_available():
        return "cuDNN is not available to torch"
    if name == "sage":
        if importlib.util.find_spec("sageattention") is None:
            return "sageattention is not installed (pip install sageattention)"
        if major < 8:
            return f"sageattention needs compute capability 8.0+, this card is {major}.x"
    if name == "flash-attn" and importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    if name == "cudnn-fp8":
        from wan_pipeline.run.fp8_attention import available

        return available(device)
    if name == "sdpa-flash" and major < 8:
        return f"FlashAttention-2 needs compute capability 8.0+, this card is {major}.x"
    return None


def attention_function(name: str, device: torch.device) -> Callable:
    reason = availability(name, device)
    if reason:
        raise AttentionUnavailable(f"attention backend {name!r} cannot run: {reason}")
    if name == "sdpa":
        return _sdpa(None)
    if name in _SDPA_BACKENDS:
        return _sdpa(_SDPA_BACKENDS[name])
    if name == "sage":
        return _sage()
    if name == "flash-attn":
        return _flash_attn()
    if name == "cudnn-fp8":
        return _cudnn_fp8()
    raise AttentionUnavailable(f"unknown attention backend {name!r}")


@dataclass(frozen=True)
class AttentionKernel:
    """What diffusers' processor receives as its `backend`: our kernel function and its name."""

    name: str
    fn: Callable

    def __call__(self, query, key, value, attn_mask=None, **_ignored):
        if attn_mask is not None:
            raise WanBenchError(f"attention backend {self.name}: an attention mask is not supported")
        return self.fn(query, key, value)


def _route_dispatch() -> None:
    """Let diffusers' Wan processors call an AttentionKernel given as their backend (others pass through)."""
    from diffusers.models.transformers import transformer_wan

    original = transformer_wan.dispatch_attention_fn
    if getattr(original, "_wan_bench_router", False):
        return

    def dispatch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
        if isinstance(backend, AttentionKernel):
            return backend(query, key, value, attn_mask=attn_mask)
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa, attention_kwargs=attention_kwargs, backend=backend,
                        parallel_config=parallel_config)

    dispatch._wan_bench_router = True
    transformer_wan.dispatch_attention_fn = dispatch


def install(transformer: torch.nn.Module, kernel: AttentionKernel) -> int:
    """Point every Wan attention processor of `transformer` at `kernel`; returns how many were set."""
    _route_dispatch()
    count = 0
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            processor._attention_backend = kernel
            count += 1
    if count == 0:
        raise WanBenchError(f"{type(transformer).__name__} has no Wan attention processors to set")
    return count


# GPU kernel name fragments -> what they are (first match wins).
_KERNEL_FAMILIES = (
    ("flash_fprop_wgmma_f8", "cudnn-fp8-attention"),  # cuDNN's fused FP8 SDPA (sm90)
    ("sage", "sageattention"),
    ("_attn_fwd", "sageattention (triton)"),
    ("qk_int8", "sageattention"),
    ("cudnn", "cudnn-attention"),
    ("flash_fwd", "flash-attention-2"),
    ("flash::", "flash-attention-2"),
    ("pytorch_flash", "flash-attention-2"),
    ("fmha", "mem-efficient-attention"),
    ("efficient_attention", "mem-efficient-attention"),
    ("_scaled_dot_product_flash_attention_for_cpu", "sdpa-cpu-flash"),
    ("_scaled_dot_product_attention_math", "sdpa-math"),
    ("bmm", "sdpa-math"),
)


def classify_kernels(names: list[str]) -> str:
    """Name the attention implementation from the kernels a profiled call launched."""
    lowered = [n.lower() for n in names]
    for fragment, family in _KERNEL_FAMILIES:
        if any(fragment.lower() in n for n in lowered):
            return family
    return "unknown (" + ", ".join(sorted(set(names))[:3]) + ")"


def profile_kernel(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[str, list[str]]:
    """Run one attention call under torch.profiler; return the family and the kernel names it launched."""
    from torch.profiler import ProfilerActivity, profile

    fn(q, k, v)  # warm-up: Triton autotuning and lazy init stay out of the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if q.is_cuda else [])
    with profile(activities=activities) as prof:
        fn(q, k, v)
        if q.is_cuda:
            torch.cuda.synchronize(q.device)
    events = prof.events()
    if q.is_cuda:
        names = [e.name for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    else:
        names = [e.name for e in events if e.name.startswith("aten::_scaled_dot") or e.name == "aten::bmm"]
    return classify_kernels(names), sorted(set(names))


def probe_tensors(tokens: int, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype, batch: int = 1):
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(batch, tokens, heads, head_dim, generator=g, device=device, dtype=dtype) for _ in range(3)]


def time_call(fn: Callable, q, k, v, repeats: int = 3) -> float:
    fn(q, k, v)
    if q.is_cuda:
        torch.cuda.synchronize(q.device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(q, k, v)
    if q.is_cuda:
        torch.cuda.synchronize(q.device)
    return (time.perf_counter() - start) / repeats


AUTO_CANDIDATES = ("sdpa", "sdpa-cudnn", "sdpa-flash", "sage", "flash-attn", "cudnn-fp8")


@dataclass(frozen=True)
class KernelChoice:
    requested: str
    backend: str
    kernel: str  # what the profiler saw run
    kernel_names: tuple[str, ...]
    timings: dict  # auto: seconds per candidate at the probe shape

    @property
    def notes(self) -> list[str]:
        return [FP8_SHORT_KV_NOTE] if self.backend == "cudnn-fp8" else []

    def to_json(self) -> dict:
        record = {"requested": self.requested, "backend": self.backend, "kernel": self.kernel,
                  "kernel_names": list(self.kernel_names), "auto_timings": self.timings}
        if self.notes:  # only where there is something to say: an absent key is no setting change for compare
            record["notes"] = self.notes
        return record


_CHOSEN: dict[tuple, tuple[AttentionKernel, KernelChoice]] = {}


def choose(requested: str, *, tokens: int, heads: int, head_dim: int, device: torch.device,
           dtype: torch.dtype) -> tuple[AttentionKernel, KernelChoice]:
    """Resolve `requested` (or auto) to a kernel that runs here, and profile which implementation executes.

    Once per request and shape in a process: the answer does not change between the cases of a matrix, and each
    resolution allocates three full-size probe tensors and runs a profiler pass (auto times every candidate)."""
    key = (requested, tokens, heads, head_dim, str(device), dtype)
    if key not in _CHOSEN:
        _CHOSEN[key] = _resolve(requested, tokens=tokens, heads=heads, head_dim=head_dim, device=device, dtype=dtype)
    return _CHOSEN[key]


def _resolve(requested: str, *, tokens: int, heads: int, head_dim: int, device: torch.device,
             dtype: torch.dtype) -> tuple[AttentionKernel, KernelChoice]:
    probe_tokens = tokens if device.type == "cuda" else min(tokens, 4096)
    q, k, v = probe_tensors(probe_tokens, heads, head_dim, device, dtype)
    timings = {}
    if requested == "auto":
        for name in AUTO_CANDIDATES:
            if availability(name, device) is None:
                try:
                    timings[name] = time_call(attention_function(name, device), q, k, v)
                except Exception as exc:  # a kernel that fails at this shape is not a candidate
                    timings[name] = f"failed: {type(exc).__name__}: {exc}"[:200]
        runnable = {n: t for n, t in timings.items() if isinstance(t, float)}
        if not runnable:
            raise AttentionUnavailable(f"no attention backend runs here: {timings}")
        backend = min(runnable, key=runnable.get)
    else:
        backend = requested
    fn = attention_function(backend, device)
    try:
        family, names = profile_kernel(fn, q, k, v)
    except RuntimeError as exc:
        raise AttentionUnavailable(f"attention backend {backend!r} failed at {probe_tokens} tokens x {heads} heads "
                                   f"x {head_dim} ({dtype}): {exc}") from exc
    del q, k, v
    return AttentionKernel(backend, fn), KernelChoice(requested, backend, family, tuple(names), timings)

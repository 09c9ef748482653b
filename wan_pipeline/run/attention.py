"""Attention kernels for the experts, and proof of which one actually ran.

Backends diffusers implements (torch SDPA and its forced kernels, flash-attn 2, sageattention 2.1+) are set
through diffusers' own `set_attention_backend`. The project keeps its own only what diffusers lacks: cuDNN's FP8
SDPA (`cudnn-fp8`), FlashAttention-3 from the forward-only `fa3-fwd` wheel (`fa3`, `fa3-fp8`; diffusers' FA3
backend imports another module name), and sageattention 1.x (diffusers needs 2.1.1+). Those reach diffusers' Wan
processors through a pass-through router on the Wan module's dispatch function, installed only when one of them is
used. A backend that cannot run here (not installed, wrong card) is an error with the reason, never a silent
fallback; `auto` times the ones that run at the run's shape and picks the fastest. The kernel that executed is read
from a one-off profiler pass (GPU kernel names), not from the flag.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F

from wan_pipeline.errors import WanBenchError

# Our names -> diffusers' attention backends (`diffusers.models.attention_dispatch.AttentionBackendName` values).
DIFFUSERS_BACKENDS = {
    "sdpa": "native",
    "sdpa-flash": "_native_flash",
    "sdpa-cudnn": "_native_cudnn",
    "sdpa-efficient": "_native_efficient",
    "sdpa-math": "_native_math",
    "flash-attn": "flash",
    "sage": "sage",  # with sageattention >= 2.1.1; older releases run the project's own call
}
DIFFUSERS_SAGE_MINIMUM = (2, 1, 1)  # diffusers 0.42's `sage` backend refuses anything older
DIFFUSERS_FLASH_MINIMUM = (2, 6, 3)  # and its `flash` backend flash-attn older than this


class AttentionUnavailable(WanBenchError):
    """The asked-for attention kernel cannot run on this machine; the message says why."""


def _version(package: str) -> tuple[int, ...] | None:
    try:
        text = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def own_sage() -> bool:
    """sageattention older than diffusers' minimum (1.x, common beside ComfyUI) runs through our own call."""
    version = _version("sageattention")
    return version is not None and version < DIFFUSERS_SAGE_MINIMUM


def _diffusers_backend(name: str) -> str | None:
    """The diffusers backend that runs `name`, or None where the project's own function does."""
    if name == "sage" and own_sage():
        return None
    return DIFFUSERS_BACKENDS.get(name)


# ------------------------------------------------------------------------------------------- the project's own


def _sdpa_bhsd(q, k, v):
    """torch SDPA over diffusers' [batch, tokens, heads, head_dim] layout."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _sage() -> Callable:
    from sageattention import sageattn

    def attend(q, k, v):
        return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)

    return attend


# fp8 backends: cross-attention over fewer key/value tokens than this (the experts' 512 text tokens) runs a bf16
# kernel: there the FP8 kernel's work is small and quantizing the 51k-token query costs more than it saves (H100:
# 3.63 ms in FP8 against 0.92 ms). Self-attention always runs FP8, however short.
FP8_MIN_KV_TOKENS = 2048
SHORT_KV_NOTES = {
    "cudnn-fp8": f"cross-attention over fewer than {FP8_MIN_KV_TOKENS} key tokens (the text) runs torch SDPA in bf16",
    "fa3-fp8": f"cross-attention over fewer than {FP8_MIN_KV_TOKENS} key tokens (the text) runs FlashAttention-3 "
               f"in bf16",
}
FP8_SHORT_KV_NOTE = SHORT_KV_NOTES["cudnn-fp8"]


def _short_kv(q, k) -> bool:
    return k.shape[1] < min(q.shape[1], FP8_MIN_KV_TOKENS)


def _cudnn_fp8() -> Callable:
    from wan_pipeline.run import fp8_attention

    def attend(q, k, v):  # diffusers' [batch, tokens, heads, head_dim] viewed as [batch, heads, tokens, head_dim]
        if _short_kv(q, k):  # cross-attention over a short text
            return _sdpa_bhsd(q, k, v)
        return fp8_attention.fp8_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    return attend


def quantize_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, tokens, heads, head_dim] -> (float8_e4m3fn, descale [batch, heads] float32): one scale per head, the
    granularity FlashAttention-3's FP8 forward takes. Plain tensor code: under torch.compile it fuses with the norm
    and rotary embedding that produce x (the amax reduction rides on that pass, the scaled cast on the next)."""
    from wan_pipeline.run.fp8_attention import FP8_E4M3_MAX

    amax = x.abs().amax(dim=(1, 3)).float().clamp(min=1e-12)  # [batch, heads]
    scale = (FP8_E4M3_MAX / amax).to(x.dtype)  # the multiply runs in x's dtype: its descale is of this rounded scale
    x8 = (x * scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return x8, scale.float().reciprocal()


def _fa3(fp8: bool) -> Callable:
    from fa3_fwd_interface import _flash_attn_forward  # the custom op itself: torch.compile keeps the graph whole

    def bf16(q, k, v):
        return _flash_attn_forward(q, k, v, causal=False)[0]

    if not fp8:
        return bf16

    def attend(q, k, v):
        if _short_kv(q, k):
            return bf16(q, k, v)
        (q8, dq), (k8, dk), (v8, dv) = quantize_per_head(q), quantize_per_head(k), quantize_per_head(v)
        out = _flash_attn_forward(q8, k8, v8, q_descale=dq, k_descale=dk, v_descale=dv,
                                  softmax_scale=q.shape[-1] ** -0.5, causal=False)[0]
        return out.to(q.dtype)  # FA3's FP8 forward writes bf16

    return attend


_OWN = {"cudnn-fp8": _cudnn_fp8, "fa3": lambda: _fa3(False), "fa3-fp8": lambda: _fa3(True), "sage": _sage}


# ------------------------------------------------------------------------------------------- availability


@lru_cache(maxsize=None)
def _import_failure(module: str) -> str | None:
    """None when `module` imports, else why not (a wheel built for another torch fails here, not mid-run)."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a native extension that does not load (OSError, RuntimeError)
        return f"{type(exc).__name__}: {exc}"
    return None


def availability(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """None when `name` can run on `device` (and in `dtype`, where given), else the reason it cannot."""
    if name in ("sdpa", "sdpa-math"):
        return None
    if device.type != "cuda":
        return f"{name} needs a CUDA GPU; this run is on the CPU"
    major, minor = torch.cuda.get_device_capability(device)
    if name == "sdpa-cudnn" and not torch.backends.cudnn.is_available():
        return "cuDNN is not available to torch"
    if name == "sage":
        if importlib.util.find_spec("sageattention") is None:
            return "sageattention is not installed (pip install sageattention)"
        if major < 8:
            return f"sageattention needs compute capability 8.0+, this card is {major}.x"
    if name == "flash-attn":
        version = _version("flash-attn")
        if version is None:
            return "flash-attn is not installed"
        if version < DIFFUSERS_FLASH_MINIMUM:
            return (f"diffusers' flash backend needs flash-attn {'.'.join(map(str, DIFFUSERS_FLASH_MINIMUM))}+, "
                    f"found {'.'.join(map(str, version))}")
    if name in ("fa3", "fa3-fp8"):
        if (major, minor) != (9, 0):
            return f"FlashAttention-3 (fa3-fwd) is built for Hopper (sm_90); this card is sm_{major}{minor}"
        if importlib.util.find_spec("fa3_fwd_interface") is None:
            return "fa3-fwd is not installed (pip install fa3-fwd: FlashAttention-3's forward for sm_90)"
        failure = _import_failure("fa3_fwd_interface")
        if failure:
            return f"fa3-fwd is installed but does not load with torch {torch.__version__}: {failure}"
        if dtype is not None and dtype != torch.bfloat16:
            return f"fa3-fwd is built for bf16 only (its fp16 kernels are left out); this run computes in {dtype}"
    if name == "cudnn-fp8":
        from wan_pipeline.run.fp8_attention import available

        return available(device)
    if name == "sdpa-flash" and major < 8:
        return f"FlashAttention-2 needs compute capability 8.0+, this card is {major}.x"
    return None


# ------------------------------------------------------------------------------------------- the backend


@dataclass(frozen=True)
class AttentionKernel:
    """A resolved backend: its name, the diffusers backend that runs it (or None: `fn` is the project's own), and
    `fn` over [batch, tokens, heads, head_dim] tensors, which is what the model calls either way."""

    name: str
    fn: Callable
    diffusers_backend: str | None = None

    def __call__(self, query, key, value, attn_mask=None, **_ignored):
        if attn_mask is not None:
            raise WanBenchError(f"attention backend {self.name}: an attention mask is not supported")
        return self.fn(query, key, value)


def _through_diffusers(backend: str) -> Callable:
    """A call of diffusers' dispatch with `backend`: the probe and the profiler run the code the model runs."""
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    member = AttentionBackendName(backend)

    def attend(q, k, v):
        return dispatch_attention_fn(q, k, v, backend=member)

    return attend


def attention_function(name: str, device: torch.device, dtype: torch.dtype | None = None) -> Callable:
    return kernel_for(name, device, dtype).fn


def kernel_for(name: str, device: torch.device, dtype: torch.dtype | None = None) -> AttentionKernel:
    reason = availability(name, device, dtype)
    if reason:
        raise AttentionUnavailable(f"attention backend {name!r} cannot run: {reason}")
    backend = _diffusers_backend(name)
    if backend is not None:
        return AttentionKernel(name, _through_diffusers(backend), backend)
    if name in _OWN:
        return AttentionKernel(name, _OWN[name]())
    raise AttentionUnavailable(f"unknown attention backend {name!r}")


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


def _processors(transformer: torch.nn.Module) -> list:
    return [m.processor for m in transformer.modules()
            if getattr(m, "processor", None) is not None and hasattr(m.processor, "_attention_backend")]


@contextmanager
def _quiet_backend_warning():
    """diffusers warns that attention backends are experimental on every `set_attention_backend`: once per case
    and expert is noise in a benchmark's output."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def install(transformer: torch.nn.Module, kernel: AttentionKernel) -> int:
    """Point every attention processor of `transformer` at `kernel`: diffusers' `set_attention_backend` for its
    backends, the router for the project's own. Returns how many processors were set."""
    processors = _processors(transformer)
    if not processors:
        raise WanBenchError(f"{type(transformer).__name__} has no diffusers attention processors to set")
    if kernel.diffusers_backend is not None:
        with _quiet_backend_warning():
            transformer.set_attention_backend(kernel.diffusers_backend)
    else:
        _route_dispatch()
        for processor in processors:
            processor._attention_backend = kernel
    return len(processors)


def use_diffusers_default(transformer: torch.nn.Module) -> None:
    """Back to diffusers' default backend (native torch SDPA), set explicitly: `set_attention_backend` also sets
    diffusers' process-wide active backend, which a processor without a backend of its own would follow."""
    with _quiet_backend_warning():
        transformer.set_attention_backend(DIFFUSERS_BACKENDS["sdpa"])


# GPU kernel name fragments -> what they are (first match wins).
_KERNEL_FAMILIES = (
    ("flash_fprop_wgmma_f8", "cudnn-fp8-attention"),  # cuDNN's fused FP8 SDPA (sm90)
    (("flashattnfwdsm90", "e4m3"), "flash-attention-3-fp8"),  # FA3's sm90 forward, instantiated for float_e4m3_t
    ("flashattnfwdsm90", "flash-attention-3"),
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
    for fragments, family in _KERNEL_FAMILIES:
        fragments = (fragments,) if isinstance(fragments, str) else fragments
        if any(all(f.lower() in n for f in fragments) for n in lowered):
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


AUTO_CANDIDATES = ("sdpa", "sdpa-cudnn", "sdpa-flash", "sage", "flash-attn", "cudnn-fp8", "fa3", "fa3-fp8")


@dataclass(frozen=True)
class KernelChoice:
    requested: str
    backend: str
    kernel: str  # what the profiler saw run
    kernel_names: tuple[str, ...]
    timings: dict  # auto: seconds per candidate at the probe shape

    via: str = ""  # "diffusers:<backend>" or "wan-bench": whose code dispatched the kernel

    @property
    def notes(self) -> list[str]:
        return [SHORT_KV_NOTES[self.backend]] if self.backend in SHORT_KV_NOTES else []

    def to_json(self) -> dict:
        record = {"requested": self.requested, "backend": self.backend, "kernel": self.kernel,
                  "kernel_names": list(self.kernel_names), "auto_timings": self.timings}
        if self.via:
            record["via"] = self.via
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
            if availability(name, device, dtype) is None:
                try:
                    timings[name] = time_call(attention_function(name, device, dtype), q, k, v)
                except Exception as exc:  # a kernel that fails at this shape is not a candidate
                    timings[name] = f"failed: {type(exc).__name__}: {exc}"[:200]
        runnable = {n: t for n, t in timings.items() if isinstance(t, float)}
        if not runnable:
            raise AttentionUnavailable(f"no attention backend runs here: {timings}")
        backend = min(runnable, key=runnable.get)
    else:
        backend = requested
    kernel = kernel_for(backend, device, dtype)
    try:
        family, names = profile_kernel(kernel.fn, q, k, v)
    except RuntimeError as exc:
        raise AttentionUnavailable(f"attention backend {backend!r} failed at {probe_tokens} tokens x {heads} heads "
                                   f"x {head_dim} ({dtype}): {exc}") from exc
    del q, k, v
    via = f"diffusers:{kernel.diffusers_backend}" if kernel.diffusers_backend else "wan-bench"
    return kernel, KernelChoice(requested, backend, family, tuple(names), timings, via)

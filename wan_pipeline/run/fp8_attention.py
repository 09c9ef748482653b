"""FP8 attention on Hopper through cuDNN's fused FP8 SDPA forward (the `cudnn` frontend package).

Why: Hopper's tensor cores run FP8 (E4M3) matmuls at about twice the bf16 FLOP rate, and attention at Wan 2.2's
token counts (~51k tokens at 832x1216x49) is almost all QK^T and PV matmul work. cuDNN's `sdpa_fp8` node runs
both matmuls in FP8 inside one flash-attention kernel. Scaling follows FP8 Transformer Engine: one float32 scale
per tensor, `scale = 448 / amax` (448 = largest E4M3 value), the kernel is given the descale `1 / scale`.

What this module does per call (no host sync; every scale stays a device tensor):

1. quantize q, k, v (bf16) to float8_e4m3fn with their own per-tensor scale;
2. run the cached cuDNN graph: S = Q K^T * descale_q * descale_k * attn_scale, P = softmax(S) quantized with
   scale_s = 448 (P is in [0, 1]; 448 is the value the frontend documents for E4M3 without dropout and uses in
   its current-scaling sample), O = P V * descale_s * descale_v written as E4M3 with scale_o;
3. dequantize O to the input dtype.

Measured once on an H100 (cuDNN 9.19, torch 2.11; a script's printed output) at Wan's [1, 40, 51376, 128]: 68 ms a
call with quantization included (the kernel alone: 64-66 ms), against 95 ms for torch SDPA's cuDNN bf16 backend and
152 ms for its flash backend. A whole expert forward with it stays at cosine 0.99983 to bf16 SDPA (wan-bench's
forward benchmark).

On Hopper cuDNN only writes O in FP8 (bf16/fp16 O needs Blackwell and cuDNN 9.13+, see the frontend's
`sdpa_support_surface.h`), so O needs a scale chosen before the kernel runs. Softmax rows sum to 1, so every O
element is a convex combination of V elements and |O| <= amax(V): scale_o = scale_v / 2 can never overflow
(the 2x covers rounding of the FP8 P), and the dequantized O is `O_fp8 * 2 * descale_v`.

Only the core graph API of nvidia-cudnn-frontend is used (`cudnn.pygraph`, `sdpa_fp8`); `import cudnn` does not
need its optional nvidia-cutlass-dsl / apache-tvm-ffi / cuda-python dependencies. One caveat: without cuda-python
a graph must be given a handle (`cudnn.create_handle()`) -- the frontend's handle-less default reaches for
`cuda.bindings` -- so every graph here is built with an explicit per-device handle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from wan_pipeline.run.precision import FP8_MAX

FP8_E4M3_MAX = FP8_MAX  # largest finite float8_e4m3fn value
SOFTMAX_SCALE = FP8_E4M3_MAX  # P = softmax(S) lies in [0, 1]: 1 maps to the top of the E4M3 range
O_HEADROOM = 2.0  # scale_o = scale_v / O_HEADROOM, since |O| <= amax(V)
_AMAX_FLOOR = 1e-12  # an all-zero tensor gets a finite scale instead of 448 / 0

# The frontend's own gate for the FP8 SDPA forward (include/cudnn_frontend/node/sdpa_support_surface.h):
# cuDNN 9.1.0 or newer, and not 9.10.0 (disabled there for a known bug).
_MIN_BACKEND_VERSION = 90100
_BROKEN_BACKEND_VERSIONS = frozenset({91000})


def _import_cudnn():
    """The cuDNN frontend module, imported on first use (it loads libcudnn and its extension)."""
    import cudnn

    return cudnn


def available(device: torch.device | str | int | None = None) -> str | None:
    """None when `fp8_sdpa` can run on `device` (default: the current CUDA device), else the reason it cannot."""
    if not torch.cuda.is_available():
        return "CUDA is not available to torch (no GPU visible, or a CPU-only torch build)"
    if not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no float8_e4m3fn dtype (needs torch 2.1+)"
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    if device.type != "cuda":
        return f"FP8 attention runs on a CUDA GPU; {device} was asked for"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) != (9, 0):
        return (f"FP8 attention here targets Hopper (sm_90); cuda:{index} is "
                f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})")
    try:
        cudnn = _import_cudnn()
    except Exception as exc:  # ImportError, or a broken native extension (OSError, RuntimeError)
        return (f"the cuDNN frontend python package `cudnn` (nvidia-cudnn-frontend) cannot be imported: "
                f"{type(exc).__name__}: {exc}")
    try:
        version = cudnn.backend_version()
        version_string = cudnn.backend_version_string()
    except Exception as exc:  # the frontend found no libcudnn to load
        return f"the cuDNN frontend imported but could not reach the cuDNN library: {type(exc).__name__}: {exc}"
    if version < _MIN_BACKEND_VERSION:
        return f"cuDNN {version_string} is too old for the FP8 SDPA forward (needs 9.1.0 or newer)"
    if version in _BROKEN_BACKEND_VERSIONS:
        return f"cuDNN {version_string} has the FP8 SDPA forward disabled for a known bug; use another cuDNN"
    return None


@dataclass
class _CachedGraph:
    """One built cuDNN graph with the IR tensors that key its variant pack and the buffers it owns."""

    graph: Any
    tensors: dict  # role -> cudnn IR tensor (q, k, v, o, descale_q, ..., amax_o)
    workspace: torch.Tensor
    scale_s: torch.Tensor  # [1, 1, 1, 1] float32, SOFTMAX_SCALE
    descale_s: torch.Tensor  # [1, 1, 1, 1] float32, 1 / SOFTMAX_SCALE
    amax_s: torch.Tensor  # [1, 1, 1, 1] float32, written by the kernel (unused)
    amax_o: torch.Tensor  # [1, 1, 1, 1] float32, written by the kernel (unused)


_GRAPHS: dict[tuple, _CachedGraph] = {}
_HANDLES: dict[int, Any] = {}  # CUDA device index -> cudnn.Handle


def _handle(device_index: int):
    """This process's cuDNN handle for one GPU (cuDNN handles are bound to the device current at creation)."""
    handle = _HANDLES.get(device_index)
    if handle is None:
        with torch.cuda.device(device_index):
            handle = _HANDLES[device_index] = _import_cudnn().create_handle()
    return handle


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x as float8_e4m3fn, scale, descale) with scale = 448 / amax(|x|) as 0-dim float32 device tensors.

    Plain tensor code, so torch.compile fuses it into the projection before it. The multiply stays in x's dtype
    (a 0-dim scale does not promote it), so no float32 copy of x is made; amax * scale rounds to 448 at most.
    """
    amax = torch.linalg.vector_norm(x, ord=float("inf")).float()
    scale = FP8_E4M3_MAX / amax.clamp(min=_AMAX_FLOOR)
    x_fp8 = (x * scale).to(torch.float8_e4m3fn)
    if x_fp8.stride(-1) != 1:  # cuDNN needs head_dim innermost
        x_fp8 = x_fp8.contiguous()
    return x_fp8, scale, scale.reciprocal()


def _as_4d(scalar: torch.Tensor) -> torch.Tensor:
    return scalar.reshape(1, 1, 1, 1)


def _build(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, o8: torch.Tensor, attn_scale: float) -> _CachedGraph:
    """Build cuDNN's FP8 SDPA forward graph for these exact shapes/strides (validate -> plans -> build)."""
    cudnn = _import_cudnn()
    device = q8.device
    fp8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(name="wan_fp8_sdpa", io_data_type=fp8, intermediate_data_type=f32,
                          compute_data_type=f32, handle=_handle(device.index))

    def operand(name: str, t: torch.Tensor):
        return graph.tensor(name=name, dim=list(t.shape), stride=list(t.stride()), data_type=fp8)

    def scalar(name: str):
        return graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)

    t = {"q": operand("q", q8), "k": operand("k", k8), "v": operand("v", v8)}
    for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
        t[name] = scalar(name)
    o, _stats, amax_s, amax_o = graph.sdpa_fp8(
        q=t["q"], k=t["k"], v=t["v"],
        descale_q=t["descale_q"], descale_k=t["descale_k"], descale_v=t["descale_v"],
        descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
        generate_stats=False, attn_scale=attn_scale, name="sdpa_fp8")
    o.set_output(True).set_dim(list(o8.shape)).set_stride(list(o8.stride())).set_data_type(fp8)
    # Both amax outputs declared, as the frontend's FP8 tests and samples do (test/python/sdpa/fp8.py).
    for amax in (amax_s, amax_o):
        amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
    t.update(o=o, amax_s=amax_s, amax_o=amax_o)

    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()

    def f32_scalar(value: float) -> torch.Tensor:
        return torch.full((1, 1, 1, 1), value, dtype=torch.float32, device=device)

    return _CachedGraph(
        graph=graph, tensors=t,
        workspace=torch.empty(max(graph.get_workspace_size(), 1), dtype=torch.uint8, device=device),
        scale_s=f32_scalar(SOFTMAX_SCALE), descale_s=f32_scalar(1.0 / SOFTMAX_SCALE),
        amax_s=f32_scalar(0.0), amax_o=f32_scalar(0.0))


@torch.library.custom_op("wan_bench::cudnn_fp8_sdpa", mutates_args=())
def cudnn_fp8_sdpa(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                   descale_k: torch.Tensor, descale_v: torch.Tensor, scale_o: torch.Tensor,
                   attn_scale: float) -> torch.Tensor:
    """The cuDNN kernel alone, as a torch operator: torch.compile traces around it (the graph stays whole) and
    fuses the quantization before it and the dequantization after it. Returns O in E4M3 (scaled by scale_o)."""
    device = q8.device
    with torch.cuda.device(device):
        o8 = torch.empty_like(q8)  # q8 is dense, so O gets q's layout (BHSD or BSHD)
        key = (device.index, tuple(q8.shape), q8.stride(), tuple(k8.shape), k8.stride(),
               tuple(v8.shape), v8.stride(), o8.stride(), attn_scale)
        cached = _GRAPHS.get(key)
        if cached is None:
            cached = _GRAPHS[key] = _build(q8, k8, v8, o8, attn_scale)
        cudnn = _import_cudnn()
        handle = _handle(device.index)
        cudnn.set_stream(handle, torch.cuda.current_stream(device).cuda_stream)  # run on torch's stream
        t = cached.tensors
        variant_pack = {
            t["q"]: q8, t["k"]: k8, t["v"]: v8, t["o"]: o8,
            t["descale_q"]: _as_4d(descale_q), t["descale_k"]: _as_4d(descale_k),
            t["descale_v"]: _as_4d(descale_v), t["descale_s"]: cached.descale_s, t["scale_s"]: cached.scale_s,
            t["scale_o"]: _as_4d(scale_o), t["amax_s"]: cached.amax_s, t["amax_o"]: cached.amax_o,
        }
        cached.graph.execute(variant_pack, cached.workspace, handle=handle)
    return o8


@cudnn_fp8_sdpa.register_fake
def _cudnn_fp8_sdpa_shape(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, attn_scale):
    return torch.empty_like(q8)


def fp8_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v in FP8 on the tensor cores; inputs/outputs like F.scaled_dot_product_attention.

    q: [batch, heads, seq_q, head_dim], k/v: [batch, heads_kv, seq_kv, head_dim] (bf16 or fp16, CUDA, any dense
    or strided layout with head_dim innermost); non-causal, no mask, no dropout. `scale` defaults to
    1/sqrt(head_dim). Returns a tensor shaped like q in q's dtype. Call `available()` first for a reason
    instead of an exception.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"fp8_sdpa takes [batch, heads, seq, head_dim] tensors; got {q.shape}, {k.shape}, {v.shape}")
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"fp8_sdpa takes bf16 or fp16 q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_cuda or k.device != q.device or v.device != q.device:
        raise ValueError(f"fp8_sdpa takes q, k, v on one CUDA device; got {q.device}, {k.device}, {v.device}")
    if k.shape[2] != v.shape[2] or v.shape[-1] != q.shape[-1]:
        raise ValueError(f"fp8_sdpa needs k, v of one seq length and v's head_dim equal to q's; "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    attn_scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    q8, _, descale_q = _quantize(q)
    k8, _, descale_k = _quantize(k)
    v8, scale_v, descale_v = _quantize(v)
    o8 = cudnn_fp8_sdpa(q8, k8, v8, descale_q, descale_k, descale_v, scale_v / O_HEADROOM, attn_scale)
    return o8.to(q.dtype) * (descale_v * O_HEADROOM).to(q.dtype)

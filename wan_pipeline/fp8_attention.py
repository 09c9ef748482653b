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

Measured once on an H100 (cuDNN 9.19, torch 2.11) at Wan's [1, 40, 51376, 128]: 68 ms a call with quantization
included (~6 ms of it), against 95 ms for torch SDPA's cuDNN bf16 backend and 152 ms for its flash backend;
cosine similarity to the bf16 output 0.998.

On Hopper cuDNN only writes O in FP8 (bf16/fp16 O needs Blackwell and cuDNN 9.13+, see the frontend's
`sdpa_support_surface.h`), so O needs a scale chosen before the kernel runs. Softmax rows sum to 1, so every O
element is a convex combination of V elements and |O| <= amax(V): scale_o = scale_v / 2 can never overflow
(the 2x covers rounding of the FP8 P), and the dequantized O is `O_fp8 * 2 * descale_v`.

Only the core graph API of nvidia-cudnn-frontend is used (`cudnn.pygraph`, `sdpa_fp8`); `import cudnn` does not
need its optional nvidia-cutlass-dsl / apache-tvm-ffi / cuda-python dependencies. One caveat: without cuda-python
a graph must be given a handle (`cudnn.create_handle()`) -- the frontend's handle-less default reaches for
`cuda.bindings` -- so every graph here is built with an explicit per-device handle.

Plan autotuning: each graph asks cuDNN's heuristics (modes A, B and FALLBACK) for every execution plan they
offer and builds all of them (`get_execution_plan_count` / `build_plan_at_index`); the first real call of a shape
times each built plan on that call's own tensors (CUDA events, 1 warm-up + 3 runs; a plan that raises or whose
output disagrees with the default plan's is skipped), keeps the fastest (if it beats the default plan, the one
`build_plans()` would pick, by more than `AUTOTUNE_SWITCH_MARGIN`) and runs it with `execute_plan_at_index` from
then on, with the workspace sized for it. Only that first call synchronizes with the host. `AUTOTUNE_LOG` (keyed
like the graph cache) records, per shape, every plan's name, knobs, workspace and time and the one chosen, or why
no tuning happened. `AUTOTUNE = False` (or WAN_FP8_SDPA_AUTOTUNE=0) restores the plain heuristic choice;
`AUTOTUNE_KNOB_SWEEP = True` (or WAN_FP8_SDPA_KNOB_SWEEP=1) also appends, one knob at a time, every other value
of each engine's knobs (`get_knobs_for_engine` / `create_execution_plan`) to the candidates -- off by default,
since it makes the first call of a shape take seconds longer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
SOFTMAX_SCALE = FP8_E4M3_MAX  # P = softmax(S) lies in [0, 1]: 1 maps to the top of the E4M3 range
O_HEADROOM = 2.0  # scale_o = scale_v / O_HEADROOM, since |O| <= amax(V)
_AMAX_FLOOR = 1e-12  # an all-zero tensor gets a finite scale instead of 448 / 0

# The frontend's own gate for the FP8 SDPA forward (include/cudnn_frontend/node/sdpa_support_surface.h):
# cuDNN 9.1.0 or newer, and not 9.10.0 (disabled there for a known bug).
_MIN_BACKEND_VERSION = 90100
_BROKEN_BACKEND_VERSIONS = frozenset({91000})

# Plan autotuning (see the module docstring). Read at graph-build time, so a caller may flip them before first use.
AUTOTUNE = os.environ.get("WAN_FP8_SDPA_AUTOTUNE", "1") != "0"
AUTOTUNE_KNOB_SWEEP = os.environ.get("WAN_FP8_SDPA_KNOB_SWEEP", "0") == "1"
AUTOTUNE_HEURISTICS = ("A", "B", "FALLBACK")  # cudnn.heur_mode members asked for plans, in this order
AUTOTUNE_WARMUP, AUTOTUNE_RUNS = 1, 3  # per plan, on the first real call of a shape
AUTOTUNE_SWITCH_MARGIN = 0.005  # leave the default plan only for one at least 0.5% faster (timing noise)
AUTOTUNE_MIN_COSINE = 0.99  # a plan whose output strays further from the default plan's is skipped
_KNOB_SWEEP_MAX_VALUES = 64  # a knob with a wider range is not swept
_KNOB_SWEEP_MAX_PLANS = 96  # appended candidates at most, per graph
_PLAN_API = ("get_execution_plan_count", "build_plan_at_index", "execute_plan_at_index",
             "get_workspace_size_plan_at_index")

# key (as in _GRAPHS) -> what autotuning did for that shape: "status", "reason", "plans" (index -> name, source,
# knobs, workspace, ms or error), "default_index", "chosen_index", "chosen_name", "default_ms", "chosen_ms".
AUTOTUNE_LOG: dict[tuple, dict] = {}


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
    plan_index: int | None = None  # run with execute_plan_at_index(index=plan_index); None: graph.execute()
    default_index: int | None = None  # the plan the heuristics put first (what build_plans() selects)
    candidates: list = field(default_factory=list)  # built plan indices still to time on the first call
    log: dict = field(default_factory=dict)  # this graph's AUTOTUNE_LOG entry


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


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def _knobs_repr(knobs: Any) -> dict:
    """{knob name: value} for a plan's {cudnn.knob_type: int} dict, printable and JSON-friendly."""
    return {getattr(k, "name", str(k)): int(v) for k, v in dict(knobs or {}).items()}


def _plan_info(graph, index: int, source: str) -> dict:
    info: dict = {"source": source}
    try:
        info["name"] = graph.get_plan_name_at_index(index)
    except Exception as exc:  # the name is for the log only
        info["name"] = f"? ({_short(exc, 120)})"
    try:
        engine_id, knobs = graph.get_engine_and_knobs_at_index(index)
        info["engine_id"], info["knobs"] = int(engine_id), _knobs_repr(knobs)
    except Exception:
        pass
    return info


def _append_knob_variants(graph, n_heuristic: int, log: dict) -> int:
    """Append, for each engine among the heuristic plans, every other value of each of its knobs (one knob changed
    at a time from the first heuristic plan of that engine) as explicit plans. Returns how many were appended."""
    seen, bases = set(), {}
    for i in range(n_heuristic):
        try:
            engine_id, knobs = graph.get_engine_and_knobs_at_index(i)
        except Exception:
            continue
        knobs = dict(knobs or {})
        seen.add((int(engine_id), tuple(sorted((str(k), int(v)) for k, v in knobs.items()))))
        bases.setdefault(int(engine_id), knobs)
    added, notes = 0, []
    for engine_id, base in bases.items():
        try:
            specs = list(graph.get_knobs_for_engine(engine_id))
        except Exception as exc:
            notes.append(f"engine {engine_id}: get_knobs_for_engine failed ({_short(exc, 120)})")
            continue
        for spec in specs:
            values = range(int(spec.min_value), int(spec.max_value) + 1, max(int(spec.stride), 1))
            if len(values) > _KNOB_SWEEP_MAX_VALUES:
                notes.append(f"engine {engine_id}: {getattr(spec.type, 'name', spec.type)} has {len(values)} values, "
                             f"not swept")
                continue
            for value in values:
                knobs = dict(base)
                knobs[spec.type] = value
                sig = (engine_id, tuple(sorted((str(k), int(v)) for k, v in knobs.items())))
                if sig in seen:
                    continue
                seen.add(sig)
                if added >= _KNOB_SWEEP_MAX_PLANS:
                    notes.append(f"stopped at {_KNOB_SWEEP_MAX_PLANS} appended plans")
                    log["knob_sweep_notes"] = notes
                    return added
                try:
                    graph.create_execution_plan(engine_id, knobs)
                    added += 1
                except Exception:  # a knob combination the engine rejects
                    continue
    if notes:
        log["knob_sweep_notes"] = notes
    return added


def _prepare_plans(graph, cudnn, log: dict) -> tuple[int | None, int | None, list, int]:
    """create_execution_plans -> check_support -> build every plan. Returns (plan_index, default_index,
    candidates, workspace bytes); plan_index None means the graph's own selection (graph.execute)."""
    missing = [name for name in _PLAN_API if not hasattr(graph, name)]
    if not AUTOTUNE or missing:
        log["status"] = "disabled" if not AUTOTUNE else "api_missing"
        log["reason"] = ("AUTOTUNE is off (WAN_FP8_SDPA_AUTOTUNE=0)" if not AUTOTUNE else
                         f"this cudnn frontend lacks {', '.join(missing)}: the heuristics' first plan is used")
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        return None, None, [], graph.get_workspace_size()

    modes = [getattr(cudnn.heur_mode, m) for m in AUTOTUNE_HEURISTICS if hasattr(cudnn.heur_mode, m)]
    graph.create_execution_plans(modes)
    graph.check_support()
    n_heuristic = graph.get_execution_plan_count()
    n_swept = 0
    if AUTOTUNE_KNOB_SWEEP:
        try:
            n_swept = _append_knob_variants(graph, n_heuristic, log)
        except Exception as exc:
            log["knob_sweep_notes"] = [f"knob sweep failed: {_short(exc)}"]
    plans, built = log.setdefault("plans", {}), []
    for i in range(graph.get_execution_plan_count()):
        plans[i] = info = _plan_info(graph, i, "heuristic" if i < n_heuristic else "knob_sweep")
        try:
            graph.build_plan_at_index(i)
            info["workspace"] = int(graph.get_workspace_size_plan_at_index(i))
            built.append(i)
        except Exception as exc:  # a plan the engine declines at build time
            info["error"] = "build: " + _short(exc)
    log.update(n_heuristic_plans=n_heuristic, n_knob_sweep_plans=n_swept, n_built=len(built))
    if not built:
        raise RuntimeError(f"cuDNN FP8 SDPA: none of the {len(plans)} execution plan(s) built: "
                           + "; ".join(f"[{i}] {p.get('error')}" for i, p in plans.items()))
    default = built[0]  # the ranked list's first buildable plan: what build_plans() would have selected
    log.update(default_index=default, default_name=plans[default].get("name"), chosen_index=default,
               chosen_name=plans[default].get("name"))
    if len(built) == 1:
        log["status"], log["reason"] = "single_plan", "only one execution plan built; nothing to tune"
        return default, default, [], plans[default]["workspace"]
    log["status"], log["reason"] = "pending", "plans are timed on the first call of this shape"
    return default, default, built, max(plans[i]["workspace"] for i in built)


def _build(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, o8: torch.Tensor, attn_scale: float,
           key: tuple | None = None) -> _CachedGraph:
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
    log: dict = {}
    if key is not None:
        AUTOTUNE_LOG[key] = log
    plan_index, default_index, candidates, workspace_bytes = _prepare_plans(graph, cudnn, log)

    def f32_scalar(value: float) -> torch.Tensor:
        return torch.full((1, 1, 1, 1), value, dtype=torch.float32, device=device)

    return _CachedGraph(
        graph=graph, tensors=t,
        workspace=torch.empty(max(workspace_bytes, 1), dtype=torch.uint8, device=device),
        scale_s=f32_scalar(SOFTMAX_SCALE), descale_s=f32_scalar(1.0 / SOFTMAX_SCALE),
        amax_s=f32_scalar(0.0), amax_o=f32_scalar(0.0),
        plan_index=plan_index, default_index=default_index, candidates=candidates, log=log)


def _output_sample(o8: torch.Tensor) -> torch.Tensor:
    """A few heads of O as float32 (about 4 of them), to compare plans' outputs without copying all of O."""
    return o8[:, :: max(1, o8.shape[1] // 4)].float().flatten()


def _autotune(cached: _CachedGraph, variant_pack: dict, o8: torch.Tensor, handle, stream) -> None:
    """Time every candidate plan on this call's tensors, keep the fastest, and leave O written by it.

    The one place this module synchronizes with the host, once per shape. Under CUDA-graph capture nothing is timed
    (and the workspace is not reallocated, since the capture holds its address): the default plan is kept."""
    graph, log, candidates = cached.graph, cached.log, cached.candidates
    cached.candidates = []
    default = cached.default_index

    def run(index: int) -> None:
        graph.execute_plan_at_index(variant_pack, cached.workspace, index=index, handle=handle)

    if torch.cuda.is_current_stream_capturing():
        log["status"], log["reason"] = "skipped_capture", "first call of this shape was under CUDA-graph capture"
        cached.plan_index = default
        run(default)
        return
    plans, reference, timings = log["plans"], None, {}
    order = [default] + [i for i in candidates if i != default]
    for index in order:
        info = plans[index]
        try:
            for _ in range(AUTOTUNE_WARMUP):
                run(index)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for _ in range(AUTOTUNE_RUNS):
                run(index)
            end.record(stream)
            end.synchronize()
            ms = start.elapsed_time(end) / AUTOTUNE_RUNS
        except Exception as exc:  # a plan that fails to launch is skipped
            info["error"] = "execute: " + _short(exc)
            continue
        info["ms"] = round(ms, 4)
        sample = _output_sample(o8)
        if reference is None:
            reference = sample  # the default plan's output (or the first plan that ran)
        else:
            cosine = torch.nn.functional.cosine_similarity(sample, reference, dim=0).item()
            info["cosine_vs_default"] = round(cosine, 6)
            if not cosine >= AUTOTUNE_MIN_COSINE:  # also catches NaN
                info["error"] = f"output differs from the default plan's (cosine {cosine:.4f})"
                continue
        timings[index] = ms
    if not timings:
        raise RuntimeError("cuDNN FP8 SDPA: no execution plan ran: "
                           + "; ".join(f"[{i}] {plans[i].get('error')}" for i in order))
    best = min(timings, key=timings.get)
    baseline = timings.get(default)
    if baseline is not None and timings[best] > baseline * (1.0 - AUTOTUNE_SWITCH_MARGIN):
        best = default
    cached.plan_index = best
    needed = max(plans[best].get("workspace", 0), 1)
    if needed < cached.workspace.numel():
        cached.workspace = torch.empty(needed, dtype=torch.uint8, device=cached.workspace.device)
    log.update(status="tuned", reason=f"timed {len(timings)} of {len(order)} plan(s)", chosen_index=best,
               chosen_name=plans[best].get("name"), chosen_ms=round(timings[best], 4),
               default_ms=None if baseline is None else round(baseline, 4))
    run(best)  # O must come from the chosen plan (it was last written by whichever plan was timed last)


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
            cached = _GRAPHS[key] = _build(q8, k8, v8, o8, attn_scale, key)
        cudnn = _import_cudnn()
        handle = _handle(device.index)
        stream = torch.cuda.current_stream(device)
        cudnn.set_stream(handle, stream.cuda_stream)  # run on torch's stream
        t = cached.tensors
        variant_pack = {
            t["q"]: q8, t["k"]: k8, t["v"]: v8, t["o"]: o8,
            t["descale_q"]: _as_4d(descale_q), t["descale_k"]: _as_4d(descale_k),
            t["descale_v"]: _as_4d(descale_v), t["descale_s"]: cached.descale_s, t["scale_s"]: cached.scale_s,
            t["scale_o"]: _as_4d(scale_o), t["amax_s"]: cached.amax_s, t["amax_o"]: cached.amax_o,
        }
        if cached.candidates:  # first call of this shape: time the plans, run the fastest
            _autotune(cached, variant_pack, o8, handle, stream)
        elif cached.plan_index is None:
            cached.graph.execute(variant_pack, cached.workspace, handle=handle)
        else:
            cached.graph.execute_plan_at_index(variant_pack, cached.workspace, index=cached.plan_index,
                                               handle=handle)
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

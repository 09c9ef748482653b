"""What the machine was like during a run: the environment fingerprint and NVML snapshots of the GPU.

Everything here is optional and never raises: no NVML (a CPU machine, a container without the driver) gives None,
no torch gives no torch fields. Nothing imports torch: its CUDA version is read from its `version.py` file, and
its cuDNN version only when torch is already imported by the caller.

The fingerprint is a flat dict of str/None so that two runs can be compared key by key:

    env.<NAME>            speed-relevant environment variables (None = unset)
    version.<dist>        installed package versions (None = not installed)
    torch.cuda, torch.cudnn, python, implementation, kernel, system, machine, nvidia_driver, cuda_driver
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

# Always listed (None when unset), so that setting one of them later shows as a change.
SPEED_ENV_VARS: tuple[str, ...] = (
    "TORCH_COMPILE",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_LAUNCH_BLOCKING",
    "CUDA_MODULE_LOADING",
    "CUDA_DEVICE_MAX_CONNECTIONS",
    "PYTORCH_CUDA_ALLOC_CONF",
    "PYTORCH_ALLOC_CONF",
    "PYTORCH_NO_CUDA_MEMORY_CACHING",
    "NVIDIA_TF32_OVERRIDE",
    "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",
    "CUBLAS_WORKSPACE_CONFIG",
    "CUBLASLT_WORKSPACE_SIZE",
    "CUDNN_FRONTEND_ATTN_DP_WORKSPACE_LIMIT",
    "TORCH_CUDNN_V8_API_DISABLED",
    "TORCHINDUCTOR_MAX_AUTOTUNE",
    "TORCHINDUCTOR_FX_GRAPH_CACHE",
    "TORCHINDUCTOR_CACHE_DIR",
    "TORCHDYNAMO_DISABLE",
    "TORCH_LOGS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "TOKENIZERS_PARALLELISM",
    "HF_HUB_OFFLINE",
    "ATTN_BACKEND",
    "DIFFUSERS_ATTN_BACKEND",
    "WAN_MODELS_DIR",
)
# Also listed when set: any variable with one of these prefixes.
SPEED_ENV_PREFIXES: tuple[str, ...] = (
    "TORCHINDUCTOR_", "TORCHDYNAMO_", "TORCH_CUDNN_", "TORCH_CUDA_", "TORCH_NCCL_", "PYTORCH_", "CUDA_", "CUBLAS",
    "CUDNN_", "NCCL_", "TRITON_", "SAGE", "WAN_",
)
# Never recorded, whatever the prefix: the fingerprint is stored in shared JSON files.
_SECRET = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|(^|_)KEY($|_)|AUTH", re.IGNORECASE)

PACKAGES: tuple[str, ...] = (
    "torch", "diffusers", "transformers", "accelerate", "sageattention", "triton", "flash-attn", "xformers",
    "safetensors", "numpy", "scikit-image", "pytest-benchmark", "nvidia-ml-py", "wan-bench",
)

# NVML clock-event ("throttle") reason bits, as NVML defines them (nvmlClocksEventReason*).
CLOCK_EVENT_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
    0x200: "board_limit",
    0x400: "reliability",
}
# The reasons that mean the card ran slower because it was hot or at its power limit.
THROTTLE_REASONS: frozenset[str] = frozenset(
    {"sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"}
)


def decode_clock_event_reasons(mask: int | None) -> list[str]:
    """Names of the bits set in an NVML clock-event reason mask (unknown bits as 'bit_0x...')."""
    if mask is None:
        return []
    names = []
    for bit in range(0, 32):
        value = 1 << bit
        if mask & value:
            names.append(CLOCK_EVENT_REASONS.get(value, f"bit_{value:#x}"))
    return names


def _speed_env(environ: dict[str, str] | None = None) -> dict[str, str | None]:
    environ = os.environ if environ is None else environ
    out: dict[str, str | None] = {f"env.{name}": environ.get(name) for name in SPEED_ENV_VARS}
    for name, value in environ.items():
        if name.startswith(SPEED_ENV_PREFIXES) and not _SECRET.search(name):
            out[f"env.{name}"] = value
    return dict(sorted(out.items()))


def _package_version(dist: str) -> str | None:
    for candidate in (dist, dist.replace("-", "_")):
        try:
            return importlib.metadata.version(candidate)
        except importlib.metadata.PackageNotFoundError:
            continue
        except Exception:  # a broken installation's metadata
            return None
    return None


def _torch_versions() -> dict[str, str | None]:
    """torch's CUDA and cuDNN versions without importing torch (cuDNN only when torch is already imported)."""
    out: dict[str, str | None] = {"torch.cuda": None, "torch.cudnn": None}
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            out["torch.cuda"] = getattr(torch.version, "cuda", None)
        except Exception:
            pass
        try:
            v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
            out["torch.cudnn"] = None if v is None else str(v)
        except Exception:
            pass
        return out
    try:
        spec = importlib.util.find_spec("torch")
    except Exception:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return out
    version_file = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    try:
        tree = ast.parse(version_file.read_text(encoding="utf-8"))
    except Exception:
        return out
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == "cuda" and isinstance(node.value, ast.Constant):
            out["torch.cuda"] = None if node.value.value is None else str(node.value.value)
    return out


def _nvml():
    """The pynvml module, initialised, or None. Callers pair it with _nvml_shutdown."""
    try:
        import pynvml
    except Exception:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    return pynvml


def _nvml_shutdown(nvml) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception:
        pass


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _try(fn, *args):
    try:
        return _text(fn(*args))
    except Exception:
        return None


def environment_fingerprint(environ: dict[str, str] | None = None) -> dict[str, str | None]:
    """A flat dict of everything outside the code that can change the speed of a run. Never raises."""
    fp: dict[str, str | None] = {}
    try:
        fp.update(_speed_env(environ))
    except Exception:
        pass
    for dist in PACKAGES:
        fp[f"version.{dist}"] = _package_version(dist)
    try:
        fp.update(_torch_versions())
    except Exception:
        fp.setdefault("torch.cuda", None)
        fp.setdefault("torch.cudnn", None)
    fp["python"] = platform.python_version()
    fp["implementation"] = platform.python_implementation()
    fp["system"] = platform.system()
    fp["kernel"] = platform.release()
    fp["machine"] = platform.machine()
    fp["nvidia_driver"] = None
    fp["cuda_driver"] = None
    nvml = _nvml()
    if nvml is not None:
        try:
            fp["nvidia_driver"] = _try(nvml.nvmlSystemGetDriverVersion)
            cuda = _try(nvml.nvmlSystemGetCudaDriverVersion)
            if isinstance(cuda, int):
                fp["cuda_driver"] = f"{cuda // 1000}.{(cuda % 1000) // 10}"
        finally:
            _nvml_shutdown(nvml)
    return {k: (None if v is None else str(v)) for k, v in fp.items()}


def _clock_event_mask(nvml, handle) -> int | None:
    for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
        fn = getattr(nvml, name, None)
        if fn is None:
            continue
        try:
            return int(fn(handle))
        except Exception:
            continue
    return None


def visible_gpu_index(environ=None) -> int | None:
    """The NVML index of the first GPU this process sees: NVML ignores CUDA_VISIBLE_DEVICES, so a worker pinned
    to device 3 must ask NVML for device 3, not 0. Only numeric entries are understood (UUIDs fall back to 0).
    None when CUDA_VISIBLE_DEVICES hides every GPU (set but empty, or starting with -1, as CUDA reads it): a CPU
    worker on a GPU host records no GPU."""
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" not in environ:
        return 0
    first = environ["CUDA_VISIBLE_DEVICES"].split(",")[0].strip()
    if not first or first.startswith("-"):
        return None
    return int(first) if first.isdigit() else 0


def _visible_count(visible: str, present: int) -> int:
    """How many of `present` devices CUDA_VISIBLE_DEVICES=`visible` leaves: the CUDA runtime reads the comma list up
    to its first invalid entry (a negative or out-of-range index, or garbage); GPU-/MIG- UUIDs count as valid."""
    count = 0
    for entry in visible.split(","):
        entry = entry.strip()
        if entry.isdigit() and int(entry) < present or entry.startswith(("GPU-", "MIG-")):
            count += 1
        else:
            break
    return count


def cuda_available(environ=None) -> bool:
    """What `torch.cuda.is_available()` answers, without importing torch (planning needs no model): a CUDA build of
    torch (read from its version file), a driver NVML reaches, and a device that CUDA_VISIBLE_DEVICES leaves visible.
    Where torch is already imported, torch itself answers."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return bool(torch.cuda.is_available())
    if _torch_versions()["torch.cuda"] is None:  # a CPU build, or no torch
        return False
    nvml = _nvml()
    if nvml is None:  # no driver
        return False
    try:
        present = int(nvml.nvmlDeviceGetCount())
    except Exception:
        present = 0
    finally:
        _nvml_shutdown(nvml)
    visible = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    return (present if visible is None else _visible_count(visible, present)) > 0


def gpu_snapshot(index: int | None = None) -> dict | None:
    """The state of GPU `index` now (default: the first one this process sees; identity without UUID or serial,
    clocks, memory, heat, power, clock-event reasons), or None when NVML is unavailable or no GPU is visible. Fields NVML cannot read
    are None. Never raises."""
    if index is None:
        index = visible_gpu_index()
        if index is None:  # every GPU hidden from this process
            return None
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:
            return None
        snap: dict[str, Any] = {"index": index, "name": _try(nvml.nvmlDeviceGetName, handle)}
        snap["driver"] = _try(nvml.nvmlSystemGetDriverVersion)
        cc = _try(nvml.nvmlDeviceGetCudaComputeCapability, handle)
        snap["compute_capability"] = f"{cc[0]}.{cc[1]}" if isinstance(cc, (tuple, list)) and len(cc) == 2 else None
        mem = _try(nvml.nvmlDeviceGetMemoryInfo, handle)
        snap["memory_total_bytes"] = getattr(mem, "total", None)
        snap["memory_used_bytes"] = getattr(mem, "used", None)
        clock_sm, clock_mem = getattr(nvml, "NVML_CLOCK_SM", 1), getattr(nvml, "NVML_CLOCK_MEM", 2)
        snap["sm_clock_mhz"] = _try(nvml.nvmlDeviceGetClockInfo, handle, clock_sm)
        snap["sm_clock_max_mhz"] = _try(nvml.nvmlDeviceGetMaxClockInfo, handle, clock_sm)
        snap["mem_clock_mhz"] = _try(nvml.nvmlDeviceGetClockInfo, handle, clock_mem)
        snap["mem_clock_max_mhz"] = _try(nvml.nvmlDeviceGetMaxClockInfo, handle, clock_mem)
        snap["temperature_c"] = _try(nvml.nvmlDeviceGetTemperature, handle, getattr(nvml, "NVML_TEMPERATURE_GPU", 0))
        power = _try(nvml.nvmlDeviceGetPowerUsage, handle)
        limit = _try(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        snap["power_w"] = power / 1000.0 if isinstance(power, (int, float)) else None
        snap["power_limit_w"] = limit / 1000.0 if isinstance(limit, (int, float)) else None
        snap["pstate"] = _try(nvml.nvmlDeviceGetPerformanceState, handle)
        mask = _clock_event_mask(nvml, handle)
        snap["clock_event_mask"] = mask
        snap["clock_event_reasons"] = decode_clock_event_reasons(mask)
        # Cumulative time (ns) the driver held clocks down for power / thermal reasons: the difference between two
        # snapshots tells whether the card throttled at any moment in between, not only at the instants sampled.
        violations = {}
        for key, const in (("power", "NVML_PERF_POLICY_POWER"), ("thermal", "NVML_PERF_POLICY_THERMAL")):
            status = _try(nvml.nvmlDeviceGetViolationStatus, handle, getattr(nvml, const, 0 if key == "power" else 1))
            violations[key] = getattr(status, "violationTime", None)
        snap["violation_ns"] = violations
        return snap
    except Exception:
        return None
    finally:
        _nvml_shutdown(nvml)


def throttle_reasons_between(before: dict | None, after: dict | None) -> list[str]:
    """The power/thermal throttling seen around a measurement: reasons active in either snapshot (idle,
    application-clock, display and sync-boost bits ignored) plus 'power_violation' / 'thermal_violation' when
    NVML's cumulative violation counters grew between the two. Sorted, no repeats; [] when nothing is known."""
    seen: set[str] = set()
    for snap in (before, after):
        if isinstance(snap, dict):
            reasons = snap.get("clock_event_reasons")
            if reasons is None and snap.get("clock_event_mask") is not None:
                reasons = decode_clock_event_reasons(snap.get("clock_event_mask"))
            seen.update(r for r in reasons or () if r in THROTTLE_REASONS)
    if isinstance(before, dict) and isinstance(after, dict):
        vb, va = before.get("violation_ns") or {}, after.get("violation_ns") or {}
        for key in ("power", "thermal"):
            b, a = vb.get(key), va.get(key)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > b:
                seen.add(f"{key}_violation")
    return sorted(seen)


def gpu_slug(name_or_snapshot: Any) -> str:
    """A folder name for a GPU model: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; 'cpu' when there is none.

    Takes a name, a gpu_snapshot() dict, or a pytest-benchmark machine_info dict (its 'gpu' entry)."""
    name = name_or_snapshot
    if isinstance(name, dict):
        name = name.get("gpu", name) if "gpu" in name and "name" not in name else name
        name = name.get("name") if isinstance(name, dict) else name
    if not isinstance(name, str) or not name.strip():
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.strip().lower()).strip("-")
    return slug or "cpu"


__all__ = [
    "CLOCK_EVENT_REASONS", "PACKAGES", "SPEED_ENV_PREFIXES", "SPEED_ENV_VARS", "THROTTLE_REASONS",
    "decode_clock_event_reasons", "environment_fingerprint", "gpu_slug", "gpu_snapshot",
    "throttle_reasons_between",
]

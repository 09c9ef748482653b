"""The matrix over GPUs, the pure parts: which devices (`--wan-gpus`), which worker runs which node ids (cases that
load the same weights stay together, balanced by a cost estimate), the arguments a worker gets, and the merge of the
workers' pytest-benchmark JSON into one file with a `wan_workers` entry. Functions of their inputs, tested on CPU.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from wan_pipeline.errors import WanBenchError

# ------------------------------------------------------------------------------------------------ devices


@dataclass(frozen=True)
class Device:
    """Where one worker runs: a CUDA device index as torch numbers it in the controller, or None for the CPU."""

    index: int | None

    @property
    def label(self) -> str:
        return "cpu" if self.index is None else f"GPU {self.index}"

    def visible_devices(self, parent: str | None) -> str:
        """The worker's CUDA_VISIBLE_DEVICES: its device as the driver names it (through the controller's own
        CUDA_VISIBLE_DEVICES when that is set), or empty for a CPU worker, which hides every GPU."""
        if self.index is None:
            return ""
        entries = [e.strip() for e in (parent or "").split(",") if e.strip()]
        return entries[self.index] if entries else str(self.index)


class GpuSelectionError(WanBenchError):
    """A --wan-gpus value that this host cannot honour; the message names the value."""


def parse_gpus_spec(value: str) -> tuple[str, int | list[int] | None]:
    """The syntax of --wan-gpus: ("all", None), ("count", N) or ("list", [indices]); no device is looked at."""
    raw = str(value).strip()
    where = f"--wan-gpus / WAN_GPUS {raw!r}"
    if raw.lower() == "all":
        return "all", None
    if "," not in raw:
        try:
            count = int(raw)
        except ValueError:
            raise GpuSelectionError(f"{where}: expected all, a number of GPUs or a comma list of device indices") \
                from None
        if count < 1:
            raise GpuSelectionError(f"{where}: the number of GPUs must be at least 1")
        return "count", count
    indices: list[int] = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        try:
            index = int(part)
        except ValueError:
            raise GpuSelectionError(f"{where}: {part!r} is not a device index") from None
        if index < 0:
            raise GpuSelectionError(f"{where}: {part!r} is not a device index")
        if index in indices:
            raise GpuSelectionError(f"{where}: device {index} is named twice (one worker per GPU)")
        indices.append(index)
    if not indices:
        raise GpuSelectionError(f"{where}: no device index given")
    return "list", indices


def parse_gpus(value: str, device_count: int, cpu_workers_allowed: bool = False) -> list[Device]:
    """--wan-gpus: `all`, a count N (the first N devices) or a comma list of device indices (one index: `2,`).

    With no CUDA device and `cpu_workers_allowed` (tiny mode), a count N means N CPU workers: how the sharding and
    merging are exercised without a GPU. Anything else that cannot be honoured is a GpuSelectionError naming the
    value.
    """
    kind, arg = parse_gpus_spec(value)
    where = f"--wan-gpus / WAN_GPUS {str(value).strip()!r}"
    if kind == "all":
        if device_count == 0:
            hint = " (in tiny mode give a number of CPU workers instead, e.g. --wan-gpus 2)" if cpu_workers_allowed else ""
            raise GpuSelectionError(f"{where}: this host has no CUDA device (torch.cuda.device_count() is 0){hint}")
        return [Device(i) for i in range(device_count)]
    if kind == "count":
        if device_count == 0 and cpu_workers_allowed:
            return [Device(None) for _ in range(arg)]
        if arg > device_count:
            raise GpuSelectionError(f"{where}: {arg} GPUs asked for but this host has {device_count} "
                                    f"(torch.cuda.device_count())")
        return [Device(i) for i in range(arg)]
    for index in arg:
        if index >= device_count:
            raise GpuSelectionError(f"{where}: device {index} does not exist; this host has {device_count} CUDA "
                                    f"device(s) (torch.cuda.device_count()), numbered from 0")
    return [Device(i) for i in arg]


# ------------------------------------------------------------------------------------------------ sharding


@dataclass(frozen=True)
class ShardItem:
    """One test to place. Items sharing any of `keys` stay on one worker (a model set loads once per worker; an
    expert-forward case meets its bf16 SDPA reference). `unit` is the smallest piece a group is split into when
    there are more workers than groups (cases of one preset stay together); `cost` is what balancing weighs."""

    nodeid: str
    keys: tuple[str, ...]
    unit: str
    cost: float


def _components(items: Sequence[ShardItem]) -> list[list[int]]:
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, item in enumerate(items):
        for key in item.keys:
            if key in owner:
                a, b = find(owner[key]), find(i)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                owner[key] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(items)):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def _lpt(parts: list[list[int]], bins: int, cost) -> list[list[int]]:
    """Longest-processing-time-first: each part, costliest first, to the least loaded bin (ties: fewer parts, then
    the lower bin). Deterministic for equal inputs."""
    loads = [0.0] * bins
    out: list[list[int]] = [[] for _ in range(bins)]
    counts = [0] * bins
    for part in sorted(parts, key=lambda p: (-cost(p), p[0])):
        b = min(range(bins), key=lambda k: (loads[k], counts[k], k))
        out[b].extend(part)
        loads[b] += cost(part)
        counts[b] += 1
    return [sorted(b) for b in out]


def shard(items: Sequence[ShardItem], workers: int) -> list[list[str]]:
    """Node ids per worker (in the order given). Groups of items that share a key never straddle workers; with more
    workers than groups the costliest splittable group is split by `unit` (one more model load, a shorter run)."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")

    def cost(part: list[int]) -> float:
        return sum(items[i].cost for i in part)

    parts = _components(items)
    while len(parts) < workers:
        splittable = [p for p in parts if len({items[i].unit for i in p}) > 1]
        if not splittable:
            break
        target = max(splittable, key=lambda p: (cost(p), -p[0]))
        units: dict[str, list[int]] = {}
        for i in target:
            units.setdefault(items[i].unit, []).append(i)
        halves = _lpt(list(units.values()), 2, cost)
        parts.remove(target)
        parts.extend(h for h in halves if h)
        parts.sort(key=lambda p: p[0])
    return [[items[i].nodeid for i in b] for b in _lpt(parts, workers, cost)]


# ------------------------------------------------------------------------------------------------ worker command


# Options the controller keeps for itself: its results file, its history save, its report files, the matrix.
_STRIP_WITH_VALUE = ("--wan-gpus", "--wan-gpus-timeout", "--wan-shard", "--wan-progress", "--benchmark-json",
                     "--benchmark-save", "--junitxml", "--junit-xml", "--result-log")
_STRIP_FLAG = ("--benchmark-autosave",)
_STRIP_OPTIONAL_VALUE = ("--benchmark-histogram",)


def worker_args(args: Sequence[str]) -> list[str]:
    """`args` without the options the controller handles itself (both `--opt value` and `--opt=value`): the result
    files a sub-session must not write and the matrix itself. Also what a --wan-sp rank other than 0 runs with."""
    out: list[str] = []
    i = 0
    args = list(args)
    while i < len(args):
        arg = str(args[i])
        name = arg.split("=", 1)[0]
        if name in _STRIP_WITH_VALUE:
            i += 1 if "=" in arg else 2
            continue
        if name in _STRIP_FLAG:
            i += 1
            continue
        if name in _STRIP_OPTIONAL_VALUE:
            # argparse's nargs='?': the next word is the option's value unless it looks like an option
            i += 1 if "=" in arg or i + 1 >= len(args) or str(args[i + 1]).startswith("-") else 2
            continue
        out.append(arg)
        i += 1
    return out


# ------------------------------------------------------------------------------------------------ merging


@dataclass
class WorkerResult:
    """What one worker did: its assignment, how it ended and the benchmark JSON it left (None if none)."""

    index: int
    device: Device
    visible_devices: str
    nodeids: list[str]
    log: Path
    pid: int | None = None
    exit_code: int | None = None
    status: str = "not started"  # ok | tests failed | died | timed out | error
    problem: str | None = None  # why the status is not ok, in words
    data: dict | None = None
    outcomes: dict = field(default_factory=dict)  # node id -> "passed" | "failed" | "skipped", from its progress file
    started: list = field(default_factory=list)  # node ids whose setup began, in order

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "tests failed")

    def to_json(self) -> dict:
        gpu = ((self.data or {}).get("machine_info") or {}).get("gpu")
        return {
            "worker": self.index,
            "device": self.device.label,
            "cuda_visible_devices": self.visible_devices,
            "gpu": gpu.get("name") if isinstance(gpu, dict) else None,
            "pid": self.pid,
            "exit_code": self.exit_code,
            "status": self.status,
            "problem": self.problem,
            "cases": list(self.nodeids),
            "outcomes": dict(self.outcomes),
            "benchmarks": [b.get("fullname") or b.get("name") for b in (self.data or {}).get("benchmarks", [])],
            "log": str(self.log),
        }


def merge(base: dict, workers: Sequence[WorkerResult], order: Sequence[str] = ()) -> dict:
    """One pytest-benchmark JSON from the controller's own output (`base`: commit_info, datetime, version and the
    benchmarks it ran itself) and the workers': machine_info from the first worker that left a file (the hardware
    the cases ran on), every benchmark (in collection `order`), and `wan_workers` recording each worker."""
    merged = dict(base)
    benchmarks = list(base.get("benchmarks") or [])
    machine_info = None
    for worker in sorted(workers, key=lambda w: w.index):
        if worker.data is None:
            continue
        if machine_info is None and isinstance(worker.data.get("machine_info"), dict):
            machine_info = worker.data["machine_info"]
        benchmarks.extend(worker.data.get("benchmarks") or [])
    rank = {nodeid: i for i, nodeid in enumerate(order)}
    merged["benchmarks"] = sorted(benchmarks, key=lambda b: rank.get(b.get("fullname"), len(rank)))  # stable
    if machine_info is not None:
        merged["machine_info"] = machine_info
    merged["wan_workers"] = [w.to_json() for w in sorted(workers, key=lambda w: w.index)]
    return merged


def gpu_models(workers: Sequence[WorkerResult]) -> list[str]:
    names = {w.to_json()["gpu"] for w in workers if w.data is not None}
    return sorted(n or "cpu" for n in names)


# ------------------------------------------------------------------------------------------------ processes


def exit_meaning(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + (" (out of host memory?)" if -code == signal.SIGKILL else "")
    return {2: "interrupted", 3: "pytest internal error, or the process ended itself", 4: "pytest usage error",
            5: "collected none of its cases"}.get(code, "ended abnormally")


def tail(path: Path, lines: int = 15) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return text.rstrip("\n").splitlines()[-lines:]


def log_section(path: Path, title: str = "wan-bench") -> list[str]:
    """The lines of one `==== title ====` terminal section in a worker's log."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    out, inside = [], False
    for line in lines:
        stripped = line.strip()
        is_sep = stripped.startswith("=") and stripped.endswith("=") and len(stripped) > 10
        if is_sep:
            inside = stripped.strip("= ") == title
            continue
        if inside:
            out.append(line)
    return out


def read_progress(path: Path) -> tuple[list[str], dict[str, str]]:
    """A worker's progress file (one JSON line per test phase: nodeid, when, outcome): the node ids it started, in
    order, and the outcome of each one it got through (its call ran, or its setup failed or skipped; a failed
    teardown makes it failed). A line cut short by a dying worker is ignored."""
    started: list[str] = []
    outcomes: dict[str, str] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return started, outcomes
    for line in lines:
        try:
            entry = json.loads(line)
            nodeid, when, outcome = entry["nodeid"], entry["when"], entry["outcome"]
        except (ValueError, KeyError, TypeError):
            continue
        if nodeid not in started:
            started.append(nodeid)
        if when == "call" or (when == "setup" and outcome != "passed") or outcome == "failed":
            if outcomes.get(nodeid) != "failed":
                outcomes[nodeid] = outcome
    return started, outcomes

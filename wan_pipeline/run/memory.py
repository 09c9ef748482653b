"""Device memory at run time: the allocator cap, the budget every memory decision reads, models built or kept in
pinned host memory, and experts streamed block by block from there (diffusers' group offloading).

A cap (`--wan-memory-cap`) goes to `torch.cuda.set_per_process_memory_fraction` before anything is allocated, so
an allocation past it fails as it would on the small card; the planning arithmetic is `wan_pipeline.plan.memory`.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from wan_pipeline.plan.memory import ComponentBytes, MemoryCapError, format_bytes


def card_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).total_memory


def apply_memory_cap(cap: int | None) -> dict | None:
    """Cap the caching allocator of every visible GPU at `cap` bytes; what was done, for the records.

    Without a GPU the cap still drives the planning (a CPU run allocates nothing on a card) and says so.
    """
    if cap is None:
        return None
    if not torch.cuda.is_available():
        return {"cap_bytes": cap, "applied": False, "why": "no CUDA device is visible: the cap only plans"}
    fractions = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        if cap > props.total_memory:
            raise MemoryCapError(f"memory cap {format_bytes(cap)} is larger than GPU {index} ({props.name}, "
                                 f"{format_bytes(props.total_memory)}); give a cap below the card's memory")
        fraction = cap / props.total_memory
        torch.cuda.set_per_process_memory_fraction(fraction, index)
        fractions.append(round(fraction, 6))
    return {"cap_bytes": cap, "applied": True, "fraction": fractions[0] if len(fractions) == 1 else fractions,
            "card_bytes": torch.cuda.get_device_properties(0).total_memory}


def device_budget(device: torch.device, cap: int | None) -> int | None:
    """What memory decisions may plan with on `device`: the cap if there is one, else the card; None on a CPU."""
    if device.type != "cuda":
        return None
    total = card_bytes(device)
    return total if cap is None else min(cap, total)


# ---------------------------------------------------------------------------------------------------- sizes


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for _, t in _tensors(module))


def component_bytes(experts: dict, text_encoder: torch.nn.Module, vae: torch.nn.Module) -> ComponentBytes:
    """The measured bytes the planner reads: each expert, its largest block and what lies outside its blocks, and
    the text encoder's 16-bit size (it is built or loaded at 16 bits before any fp8 storage: the load stage)."""
    sizes = [tensor_bytes(m) for m in experts.values()]
    block = fixed = 0
    for m in experts.values():
        blocks = [tensor_bytes(b) for b in getattr(m, "blocks", [])]
        block = max([block, *blocks])
        fixed = max(fixed, tensor_bytes(m) - sum(blocks))
    return ComponentBytes(experts=tuple(sizes), text_encoder=tensor_bytes(text_encoder), vae=tensor_bytes(vae),
                          expert_block=block, expert_fixed=fixed,
                          text_encoder_load=2 * sum(t.numel() for _, t in _tensors(text_encoder)
                                                    if t.is_floating_point()))


# ---------------------------------------------------------------------------------------------------- host memory


def _tensors(module: torch.nn.Module):
    yield from module.named_parameters()
    yield from module.named_buffers()


def pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """One copy into page-locked host memory (a plain host copy when none can be pinned)."""
    on_host = tensor.device.type == "cpu"
    if on_host and (not torch.cuda.is_available() or tensor.is_pinned()):
        return tensor  # already pinned, or nothing to pin with: the host tensor as it is
    try:
        return torch.empty_like(tensor, device="cpu", pin_memory=True).copy_(tensor.detach())
    except RuntimeError:  # no page-locked memory to spare
        return tensor if on_host else tensor.detach().to("cpu", copy=True)


def to_host(module: torch.nn.Module, pin: bool = True) -> torch.nn.Module:
    """Move every tensor of `module` to pinned host memory, one tensor at a time (the device never holds a second
    copy of more than one tensor); `pin=False` leaves tensors already in host memory as they are."""
    for _, tensor in _tensors(module):
        if tensor.device.type != "cpu" or pin:
            tensor.data = pinned_copy(tensor.data)
    return module


def host_available_bytes() -> int:
    """Host memory this process can still take: the system's available memory (psutil), or less where a cgroup
    (a container's limit) allows less."""
    import psutil

    available = psutil.virtual_memory().available
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(int(available), 0)


def check_host_room(needed: int, what: str, available: int | None = None) -> None:
    """Refuse, with the figures, a host-memory build that would exhaust the host: the kernel's out-of-memory killer
    would end the whole session without a word instead."""
    available = host_available_bytes() if available is None else available
    if needed > available:
        raise MemoryCapError(f"{what} need about {format_bytes(needed)} of pinned host memory, and this host has "
                             f"{format_bytes(available)} available: free host memory, give a larger memory cap (the "
                             f"experts then stay on the card), or run on a host with more memory")


@contextlib.contextmanager
def built_in_host(unit: type, top: type, finish=None):
    """Modules constructed inside go to pinned host memory as they are built. The random draws happen where and in
    the order they would in an on-device build, so the values are the same, and the device holds little more than
    one `unit` (a transformer block) at a time. The caller moves the top module's own tensors with `to_host`
    afterwards.

    A unit moves whole once it is finished: when the next one starts being built (its first child is attached to
    it; a block list is built in full before it attaches its blocks, so waiting for the attach would keep every
    block on the device) or when it is attached, whichever comes first; `finish(unit)` runs on the device first
    (the fp8 swap, so only fp8 weights ever reach host memory). Other parts move when attached to a `top` module."""
    current = None  # the unit being built
    done = set()

    def complete(module) -> None:
        if module not in done:
            done.add(module)
            if finish is not None:
                finish(module)
            to_host(module, pin=False)

    def hook(parent, _name, submodule):
        nonlocal current
        if submodule is None:
            return
        if isinstance(parent, unit) and parent is not current:
            if current is not None:
                complete(current)  # the next unit has begun: the last one is whole
            current = parent
        if isinstance(submodule, unit):
            complete(submodule)
        elif isinstance(parent, top):
            to_host(submodule, pin=False)

    handle = torch.nn.modules.module.register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def is_in_host(module: torch.nn.Module) -> bool:
    return all(t.device.type == "cpu" for _, t in _tensors(module))


# ---------------------------------------------------------------------------------------------------- streaming


def enable_streaming(expert: torch.nn.Module, device: torch.device) -> dict:
    """Run `expert` from pinned host memory block by block: diffusers' block-level group offloading with each
    block's copy prefetched on a CUDA stream while the previous block runs. The expert's tensors must already be
    in (pinned) host memory; diffusers keeps pinned tensors as they are instead of copying them.

    Returns what one forward moves host->device: every tensor of the expert (each block as its group, the
    embeddings and head as the top-level group), counted from the group sizes.
    """
    if not is_in_host(expert):
        to_host(expert)
    stream = device.type == "cuda"  # diffusers streams only to an accelerator; on a CPU the groups just load
    expert.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                offload_type="block_level", num_blocks_per_group=1, non_blocking=stream,
                                use_stream=stream)
    blocks = list(getattr(expert, "blocks", []))
    return {"bytes_per_forward": tensor_bytes(expert), "groups": len(blocks) + 1,
            "largest_group_bytes": max((tensor_bytes(b) for b in blocks), default=0)}


def copy_bandwidth(module: torch.nn.Module, device: torch.device) -> float | None:
    """Achieved host->device bandwidth (bytes/s) of one synchronised copy of `module`'s pinned tensors: what each
    streamed or swapped byte costs when the copy is not hidden behind compute."""
    if device.type != "cuda":
        return None
    tensors = [t for _, t in _tensors(module)]
    moved = sum(t.numel() * t.element_size() for t in tensors)
    if not moved:
        return None
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    copies = [t.to(device, non_blocking=True) for t in tensors]
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    del copies
    return moved / seconds if seconds > 0 else None

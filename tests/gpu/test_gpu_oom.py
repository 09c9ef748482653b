"""Out-of-memory isolation with a real CUDA allocation failure: under a small per-process memory fraction the
allocator refuses, the case fails with the configuration, tokens and memory at failure, the model set is evicted,
and the memory is given back for the next case."""

import contextlib
import gc
import weakref

import pytest
import torch

from gpu_helpers import tiny_models
from wan_pipeline.run.case import WanCase
from wan_pipeline.suite.fixtures import out_of_memory_isolation

pytestmark = pytest.mark.gpu


@contextlib.contextmanager
def memory_cap(device, headroom_bytes):
    """The allocator capped at what this process holds now plus `headroom_bytes`, for the block only: the
    previous fraction comes back after, whatever happens."""
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    previous = getter(device) if getter else 1.0
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    cap = torch.cuda.memory_reserved(device) + headroom_bytes
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    try:
        yield cap
    finally:
        torch.cuda.set_per_process_memory_fraction(previous, device)


def test_a_real_allocation_failure_fails_the_case_clearly_and_frees_the_memory(cuda):
    cache, plan, prepared = tiny_models(cuda)
    case = WanCase(plan.config, "tiny")
    expert = weakref.ref(prepared.models.experts["high"])
    baseline = torch.cuda.memory_allocated(cuda)
    held = []
    with memory_cap(cuda, 2 * 2**30) as cap:
        with pytest.raises(pytest.fail.Exception) as failure:
            with out_of_memory_isolation(case, cache):
                held.append(torch.empty(2 * cap, dtype=torch.uint8, device=cuda))  # more than the cap: refused
        after_failure = torch.empty(2**20, dtype=torch.uint8, device=cuda)  # under the cap the allocator still works
    message = str(failure.value)
    assert message.startswith(f"{case.id}: out of GPU memory at {plan.tokens} tokens (")
    assert "GiB allocated" in message and "GiB reserved at failure): CUDA out of memory. Tried to allocate" in message
    assert message.endswith("The model set was evicted; the session goes on.")
    assert not held and after_failure.is_cuda
    assert cache.current is None  # evicted
    del prepared, after_failure
    gc.collect()
    torch.cuda.empty_cache()
    assert expert() is None and torch.cuda.memory_allocated(cuda) < baseline  # the model set's memory is back

"""The session fixtures of the wan-bench plugin: options, the model cache, budgets, reference outputs, the summary
lines, and the out-of-memory isolation of one case.
"""

from __future__ import annotations

import contextlib

import pytest

from wan_pipeline.suite.options import WanOptions
from wan_pipeline.suite.options import wan_options as options_of

REPORT_KEY = pytest.StashKey[list]()


def report_lines(config) -> list[str]:
    """Lines the terminal summary prints at the end (budgets checked or missing, quality skipped, speed-ups)."""
    return config.stash.setdefault(REPORT_KEY, [])


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def wan_options(pytestconfig) -> WanOptions:
    return options_of(pytestconfig)


@pytest.fixture(scope="session")
def wan_model_cache(wan_options):
    """One model set resident at a time, shared by every test that needs the same weights."""
    from wan_pipeline.run.cache import ModelCache
    from wan_pipeline.run.parallel import rank_device

    cache = ModelCache(models_dir=wan_options.models_dir, device=rank_device())
    yield cache
    cache.evict()


@pytest.fixture(scope="session")
def wan_budgets(wan_options):
    from wan_pipeline.errors import WanBenchError
    from wan_pipeline.plan.budgets import load_budgets

    try:
        return load_budgets(wan_options.budgets)
    except WanBenchError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.fixture(scope="session")
def wan_missing_budgets(pytestconfig) -> list:
    """Ids of the generation cases that found no budget: the session ends by saying how to make them."""
    from wan_pipeline.suite.outcomes import outcomes_of

    return outcomes_of(pytestconfig).unbudgeted


@pytest.fixture(scope="session")
def wan_forward_references():
    """bf16 SDPA expert outputs by (preset, mode): what faster modes are compared with."""
    return {}


@pytest.fixture(scope="session")
def wan_single_gpu_outputs():
    """Final latents and sampled frames of the one-GPU cases, by case id: what --wan-sp cases are compared with."""
    return {}


@pytest.fixture(scope="session")
def wan_report(pytestconfig):
    """Lines the terminal summary prints at the end (budgets checked or missing, quality skipped, throttling)."""
    return report_lines(pytestconfig)


@contextlib.contextmanager
def out_of_memory_isolation(case, cache):
    """Turn a CUDA out-of-memory error into a clear failure of this case, free the memory, let the rest run."""
    import torch

    from wan_pipeline.plan.plan import make_plan

    message = None
    try:
        yield
    except torch.OutOfMemoryError as exc:
        allocated = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        reserved = torch.cuda.memory_reserved() if torch.cuda.is_available() else 0
        first_line = (str(exc).strip().splitlines() or ["out of memory"])[0].split(". GPU")[0]
        message = (f"{case.id}: out of GPU memory at {make_plan(case.config, case.mode).tokens} tokens "
                   f"({allocated / 2**30:.1f} GiB allocated, {reserved / 2**30:.1f} GiB reserved at failure): "
                   f"{first_line}. The model set was evicted; the session goes on.")
    if message is not None:
        cache.evict()
        pytest.fail(message, pytrace=False)

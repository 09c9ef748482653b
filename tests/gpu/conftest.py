"""The GPU tier (`pytest -m gpu`): small-size checks of the code that only runs on a CUDA device. Every test here is
marked `gpu` and skipped, with the reason, where torch sees no CUDA device; on a GPU box it is part of the default
run. Each one skips naming what is missing (a package, a compute capability), never errors for it."""

import pytest
import torch

NO_CUDA = "needs a CUDA device: torch.cuda.is_available() is False (no GPU visible, or a CPU-only torch build)"


def pytest_collection_modifyitems(config, items):
    here = __file__.rsplit("/", 1)[0]
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason=NO_CUDA))


@pytest.fixture
def cuda():
    return torch.device("cuda", torch.cuda.current_device())

"""The GPU tier (`pytest -m gpu`): small-size checks of the code that only runs on a CUDA device. Every module here
is marked `gpu` (pytestmark) and every test is skipped, with the reason, where torch sees no CUDA device; on a GPU
box it is part of the default run. A test skips naming what else is missing (a package, a compute capability)."""

from pathlib import Path

import pytest
import torch

NO_CUDA = "needs a CUDA device: torch.cuda.is_available() is False (no GPU visible, or a CPU-only torch build)"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


@pytest.fixture
def cuda():
    return torch.device("cuda", torch.cuda.current_device())

"""Decoded frames leave the GPU through a page-locked staging block: the array is the tensor's values, in ordinary
(pageable) memory that the array owns, so the rounds a benchmark keeps pin nothing."""

import numpy as np
import pytest
import torch

from wan_pipeline.run.conditioning import host_array

pytestmark = pytest.mark.gpu


def test_host_array_is_the_tensor_in_memory_of_its_own(cuda):
    t = torch.randint(0, 256, (5, 64, 48, 3), dtype=torch.uint8, device=cuda)
    first = host_array(t)
    second = host_array(t + 1)  # the staging block is reused: the first array must not change under it
    assert first.flags.owndata and first.flags.c_contiguous and first.dtype == np.uint8
    assert np.array_equal(first, t.cpu().numpy())
    assert np.array_equal(second, (t + 1).cpu().numpy())


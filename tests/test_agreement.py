"""latent_agreement: test vectors for the cosine, the largest difference and the relative L2, and its refusals."""

import numpy as np
import pytest

from wan_pipeline.errors import WanBenchError
from wan_pipeline.measure.agreement import latent_agreement


def test_vectors():
    a = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    same = latent_agreement(a, a.copy())
    assert same == {"shape": [2, 2], "cosine": pytest.approx(1.0, abs=1e-15), "max_abs_diff": 0.0,
                    "relative_l2": 0.0}
    b = np.array([[0.0, 1.0], [2.0, 0.0]])
    other = latent_agreement(a, b)
    assert other["cosine"] == 0.0 and other["max_abs_diff"] == 2.0
    assert other["relative_l2"] == pytest.approx(np.sqrt(10) / np.sqrt(5))
    assert latent_agreement(a, -a)["cosine"] == pytest.approx(-1.0, abs=1e-15)
    assert latent_agreement(np.array([3.0, 4.0]), np.array([4.0, 3.0]))["cosine"] == pytest.approx(24 / 25)


def test_a_batch_axis_of_one_is_ignored_and_other_shapes_are_refused():
    a = np.arange(8.0).reshape(2, 4)
    assert latent_agreement(a[None], a)["cosine"] == pytest.approx(1.0)
    with pytest.raises(WanBenchError, match=r"ComfyUI \[2, 4\], wan-bench \[4, 2\]"):
        latent_agreement(a, a.reshape(4, 2), ("ComfyUI", "wan-bench"))
    with pytest.raises(WanBenchError, match="the b latent holds NaN"):
        latent_agreement(a, np.full_like(a, np.nan))

"""ComfyUI's sigma math, pinned to the values docs/comfyui.md gives (sections 1-5)."""

import numpy as np
import pytest

from wan_pipeline.plan import schedule

F32 = np.float32


def test_flow_table_endpoints_and_formula():
    table = schedule.flow_sigma_table(5.0)
    assert table.dtype == np.float32 and len(table) == 1000
    assert table[-1] == F32(1.0)
    t = F32(0.001)
    assert table[0] == F32(5.0) * t / (F32(1.0) + F32(4.0) * t)
    assert np.all(np.diff(table) > 0)


def test_shift_one_is_identity():
    assert np.array_equal(schedule.flow_sigma_table(1.0), (np.arange(1, 1001) / 1000).astype(np.float32))


@pytest.mark.parametrize("shift, expected", [
    (5.0, [1.0, 0.9375, 0.8333333, 0.625, 0.0]),
    (6.0, [1.0, 0.94736844, 0.85714287, 0.6666667, 0.0]),
])
def test_simple_scheduler_four_steps(shift, expected):
    sigmas = schedule.simple_sigmas(shift, 4)
    assert sigmas.dtype == np.float32
    assert np.array_equal(sigmas, np.array(expected, dtype=np.float32))


def test_simple_scheduler_twenty_steps_shape():
    sigmas = schedule.simple_sigmas(5.0, 20)
    assert len(sigmas) == 21 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert sigmas[10] == F32(0.8333333)  # the 20-step template splits at step 10: same sigma as 4-step split 2


def test_ksampler_advanced_slicing_pass1_keeps_leftover_noise():
    s = schedule.slice_sigmas(schedule.simple_sigmas(5.0, 4), 0, 2, return_with_leftover_noise=True)
    assert np.array_equal(s, np.array([1.0, 0.9375, 0.8333333], dtype=np.float32))


def test_ksampler_advanced_slicing_pass2():
    full = schedule.simple_sigmas(6.0, 4)
    for end in (4, 10000):
        s = schedule.slice_sigmas(full, 2, end, return_with_leftover_noise=False)
        assert np.array_equal(s, np.array([0.85714287, 0.6666667, 0.0], dtype=np.float32))


def test_slicing_forces_zero_only_when_not_returning_leftover_noise():
    full = schedule.simple_sigmas(5.0, 4)
    assert list(schedule.slice_sigmas(full, 0, 2, False)) == [F32(1.0), F32(0.9375), F32(0.0)]


def test_slicing_start_past_end_runs_nothing():
    assert len(schedule.slice_sigmas(schedule.simple_sigmas(5.0, 4), 4, 10000, False)) == 0


def test_timesteps_are_sigma_times_1000():
    t = schedule.model_timesteps(np.array([1.0, 0.9375, 0.8333333], dtype=np.float32))
    assert np.allclose(t, [1000.0, 937.5, 833.3333], atol=1e-4)


def test_handover_scale_shift5_to_shift6():
    scale = schedule.handover_scale(F32(0.8333333), F32(0.85714287))
    assert scale == pytest.approx((1 - 0.857143) / (1 - 0.833333), rel=1e-5)
    assert scale == pytest.approx(0.857143, abs=1e-6)


def test_handover_scale_equal_shifts_is_one():
    s5 = schedule.simple_sigmas(5.0, 4)
    assert schedule.handover_scale(s5[2], s5[2]) == 1.0

"""The metrics on real Wan 2.2 output: a real clip ranks above corrupted copies of it.

Clips come from `comfyui-workflow-templates-media-video` (an optional test dependency): `video_wan2_2_14B_i2v-1.webp`
(90 frames, 350x350) and its input image `video_wan2_2_14B_i2v-2.webp`. The first 48 frames keep the tests quick.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wan_pipeline.measure import metrics as M
from wan_pipeline.measure.media import read_frames, read_image

media = pytest.importorskip(
    "comfyui_workflow_templates_media_video",
    reason="optional test dependency comfyui-workflow-templates-media-video is not installed",
)
TEMPLATES = Path(media.__file__).parent / "templates"
CLIP = TEMPLATES / "video_wan2_2_14B_i2v-1.webp"
INPUT = TEMPLATES / "video_wan2_2_14B_i2v-2.webp"
OTHER_CLIPS = ["video_wan2_2_14B_t2v-1.webp", "video_wan2_2_14B_flf2v-1.webp", "video_wan2_2_14B_fun_camera-1.webp"]
FRAMES = 48


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path.name} is not in this version of comfyui-workflow-templates-media-video")
    return path


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return read_frames(_need(CLIP))[:FRAMES]


@pytest.fixture(scope="module")
def real(clip) -> dict:
    return M.compute_metrics(clip)


# --------------------------------------------------------------------------------- corruptions


def brightness_flicker(frames, rng):
    offsets = np.where(np.arange(len(frames)) % 2 == 0, 12, -12)
    return np.clip(frames.astype(np.int16) + offsets[:, None, None, None], 0, 255).astype(np.uint8)


def duplicate_and_drop(frames, rng):
    # Every 8 frames: frame 3 is shown twice and frames 4 and 5 are dropped (a hold, then a jump of 3 frames).
    idx = [i - 1 if i % 8 == 4 else i for i in range(len(frames)) if i % 8 != 5]
    return frames[idx]


def camera_shake(frames, rng):
    pad = 8
    shifts = rng.integers(-6, 7, (len(frames), 2))
    padded = np.pad(frames, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    h, w = frames.shape[1:3]
    return np.stack([padded[t, pad + dy : pad + dy + h, pad + dx : pad + dx + w] for t, (dy, dx) in enumerate(shifts)])


def frame_noise(frames, rng):
    return np.clip(frames + rng.normal(0, 8, frames.shape), 0, 255).astype(np.uint8)


def shuffled(frames, rng):
    return frames[rng.permutation(len(frames))]


# corruption -> metrics that must be worse than the real clip's ("lower" or "higher" is worse)
CORRUPTIONS = {
    "brightness_flicker": (brightness_flicker, {"flicker_score": "lower", "warp_error": "higher"}),
    "duplicate_and_drop": (duplicate_and_drop, {"ssim_min": "lower"}),
    "camera_shake": (camera_shake, {"flicker_score": "lower", "ssim_mean": "lower", "motion": "higher"}),
    "frame_noise": (frame_noise, {"flicker_score": "lower", "ssim_mean": "lower", "ssim_min": "lower",
                                  "warp_error": "higher"}),
    "shuffled": (shuffled, {"flicker_score": "lower", "ssim_mean": "lower", "warp_error": "higher",
                            "motion": "higher"}),
}


@pytest.fixture(scope="module")
def corrupted(clip) -> dict:
    """Metrics of each corrupted copy, computed on first use."""
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = M.compute_metrics(CORRUPTIONS[name][0](clip, np.random.default_rng(0)))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_real_clip_ranks_above_corrupted_copy(name, real, corrupted):
    worse = CORRUPTIONS[name][1]
    bad = corrupted(name)
    for key, direction in worse.items():
        if direction == "lower":
            assert bad[key] < real[key], f"{name}: {key} {bad[key]:.4f} is not below the real clip's {real[key]:.4f}"
        else:
            assert bad[key] > real[key], f"{name}: {key} {bad[key]:.4f} is not above the real clip's {real[key]:.4f}"


def test_margins_of_the_clearest_signals(real, corrupted):
    flick = corrupted("brightness_flicker")
    assert flick["warp_error"] > real["warp_error"] + 15  # the +-12 level swing is 24 levels per transition
    assert flick["motion"] == pytest.approx(real["motion"], rel=0.05)  # brightness is not taken for motion
    shake = corrupted("camera_shake")
    assert shake["motion"] > 2 * real["motion"]
    noise = corrupted("frame_noise")
    assert noise["ssim_mean"] < real["ssim_mean"] - 0.15


def test_real_clip_values_are_plausible(real):
    # A real Wan 2.2 clip moves (about 2 px a frame at 350x350) and changes little between frames.
    assert 0.95 < real["flicker_score"] < 1.0
    assert 0.5 < real["motion"] < 5.0
    assert real["warp_error"] < 5.0
    assert 0.6 < real["ssim_mean"] < 0.95


def test_frozen_clip_has_motion_near_zero(clip, real):
    frozen = M.compute_metrics(np.repeat(clip[:1], 16, axis=0))
    assert frozen["motion"] < 0.01 < real["motion"]
    # ... while every other score calls it perfect: motion is what catches it.
    assert frozen["flicker_score"] == 1.0 and frozen["ssim_min"] == pytest.approx(1.0)


def test_one_bad_transition_is_found(clip):
    bad = clip.copy()
    bad[30] = np.clip(bad[30].astype(np.int16) + 25, 0, 255).astype(np.uint8)
    assert M.compute_metrics(bad)["worst_transition"] in (29, 30)
    bad = clip.copy()
    bad[20] = np.clip(bad[20] + np.random.default_rng(1).normal(0, 12, bad[20].shape), 0, 255).astype(np.uint8)
    assert M.compute_metrics(bad)["worst_transition"] in (19, 20)


def test_first_frame_matches_its_own_input_image_best(clip):
    image = read_image(_need(INPUT))
    own_ssim, own_psnr = M.first_frame_ssim(clip, image), M.first_frame_psnr(clip, image)
    assert own_ssim > 0.8 and own_psnr > 22.0
    for name in OTHER_CLIPS:
        other = read_frames(_need(TEMPLATES / name))[:2]
        assert M.first_frame_ssim(other, image) < own_ssim - 0.3, name
        assert M.first_frame_psnr(other, image) < own_psnr - 10.0, name


def test_shipped_quality_thresholds_pass_the_real_clip_and_catch_corruptions(clip, real, corrupted):
    from wan_pipeline.plan.budgets import load_budgets

    thresholds = load_budgets().quality_for("seed-832x1216-49f")
    assert thresholds.violations(real) == []
    for name in ("brightness_flicker", "camera_shake", "frame_noise", "shuffled"):
        assert thresholds.violations(corrupted(name)), name
    frozen = M.compute_metrics(np.repeat(clip[:1], 16, axis=0))
    assert thresholds.violations(frozen) == [f"motion = {frozen['motion']:.4f} (below 0.2)"]

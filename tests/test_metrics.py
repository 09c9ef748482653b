"""metrics.py on synthetic clips whose answers are known, and the `wan-bench metrics` command."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from wan_pipeline.cli.main import main
from wan_pipeline.errors import WanBenchError
from wan_pipeline.measure import metrics as M
from wan_pipeline.measure.media import resize_center_crop

IMAGE_KEYS = ("first_frame_ssim", "first_frame_psnr")


def texture(h: int, w: int, sigma: float = 12.0, seed: int = 0) -> np.ndarray:
    """A smooth random colour texture, uint8, spanning 0..255."""
    rng = np.random.default_rng(seed)
    t = gaussian_filter(rng.random((h, w, 3)), (sigma, sigma, 0))
    t = (t - t.min()) / (t.max() - t.min())
    return (t * 255).round().astype(np.uint8)


def panning(frames: int, h: int, w: int, dy: int, dx: int, sigma: float = 12.0, seed: int = 0) -> np.ndarray:
    """A window moving (dy, dx) pixels a frame over a larger texture: content moves by (-dy, -dx) per frame."""
    m = 8
    big = texture(h + abs(dy) * frames + 2 * m, w + abs(dx) * frames + 2 * m, sigma, seed)
    y0 = m if dy >= 0 else m + abs(dy) * frames
    x0 = m if dx >= 0 else m + abs(dx) * frames
    return np.stack([big[y0 + t * dy : y0 + t * dy + h, x0 + t * dx : x0 + t * dx + w] for t in range(frames)])


# ------------------------------------------------------------------------------------------ flicker, SSIM


def test_flicker_score_is_vbench_formula():
    frames = np.stack([np.full((32, 32, 3), v, np.uint8) for v in (100, 110, 100, 130)])
    # |diffs| 10, 10, 30 -> mean 50/3
    assert M.flicker_score(frames) == pytest.approx((255 - 50 / 3) / 255)
    np.testing.assert_allclose(M.transition_mae(frames), [10, 10, 30])
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (5, 20, 24, 3), dtype=np.uint8)
    direct = np.mean([np.abs(noise[t + 1].astype(int) - noise[t]).mean() for t in range(4)])
    assert M.flicker_score(noise) == pytest.approx((255 - direct) / 255, rel=1e-12)
    assert M.flicker_score(np.repeat(noise[:1], 3, axis=0)) == 1.0


def test_scales_follow_the_documented_rules():
    assert M.ssim_scale(1216, 832) == 3  # Wang et al.: round(832 / 256)
    assert M.ssim_scale(350, 350) == 1
    assert M.ssim_scale(480, 832) == 2
    assert M.flow_scale(1216, 832) == 8
    assert M.flow_scale(350, 350) == 3
    assert M.flow_scale(152, 104) == 1  # tiny mode: flow at full resolution


def test_ssim_series_is_skimage_ssim_of_luma():
    from skimage.metrics import structural_similarity

    clip = panning(3, 64, 80, 0, 2, sigma=3)
    luma = clip[..., 0] * 0.299 + clip[..., 1] * 0.587 + clip[..., 2] * 0.114
    expected = [structural_similarity(luma[t], luma[t + 1], data_range=255, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False) for t in range(2)]
    np.testing.assert_allclose(M.ssim_series(clip), expected, rtol=1e-5)
    assert M.ssim_series(np.repeat(clip[:1], 2, axis=0))[0] == pytest.approx(1.0)
    assert M.ssim_mean(clip) == pytest.approx(np.mean(expected), rel=1e-5)
    assert M.ssim_min(clip) == pytest.approx(min(expected), rel=1e-5)


# ------------------------------------------------------------------------------------------ flow


@pytest.mark.parametrize("dy, dx", [(0, 1), (2, 0), (3, -4), (0, 8)])
def test_translated_texture_motion_equals_shift(dy, dx):
    clip = panning(5, 416, 608, dy, dx)  # flow scale 4: 1 px here is a quarter pixel at the flow resolution
    series = M.flow_series(clip)
    shift = float(np.hypot(dy, dx))
    np.testing.assert_allclose(series["motion"], shift, rtol=0.05)
    assert M.motion(clip) == pytest.approx(shift, rel=0.05)
    # Motion is compensated: the warp error is a small fraction of the raw frame difference.
    mae = M.transition_mae(clip).mean()
    assert series["warp_error"].max() < 0.25
    assert series["warp_error"].mean() < 0.1 * mae
    # Only the strip entering the frame is left out (it has no source in the previous frame).
    assert series["occluded"].max() < 0.05


def test_motion_is_in_pixels_at_the_clip_resolution_832x1216():
    clip = panning(3, 1216, 832, 4, 3, sigma=20)  # flow runs 8x smaller; magnitudes scaled back
    assert M.flow_scale(1216, 832) == 8
    assert M.motion(clip) == pytest.approx(5.0, rel=0.05)
    assert M.warp_error(clip) < 0.25


def test_frozen_clip_has_no_motion_and_no_error():
    clip = np.repeat(texture(96, 128)[None], 4, axis=0)
    result = M.compute_metrics(clip)
    assert result["motion"] == 0.0
    assert result["warp_error"] == pytest.approx(0.0, abs=1e-9)
    assert result["flicker_score"] == 1.0
    assert result["ssim_min"] == pytest.approx(1.0)


def test_brightness_flicker_shows_in_warp_error_not_in_motion():
    clip = panning(6, 128, 160, 0, 2)
    offsets = np.array([0, 20, 0, 20, 0, 20])
    flick = np.clip(clip.astype(int) + offsets[:, None, None, None], 0, 255).astype(np.uint8)
    steady = M.flow_series(clip)
    flicker = M.flow_series(flick)
    assert steady["warp_error"].mean() < 1.0
    assert 17.0 < flicker["warp_error"].mean() < 21.0  # the 20-level step, minus the clipped pixels
    np.testing.assert_allclose(flicker["motion"], steady["motion"], atol=0.1)  # global brightness is not motion
    assert M.flicker_score(flick) < M.flicker_score(clip)


def test_occlusion_mask_leaves_out_uncovered_background():
    bg = texture(128, 128, sigma=4, seed=1)
    obj = texture(40, 40, sigma=4, seed=2)
    frames = []
    for t in range(2):
        f = bg.copy()
        f[44:84, 20 + 12 * t : 60 + 12 * t] = obj  # an object moving 12 px right over a still background
        frames.append(f)
    series = M.flow_series(np.stack(frames))
    # 12 x 40 px of background appear and 12 x 40 disappear: about 3 % each of the 128 x 128 frame.
    assert 0.01 < series["occluded"][0] < 0.25
    visible_error = series["warp_error"][0]
    raw = M.transition_mae(np.stack(frames))[0]
    assert visible_error < raw


def test_per_frame_noise_raises_warp_error_and_lowers_ssim():
    clip = panning(5, 128, 160, 1, 1)
    rng = np.random.default_rng(0)
    noisy = np.clip(clip + rng.normal(0, 10, clip.shape), 0, 255).astype(np.uint8)
    clean, dirty = M.compute_metrics(clip), M.compute_metrics(noisy)
    assert dirty["warp_error"] > clean["warp_error"] + 2.0
    assert dirty["ssim_mean"] < clean["ssim_mean"] - 0.1
    assert dirty["flicker_score"] < clean["flicker_score"]


def test_worst_transition_points_at_the_one_bad_transition():
    clip = panning(9, 96, 128, 0, 1)
    bad = clip.copy()
    bad[6] = np.clip(bad[6].astype(int) + 30, 0, 255)  # one glitched frame: transitions 5 and 6 touch it
    result = M.compute_metrics(bad)
    assert result["worst_transition"] in (5, 6)
    series = result["transitions"]["warp_error"]
    assert min(series[5], series[6]) > 5 * max(series[:5] + series[7:])
    cut = np.concatenate([clip[:4], panning(5, 96, 128, 0, 1, seed=7)])  # a scene cut between frames 3 and 4
    assert M.compute_metrics(cut)["worst_transition"] == 3
    assert M.worst_transition(np.array([1.0, 3.0, 3.0]), np.array([0.9, 0.8, 0.5])) == 2  # tie: lower SSIM


# ------------------------------------------------------------------------------------------ first frame


def test_first_frame_matches_the_resized_input_image():
    image = texture(300, 500, sigma=4)  # landscape input, portrait clip: the centre is cropped
    ref = resize_center_crop(image, 96, 128)
    clip = np.stack([ref, np.roll(ref, 2, axis=1)])
    assert M.first_frame_psnr(clip, image) == M.PSNR_CAP_DB
    assert M.first_frame_ssim(clip, image) == pytest.approx(1.0)
    # A plain stretch (no crop) is a different picture: the crop is what the pipeline does.
    stretched = np.asarray(Image.fromarray(image).resize((96, 128), Image.BILINEAR))
    assert M.first_frame_ssim(np.stack([stretched, stretched]), image) < 0.8
    other = texture(300, 500, sigma=4, seed=5)
    assert M.first_frame_psnr(clip, other) < 20.0
    assert M.first_frame_ssim(clip, other) < 0.5


def test_psnr_value():
    a = np.zeros((10, 10, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 30  # MSE = 900 / 300 = 3
    assert M.psnr(a, b) == pytest.approx(10 * np.log10(255**2 / 3))


# ------------------------------------------------------------------------------------------ compute_metrics


def test_compute_metrics_keys_and_json():
    clip = panning(4, 64, 96, 1, 0)
    result = M.compute_metrics(clip)
    assert tuple(k for k in result if k != "transitions") == M.METRIC_KEYS
    assert result["frames"] == 4 and result[IMAGE_KEYS[0]] is None and result[IMAGE_KEYS[1]] is None
    for key in M.METRIC_KEYS:
        assert result[key] is None or type(result[key]) in (int, float), key
    assert set(result["transitions"]) == {"mae", "ssim", "warp_error", "motion", "occluded"}
    assert all(len(v) == 3 and all(type(x) is float for x in v) for v in result["transitions"].values())
    json.dumps(result, allow_nan=False)
    with_image = M.compute_metrics(clip, clip[0])
    assert with_image["first_frame_psnr"] == M.PSNR_CAP_DB
    assert {k: v for k, v in with_image.items() if k not in IMAGE_KEYS} == \
        {k: v for k, v in result.items() if k not in IMAGE_KEYS}


@pytest.mark.parametrize(
    "frames, message",
    [
        (np.zeros((1, 32, 32, 3), np.uint8), "clip.mp4: a single frame: temporal metrics need at least 2"),
        (np.zeros((3, 32, 32, 3), np.float32), "clip.mp4: expected uint8 frames"),
        (np.zeros((3, 32, 32), np.uint8), r"clip.mp4: expected frames of shape \(T, H, W, 3\)"),
        (np.zeros((3, 8, 32, 3), np.uint8), "clip.mp4: frames of 32x8 are too small"),
    ],
)
def test_bad_frames_raise_a_named_error(frames, message):
    with pytest.raises(M.MetricsError, match=message) as info:
        M.compute_metrics(frames, name="clip.mp4")
    assert isinstance(info.value, WanBenchError)


def test_metrics_modules_do_not_import_torch():
    code = ("import sys, wan_pipeline.measure.metrics, wan_pipeline.measure.media, wan_pipeline.cli.metrics; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=str(_repo_root())).returncode == 0


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def png_clip(tmp_path):
    clip = panning(4, 64, 96, 0, 2)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(clip):
        Image.fromarray(f).save(folder / f"{i:04d}.png")
    Image.fromarray(texture(80, 80, seed=3)).save(tmp_path / "input.png")
    return clip, folder, tmp_path / "input.png"


def test_cli_json(png_clip, capsys):
    clip, folder, image = png_clip
    assert main(["metrics", str(folder), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == list(M.METRIC_KEYS) + ["transitions"]
    assert out["frames"] == 4 and out["first_frame_ssim"] is None and out["first_frame_psnr"] is None
    assert out["flicker_score"] == pytest.approx(M.flicker_score(clip))
    assert main(["metrics", str(folder), "--image", str(image), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.0 < out["first_frame_psnr"] < 30.0 and -1.0 <= out["first_frame_ssim"] < 1.0


def test_cli_text(png_clip, capsys):
    _, folder, image = png_clip
    assert main(["metrics", str(folder), "--image", str(image)]) == 0
    text = capsys.readouterr().out
    for key in M.METRIC_KEYS[1:]:
        assert key in text
    assert "4 frames, 96x64" in text


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, png_clip, capsys):
    _, folder, _ = png_clip
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "still.png")
    (tmp_path / "broken.png").write_text("not a picture")
    (tmp_path / "empty.mp4").write_bytes(b"")
    cases = [
        (["metrics", str(tmp_path / "nothing.mp4")], "nothing.mp4: no such video file"),
        (["metrics", str(tmp_path / "empty.mp4")], "empty.mp4: the file is empty"),
        (["metrics", str(tmp_path / "still.png")], "still.png: a single frame"),
        (["metrics", str(folder), "--image", str(tmp_path / "broken.png")], "broken.png: cannot be read as an image"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert err.startswith("wan-bench metrics: error: ") and message in err, err
        assert "\n" not in err and "Traceback" not in err

"""Temporal-consistency metrics of a generated clip: frames in, numbers out (numpy + scikit-image, no torch).

Frames are (T, H, W, 3) uint8; the optional input image is (h, w, 3) uint8 of any size. A transition `t` is the step
from frame `t` to frame `t + 1`. Conventions (each pinned by tests):

- `flicker_score`: VBench's temporal flickering, `(255 - MAE) / 255` with MAE the mean absolute difference of
  consecutive RGB frames in grey levels, averaged over transitions. 1.0 is a frozen clip; higher is steadier.
- SSIM (`ssim_mean`, `ssim_min`, `first_frame_ssim`): scikit-image `structural_similarity` on the BT.601 luma, with
  Wang et al.'s settings (Gaussian window sigma 1.5, population covariance) and their downsampling rule: frames are
  box-averaged by `max(1, round(min(H, W) / 256))` first (3 at 832x1216, 1 at 350x350).
- Optical flow: scikit-image `optical_flow_ilk` on luma box-averaged by an integer factor
  `max(1, min(H, W) // 104)` (8 at 832x1216, 3 at 350x350); displacements are multiplied by that factor, so
  `motion` is in pixels per frame at the clip's resolution.
- `warp_error`: frame `t` warped onto frame `t + 1` with the backward flow (cubic interpolation), mean absolute RGB
  difference in grey levels at the flow resolution, over the pixels that the forward-backward consistency check (Sundaram et al. 2010, as in
  Lai et al. 2018) marks visible and whose source lies inside the frame. Motion is compensated, so a panning
  camera scores low and flicker, noise or a jump scores high.
- `motion`: mean flow magnitude, pixels per frame at the clip's resolution. A frozen clip has motion 0 and would
  otherwise look perfectly consistent.
- `first_frame_ssim` / `first_frame_psnr`: frame 0 against the input image center-cropped and resized to the clip's
  size as the pipeline does (`video.resize_center_crop`); PSNR on RGB, capped at 100 dB (identical pictures).
- `worst_transition`: the transition with the highest warp error (ties: the lowest SSIM).
"""

from __future__ import annotations

import math

import numpy as np

from wan_pipeline.errors import WanBenchError

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # BT.601
SSIM_TARGET_SIDE = 256  # Wang et al.: downsample by round(min(H, W) / 256) before SSIM
FLOW_MIN_SIDE = 104  # optical flow runs at the largest integer downscale keeping the short side >= 104 px
FLOW_RADIUS = 7
FLOW_WARPS = 3
OCCLUSION_ALPHA1 = 0.01  # forward-backward check: |w + w'|^2 > a1 (|w|^2 + |w'|^2) + a2 marks a pixel occluded
OCCLUSION_ALPHA2 = 0.5
PSNR_CAP_DB = 100.0
MIN_SIDE = 16

METRIC_KEYS = (
    "frames", "flicker_score", "ssim_mean", "ssim_min", "warp_error", "motion", "first_frame_ssim",
    "first_frame_psnr", "worst_transition",
)


class MetricsError(WanBenchError, ValueError):
    """Frames or an image the metrics cannot use; the message names the source and what is wrong."""


# --------------------------------------------------------------------------------------------------- checks


def _label(name: str | None, what: str) -> str:
    return f"{name}: " if name else f"{what}: "


def check_frames(frames: np.ndarray, name: str | None = None, min_frames: int = 2) -> np.ndarray:
    """Validate (T, H, W, 3) uint8 frames; `name` (a file) goes into the error message."""
    label = _label(name, "frames")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise MetricsError(f"{label}expected frames of shape (T, H, W, 3), got {frames.shape}")
    if frames.dtype != np.uint8:
        raise MetricsError(f"{label}expected uint8 frames, got {frames.dtype}")
    t, h, w, _ = frames.shape
    if t < min_frames:
        raise MetricsError(
            f"{label}{'a single frame' if t == 1 else f'{t} frames'}: temporal metrics need at least {min_frames}"
        )
    if min(h, w) < MIN_SIDE:
        raise MetricsError(f"{label}frames of {w}x{h} are too small (the metrics need at least {MIN_SIDE} px a side)")
    return frames


def _check_image(image: np.ndarray, name: str | None = None) -> np.ndarray:
    label = _label(name, "image")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) == 0:
        raise MetricsError(f"{label}expected an image of shape (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise MetricsError(f"{label}expected a uint8 image, got {image.dtype}")
    return image


# --------------------------------------------------------------------------------------------------- helpers


def ssim_scale(height: int, width: int) -> int:
    """Wang et al.'s SSIM downsampling factor for a picture of this size."""
    return max(1, round(min(height, width) / SSIM_TARGET_SIDE))


def flow_scale(height: int, width: int) -> int:
    """Integer factor the optical flow runs below the clip's resolution."""
    return max(1, min(height, width) // FLOW_MIN_SIDE)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma in grey levels (float32) of (..., 3) uint8 or float pixels."""
    r, g, b = (np.float32(c) for c in LUMA_WEIGHTS)
    return rgb[..., 0] * r + rgb[..., 1] * g + rgb[..., 2] * b


def _block_mean(img: np.ndarray, k: int) -> np.ndarray:
    """Box-average (H, W) or (H, W, C) by k x k blocks (the last H % k rows and W % k columns dropped), float32."""
    if k == 1:
        return img.astype(np.float32, copy=False)
    h, w = img.shape[0] // k, img.shape[1] // k
    rest = img.shape[2:]
    inner = int(np.prod(rest, dtype=np.int64)) if rest else 1
    acc_dtype = np.uint32 if img.dtype == np.uint8 else np.float32
    rows = img[: h * k, : w * k].reshape(h, k, w * k * inner).sum(axis=1, dtype=acc_dtype)
    blocks = rows.reshape((h, w, k) + rest).sum(axis=2, dtype=np.float32)
    return blocks / np.float32(k * k)


def _ssim_plane(frame: np.ndarray, k: int) -> np.ndarray:
    return _block_mean(_luma(frame), k)


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, data_range=255.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


# --------------------------------------------------------------------------------------------------- flicker, SSIM


def transition_mae(frames: np.ndarray) -> np.ndarray:
    """Mean absolute difference of consecutive frames, grey levels, one value per transition (T - 1,)."""
    frames = check_frames(frames)
    n = frames[0].size
    out = np.empty(len(frames) - 1, dtype=np.float64)
    for t in range(len(frames) - 1):
        a, b = frames[t], frames[t + 1]
        out[t] = int((np.maximum(a, b) - np.minimum(a, b)).sum(dtype=np.uint64)) / n
    return out


def flicker_score(frames: np.ndarray) -> float:
    """VBench temporal flickering: (255 - mean |f[t+1] - f[t]|) / 255; 1.0 for a frozen clip, higher is steadier."""
    return _flicker(transition_mae(frames))


def _flicker(mae: np.ndarray) -> float:
    return float((255.0 - mae.mean()) / 255.0)


def ssim_series(frames: np.ndarray) -> np.ndarray:
    """SSIM of each pair of consecutive frames (T - 1,)."""
    frames = check_frames(frames)
    k = ssim_scale(*frames.shape[1:3])
    out = np.empty(len(frames) - 1, dtype=np.float64)
    prev = _ssim_plane(frames[0], k)
    for t in range(1, len(frames)):
        cur = _ssim_plane(frames[t], k)
        out[t - 1] = _ssim(prev, cur)
        prev = cur
    return out


def ssim_mean(frames: np.ndarray) -> float:
    return float(ssim_series(frames).mean())


def ssim_min(frames: np.ndarray) -> float:
    return float(ssim_series(frames).min())


# --------------------------------------------------------------------------------------------------- flow


def _flow(reference: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """(2, h, w) displacement v with `moving(p + v(p)) ~ reference(p)` (scikit-image convention)."""
    from skimage.registration import optical_flow_ilk

    return optical_flow_ilk(reference, moving, radius=FLOW_RADIUS, num_warp=FLOW_WARPS, gaussian=False,
                            prefilter=False)


def _sample(img: np.ndarray, rows: np.ndarray, cols: np.ndarray, order: int = 1) -> np.ndarray:
    """Bilinear sample of (h, w) or (h, w, C) at float coordinates (edge values outside)."""
    from scipy.ndimage import map_coordinates

    coords = np.stack([rows, cols])
    if img.ndim == 2:
        return map_coordinates(img, coords, order=order, mode="nearest")
    return np.stack([map_coordinates(img[..., c], coords, order=order, mode="nearest") for c in range(img.shape[2])],
                    axis=-1)


def warp_transition(rgb0: np.ndarray, rgb1: np.ndarray, grey0: np.ndarray, grey1: np.ndarray) -> dict:
    """Warp error and motion of one transition at the flow resolution (inputs already downscaled, float32).

    Returns warp_error (grey levels), motion (pixels at this resolution), occluded (fraction of pixels left out).
    """
    h, w = grey0.shape
    back = _flow(grey1, grey0)  # pixel p of frame 1 came from p + back(p) in frame 0
    fwd = _flow(grey0, grey1)  # pixel q of frame 0 went to q + fwd(q) in frame 1
    rr, cc = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    src_r, src_c = rr + back[0], cc + back[1]
    warped = _sample(rgb0, src_r, src_c, order=3)
    fwd_at = np.stack([_sample(fwd[0], src_r, src_c), _sample(fwd[1], src_r, src_c)])
    back_sq = back[0] ** 2 + back[1] ** 2
    mismatch = (back[0] + fwd_at[0]) ** 2 + (back[1] + fwd_at[1]) ** 2
    inconsistent = mismatch > OCCLUSION_ALPHA1 * (back_sq + fwd_at[0] ** 2 + fwd_at[1] ** 2) + OCCLUSION_ALPHA2
    outside = (src_r < 0) | (src_r > h - 1) | (src_c < 0) | (src_c > w - 1)
    visible = ~(inconsistent | outside)
    err = np.abs(rgb1 - warped).mean(axis=-1)
    # With nothing visible (a cut, noise), judge every pixel rather than none.
    warp_err = float(err[visible].mean()) if visible.any() else float(err.mean())
    return {
        "warp_error": warp_err,
        "motion": float(np.sqrt(back_sq).mean()),
        "occluded": float(1.0 - visible.mean()),
    }


def _flow_plane(rgb: np.ndarray) -> np.ndarray:
    """Luma in [0, 1] with its mean removed: a global brightness change is not taken for motion."""
    grey = _luma(rgb) / np.float32(255.0)
    return grey - grey.mean(dtype=np.float32)


def flow_series(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Per-transition warp_error (grey levels), motion (pixels per frame at the clip's resolution), occluded."""
    frames = check_frames(frames)
    k = flow_scale(*frames.shape[1:3])
    n = len(frames) - 1
    out = {key: np.empty(n, dtype=np.float64) for key in ("warp_error", "motion", "occluded")}
    rgb_prev = _block_mean(frames[0], k)
    grey_prev = _flow_plane(rgb_prev)
    for t in range(n):
        rgb_cur = _block_mean(frames[t + 1], k)
        grey_cur = _flow_plane(rgb_cur)
        res = warp_transition(rgb_prev, rgb_cur, grey_prev, grey_cur)
        out["warp_error"][t] = res["warp_error"]
        out["motion"][t] = res["motion"] * k
        out["occluded"][t] = res["occluded"]
        rgb_prev, grey_prev = rgb_cur, grey_cur
    return out


def warp_error(frames: np.ndarray) -> float:
    """Mean flow-compensated error (grey levels) over transitions, occluded pixels left out."""
    return float(flow_series(frames)["warp_error"].mean())


def motion(frames: np.ndarray) -> float:
    """Mean optical-flow magnitude, pixels per frame at the clip's resolution."""
    return float(flow_series(frames)["motion"].mean())


# --------------------------------------------------------------------------------------------------- first frame


def reference_frame(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The input image as the pipeline conditions on it: center-cropped and resized to the clip's size."""
    from wan_pipeline.measure.media import resize_center_crop

    return resize_center_crop(_check_image(image), width, height)


def _first_frame_pair(frames: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    frames = check_frames(frames, min_frames=1)
    h, w = frames.shape[1:3]
    return frames[0], reference_frame(image, w, h)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 pictures, capped at 100 dB (identical pictures)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse <= 0.0:
        return PSNR_CAP_DB
    return float(min(PSNR_CAP_DB, 10.0 * math.log10(255.0 ** 2 / mse)))


def _pair_ssim(f0: np.ndarray, ref: np.ndarray) -> float:
    k = ssim_scale(*f0.shape[:2])
    return _ssim(_ssim_plane(f0, k), _ssim_plane(ref, k))


def _first_frame_scores(frames: np.ndarray, image: np.ndarray) -> tuple[float, float]:
    """(SSIM, PSNR) of frame 0 against the input image as the pipeline resizes it (resized once for both)."""
    f0, ref = _first_frame_pair(frames, image)
    return _pair_ssim(f0, ref), psnr(f0, ref)


def first_frame_ssim(frames: np.ndarray, image: np.ndarray) -> float:
    """SSIM of frame 0 against the input image as the pipeline resizes it."""
    return _pair_ssim(*_first_frame_pair(frames, image))


def first_frame_psnr(frames: np.ndarray, image: np.ndarray) -> float:
    """PSNR (dB, RGB) of frame 0 against the input image as the pipeline resizes it."""
    return psnr(*_first_frame_pair(frames, image))


# --------------------------------------------------------------------------------------------------- all


def worst_transition(warp_errors: np.ndarray, ssims: np.ndarray) -> int:
    """Index t of the worst transition (frame t -> t + 1): the highest warp error, ties broken by the lowest SSIM."""
    order = np.lexsort((np.asarray(ssims), -np.asarray(warp_errors)))
    return int(order[0])


def compute_metrics(frames: np.ndarray, image: np.ndarray | None = None, name: str | None = None) -> dict:
    """All metrics of a clip as a JSON-ready dict (plain floats and ints).

    Keys: frames, flicker_score, ssim_mean, ssim_min, warp_error, motion, first_frame_ssim, first_frame_psnr
    (None without an image), worst_transition, and `transitions` with the per-transition series
    (mae, ssim, warp_error, motion, occluded). `name` labels error messages (the video file).
    """
    frames = check_frames(frames, name)
    if image is not None:
        image = _check_image(image, f"{name} (input image)" if name else None)
    mae = transition_mae(frames)
    ssims = ssim_series(frames)
    flows = flow_series(frames)
    result = {
        "frames": int(len(frames)),
        "flicker_score": _flicker(mae),
        "ssim_mean": float(ssims.mean()),
        "ssim_min": float(ssims.min()),
        "warp_error": float(flows["warp_error"].mean()),
        "motion": float(flows["motion"].mean()),
        "first_frame_ssim": None,
        "first_frame_psnr": None,
        "worst_transition": worst_transition(flows["warp_error"], ssims),
        "transitions": {
            "mae": [float(v) for v in mae],
            "ssim": [float(v) for v in ssims],
            "warp_error": [float(v) for v in flows["warp_error"]],
            "motion": [float(v) for v in flows["motion"]],
            "occluded": [float(v) for v in flows["occluded"]],
        },
    }
    if image is not None:
        result["first_frame_ssim"], result["first_frame_psnr"] = _first_frame_scores(frames, image)
    return result

"""Video and image files in and out, and ComfyUI's center-crop resize. No torch here.

- `read_frames(path)`: mp4 (and anything else ffmpeg reads), animated WebP, GIF, or a folder of PNG frames (sorted by
  name) -> (T, H, W, 3) uint8.
- `read_image(path)`: one picture -> (H, W, 3) uint8, loaded as ComfyUI's LoadImage does (EXIF rotation applied,
  alpha dropped, grey and palette images expanded to RGB, 16-bit scaled to 8-bit).
- `write_video(frames, path, fps)`: H.264 mp4 (yuv420p, CRF 12) or animated WebP, chosen by suffix, written to a
  temporary file in the same folder and moved into place, so an existing file is never left half-overwritten.
- `center_crop_box` / `resize_center_crop`: ComfyUI `common_upscale(..., "bilinear", crop="center")`.

Every bad file raises `VideoReadError` (or `VideoWriteError`), a `WanBenchError` whose message names the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from wan_pipeline.errors import WanBenchError

PIL_SEQUENCE_SUFFIXES = (".webp", ".gif", ".png", ".apng", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
FRAME_FOLDER_SUFFIX = ".png"
MP4_CRF = 12  # visually lossless for generated video; the default 23 would blur the very detail metrics look at
WEBP_QUALITY = 90


class VideoReadError(WanBenchError, ValueError):
    """A video or image that cannot be read; the message names the file and what is wrong."""


class VideoWriteError(WanBenchError, ValueError):
    """Frames that cannot be written to the requested file; the message names the file and the reason."""


# --------------------------------------------------------------------------------------------------- reading


def _check_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise VideoReadError(f"{path}: no such {what}")
    if path.is_file() and path.stat().st_size == 0:
        raise VideoReadError(f"{path}: the file is empty (0 bytes)")


def _pil_to_rgb(im, path: Path) -> np.ndarray:
    """One PIL frame -> (H, W, 3) uint8, as ComfyUI's LoadImage converts it (alpha dropped)."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(im, dtype=np.float64)
        scale = 65535.0 if arr.max(initial=0) > 255 or im.mode.startswith("I;16") else 255.0
        grey = np.clip(np.rint(arr * (255.0 / scale)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        grey = np.clip(np.rint(arr * 255.0 if arr.max(initial=0) <= 1.0 else arr), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise VideoReadError(f"{path}: unexpected picture shape {arr.shape}")
    return arr


def _read_pil_sequence(path: Path) -> list[np.ndarray]:
    from PIL import Image, ImageSequence, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return [_pil_to_rgb(frame, path) for frame in ImageSequence.Iterator(im)]
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, VideoReadError):
            raise
        raise VideoReadError(f"{path}: cannot be decoded as an image or animation ({exc})") from exc


def _imageio_ffmpeg(path: Path, error: type[Exception]):
    """imageio-ffmpeg (its bundled ffmpeg reads and writes mp4), or `error` naming the file and the fix."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise error(f"{path}: mp4 needs imageio-ffmpeg, which is not installed (pip install imageio-ffmpeg; "
                    f"or use .webp)") from None
    return imageio_ffmpeg


def expected_frame_count(meta: dict) -> int | None:
    """The frame count a container's header promises: its duration times its frame rate (ffmpeg prints the duration
    to 10 ms, well under a frame at video rates); None when the header gives neither."""
    duration, fps = meta.get("duration"), meta.get("fps")
    if not isinstance(duration, (int, float)) or not isinstance(fps, (int, float)) or duration <= 0 or fps <= 0:
        return None
    return round(duration * fps)


def is_truncated(read: int, expected: int) -> bool:
    """Fewer frames than the header promises, beyond a slack of one frame or 2 %: a container's duration may run
    past its video stream (a longer audio track, rounding, a variable frame rate); a clip cut short misses more."""
    return read < expected - max(1, round(0.02 * expected))


def _read_ffmpeg(path: Path, allow_partial: bool = False) -> list[np.ndarray]:
    imageio_ffmpeg = _imageio_ffmpeg(path, VideoReadError)

    frames: list[np.ndarray] = []
    gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        meta = next(gen)
        width, height = (int(v) for v in meta["size"])
        if width <= 0 or height <= 0:
            raise VideoReadError(f"{path}: the video stream has no size ({width}x{height})")
        frame_bytes = width * height * 3
        for buf in gen:
            if len(buf) != frame_bytes:
                raise VideoReadError(f"{path}: truncated frame {len(frames)} ({len(buf)} of {frame_bytes} bytes)")
            frames.append(np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3).copy())
    except VideoReadError:
        raise
    except (OSError, RuntimeError, StopIteration, KeyError, ValueError) as exc:
        message = str(exc).strip().splitlines()
        detail = message[-1] if message else type(exc).__name__
        raise VideoReadError(f"{path}: cannot be decoded as video ({detail})") from exc
    finally:
        gen.close()
    expected = expected_frame_count(meta)
    if expected is not None and frames and is_truncated(len(frames), expected):
        message = (f"{path}: truncated: {len(frames)} of {expected} frames read (the header says "
                   f"{meta['duration']} s at {meta['fps']:g} fps)")
        if not allow_partial:
            raise VideoReadError(message + "; the file is cut short or damaged")
        import warnings

        warnings.warn(message + "; going on with the frames read", stacklevel=3)
    return frames


def _read_frame_folder(path: Path) -> list[np.ndarray]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == FRAME_FOLDER_SUFFIX)
    if not files:
        raise VideoReadError(f"{path}: the folder holds no {FRAME_FOLDER_SUFFIX} frames")
    frames = []
    for f in files:
        frame = read_image(f)
        if frames and frame.shape != frames[0].shape:
            raise VideoReadError(
                f"{f}: frame size {frame.shape[1]}x{frame.shape[0]} differs from the first frame's "
                f"{frames[0].shape[1]}x{frames[0].shape[0]} ({files[0].name})"
            )
        frames.append(frame)
    return frames


def read_frames(path: str | os.PathLike, allow_partial: bool = False) -> np.ndarray:
    """All frames of a video file or a folder of PNG frames, as a (T, H, W, 3) uint8 array. A video holding fewer
    frames than its header promises is a VideoReadError naming both counts (with `allow_partial`: a warning, and the
    frames read)."""
    path = Path(path)
    _check_exists(path, "video file or frame folder")
    if path.is_dir():
        frames = _read_frame_folder(path)
    elif path.suffix.lower() in PIL_SEQUENCE_SUFFIXES:
        frames = _read_pil_sequence(path)
    else:
        frames = _read_ffmpeg(path, allow_partial)
    if not frames:
        raise VideoReadError(f"{path}: the video holds no frames")
    if any(f.shape != frames[0].shape for f in frames):
        raise VideoReadError(f"{path}: frames differ in size")
    return np.stack(frames)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One picture as (H, W, 3) uint8 (the first frame of an animation), loaded as ComfyUI's LoadImage does."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    _check_exists(path, "image file")
    if path.is_dir():
        raise VideoReadError(f"{path}: is a folder, not an image file")
    try:
        with Image.open(path) as im:
            im.seek(0)
            im = ImageOps.exif_transpose(im)
            return _pil_to_rgb(im, path)
    except VideoReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise VideoReadError(f"{path}: cannot be read as an image ({exc})") from exc


# --------------------------------------------------------------------------------------------------- writing


def _check_frames(frames: np.ndarray, path: Path) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape[:3]) == 0:
        raise VideoWriteError(f"{path}: frames must be a non-empty (T, H, W, 3) array, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise VideoWriteError(f"{path}: frames must be uint8, got {frames.dtype}")
    return np.ascontiguousarray(frames)


def mp4_writable() -> bool:
    """Whether mp4 clips can be written here (imageio-ffmpeg, with its bundled ffmpeg, is importable)."""
    import importlib.util

    return importlib.util.find_spec("imageio_ffmpeg") is not None


def _write_mp4(frames: np.ndarray, tmp: Path, fps: float) -> None:
    import imageio_ffmpeg

    t, h, w, _ = frames.shape
    writer = imageio_ffmpeg.write_frames(
        str(tmp), (w, h), pix_fmt_in="rgb24", pix_fmt_out="yuv420p", fps=fps, codec="libx264", quality=None,
        macro_block_size=1, output_params=["-crf", str(MP4_CRF), "-preset", "medium", "-movflags", "+faststart"],
    )
    writer.send(None)  # start ffmpeg
    try:
        for frame in frames:
            writer.send(frame)
    finally:
        writer.close()


def _write_webp(frames: np.ndarray, tmp: Path, fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(f, "RGB") for f in frames]
    images[0].save(
        tmp, format="WEBP", save_all=True, append_images=images[1:], duration=max(1, round(1000.0 / fps)), loop=0,
        lossless=False, quality=WEBP_QUALITY, method=4,
    )


def write_video(frames: np.ndarray, path: str | os.PathLike, fps: float) -> Path:
    """Write frames (T, H, W, 3) uint8 as .mp4 (H.264, yuv420p) or .webp (animated), atomically."""
    path = Path(path)
    frames = _check_frames(frames, path)
    if not fps or fps <= 0:
        raise VideoWriteError(f"{path}: fps must be positive, got {fps}")
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        if frames.shape[1] % 2 or frames.shape[2] % 2:
            raise VideoWriteError(
                f"{path}: H.264 yuv420p needs an even width and height, got {frames.shape[2]}x{frames.shape[1]} "
                "(write .webp instead)"
            )
        _imageio_ffmpeg(path, VideoWriteError)  # before any file is touched
        writer = _write_mp4
    elif suffix == ".webp":
        writer = _write_webp
    else:
        raise VideoWriteError(f"{path}: unsupported video suffix {path.suffix!r} (use .mp4 or .webp)")
    from wan_pipeline.fsutil import atomic_target

    try:
        with atomic_target(path, suffix=f".tmp{suffix}") as tmp:  # the writers pick the format from the suffix
            writer(frames, tmp, fps)
    except (OSError, RuntimeError) as exc:
        raise VideoWriteError(f"{path}: writing failed ({exc})") from exc
    return path


# --------------------------------------------------------------------------------------------------- resize


def center_crop_box(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the region ComfyUI's `common_upscale(..., crop="center")` keeps before resizing.

    The crop is `[y : src_h - y, x : src_w - x]`, so w = src_w - 2x and h = src_h - 2y.
    """
    for name, v in (("src_w", src_w), ("src_h", src_h), ("dst_w", dst_w), ("dst_h", dst_h)):
        if int(v) != v or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    old_aspect = src_w / src_h
    new_aspect = dst_w / dst_h
    x = y = 0
    if old_aspect > new_aspect:
        x = round((src_w - src_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((src_h - src_h * (old_aspect / new_aspect)) / 2)
    return int(x), int(y), int(src_w - 2 * x), int(src_h - 2 * y)


def _bilinear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's `interpolate(mode="bilinear", align_corners=False)` along one axis."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    return i0, i1, frac


def resize_bilinear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize without antialiasing (half-pixel centres, edge clamp), as torch's `interpolate` does.

    Returns float64 in the input's value range; (H, W) or (H, W, C).
    """
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape[:2]
    r0, r1, fr = _bilinear_axis(h, height)
    c0, c1, fc = _bilinear_axis(w, width)
    extra = (None,) * (img.ndim - 2)
    fr = fr[(slice(None), None) + extra]
    fc = fc[(None, slice(None)) + extra]
    top = img[r0][:, c0] * (1.0 - fc) + img[r0][:, c1] * fc
    bottom = img[r1][:, c0] * (1.0 - fc) + img[r1][:, c1] * fc
    return top * (1.0 - fr) + bottom * fr


def resize_center_crop(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Center-crop `image` (H, W, 3) to the target aspect and resize it bilinearly to (height, width, 3) uint8."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image must be a non-empty (H, W, 3) array, got shape {image.shape}")
    src_h, src_w = image.shape[:2]
    x, y, w, h = center_crop_box(src_w, src_h, width, height)
    cropped = image[y : src_h - y, x : src_w - x]
    if cropped.shape[:2] == (height, width):
        return np.ascontiguousarray(cropped, dtype=np.uint8) if image.dtype == np.uint8 else (
            np.clip(np.rint(cropped), 0, 255).astype(np.uint8))
    out = resize_bilinear(cropped, width, height)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)

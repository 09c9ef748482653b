"""video.py: reading and writing clips, ComfyUI's center-crop resize, and the errors bad files raise."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from wan_pipeline.errors import WanBenchError
from wan_pipeline.measure.media import (VideoReadError, VideoWriteError, center_crop_box, read_frames, read_image,
                                        resize_bilinear, resize_center_crop, write_video)


needs_ffmpeg = pytest.mark.skipif(importlib.util.find_spec("imageio_ffmpeg") is None,
                                  reason="imageio-ffmpeg is not installed (pip install imageio-ffmpeg): no mp4 here")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse) if mse else 100.0


def _luma(a: np.ndarray) -> np.ndarray:
    return a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114


def _moving_clip(t=6, h=64, w=96, seed=0) -> np.ndarray:
    """A smooth colour texture panning 2 px a frame (compresses well, so codec losses stay small)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    big = gaussian_filter(rng.random((h, w + 2 * t, 3)), (3, 3, 0))
    big = (big - big.min()) / (big.max() - big.min())
    return np.stack([(big[:, 2 * i : 2 * i + w] * 255).round().astype(np.uint8) for i in range(t)])


# ------------------------------------------------------------------------------------------ center crop

# (src_w, src_h, dst_w, dst_h) -> (x, y, w, h), worked by hand from ComfyUI's rule:
#   400x400 -> 832x1216: new aspect 0.68421, x = round((400 - 400 * 0.68421) / 2) = round(63.16) = 63
#   1920x1080 -> 832x1216: x = round((1920 - 1920 * 0.68421 / 1.77778) / 2) = round(590.53) = 591, w = 738
#   1080x1920 -> 832x1216: y = round((1920 - 1920 * 0.5625 / 0.68421) / 2) = round(170.77) = 171, h = 1578
#   5x4 -> 1x1: x = round(0.5) = 0 (Python rounds half to even, as ComfyUI does): nothing is cropped
#   7x4 -> 1x1: x = round(1.5) = 2, w = 3
CROP_VECTORS = [
    ((400, 400, 832, 1216), (63, 0, 274, 400)),
    ((1920, 1080, 832, 1216), (591, 0, 738, 1080)),
    ((1080, 1920, 832, 1216), (0, 171, 1080, 1578)),
    ((832, 1216, 832, 1216), (0, 0, 832, 1216)),
    ((416, 608, 832, 1216), (0, 0, 416, 608)),  # same aspect, upscaled: no crop
    ((1000, 500, 640, 640), (250, 0, 500, 500)),
    ((500, 1000, 640, 640), (0, 250, 500, 500)),
    ((5, 4, 1, 1), (0, 0, 5, 4)),
    ((7, 4, 1, 1), (2, 0, 3, 4)),
]


@pytest.mark.parametrize("args, expected", CROP_VECTORS)
def test_center_crop_box_vectors(args, expected):
    assert center_crop_box(*args) == expected


def test_center_crop_box_rejects_bad_sizes():
    with pytest.raises(ValueError, match="dst_w"):
        center_crop_box(10, 10, 0, 5)


def test_resize_bilinear_matches_torch_interpolate():
    torch = pytest.importorskip("torch", reason="torch is the reference for the bilinear rule")
    F = torch.nn.functional
    rng = np.random.default_rng(3)
    for h, w, H, W in [(400, 400, 350, 350), (37, 53, 152, 104), (300, 200, 61, 40), (5, 7, 5, 7)]:
        img = rng.random((h, w, 3))
        ref = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None], size=(H, W), mode="bilinear",
                            align_corners=False)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(resize_bilinear(img, W, H), ref, atol=1e-12)


def test_resize_bilinear_no_antialias_by_hand():
    # 4 -> 2 columns: source positions (0 + 0.5) * 2 - 0.5 = 0.5 and 2.5, so the means of pairs (1, 2) and (3, 4).
    row = np.array([[0.0, 10.0, 20.0, 30.0]])
    np.testing.assert_allclose(resize_bilinear(row, 2, 1), [[5.0, 25.0]])
    # 2 -> 4 columns: positions -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to the last pixel).
    np.testing.assert_allclose(resize_bilinear(np.array([[0.0, 100.0]]), 4, 1), [[0.0, 25.0, 75.0, 100.0]])


def test_resize_center_crop_crops_then_resizes():
    # A 300x100 landscape image -> 100x100: the centre 100x100 square is kept, unchanged (no resampling).
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, 100:200] = 200
    img[:, :100] = 50
    out = resize_center_crop(img, 100, 100)
    assert out.shape == (100, 100, 3) and out.dtype == np.uint8
    assert (out == 200).all()
    # Resized to 50x50: the centre square is halved, still all 200 (the sides never leak in).
    assert (resize_center_crop(img, 50, 50) == 200).all()
    # A horizontal ramp keeps its mean under the resize.
    ramp = np.tile(np.linspace(0, 255, 400).round().astype(np.uint8)[None, :, None], (400, 1, 3))
    small = resize_center_crop(ramp, 350, 350)
    assert abs(small.mean() - ramp.mean()) < 0.5


# ------------------------------------------------------------------------------------------ round trips


@needs_ffmpeg
def test_mp4_round_trip(tmp_path):
    clip = _moving_clip()
    out = write_video(clip, tmp_path / "clip.mp4", fps=16)
    assert out == tmp_path / "clip.mp4" and out.stat().st_size > 0
    back = read_frames(out)
    assert back.shape == clip.shape and back.dtype == np.uint8
    # CRF 12: luma nearly lossless; RGB is bounded by yuv420p's halved chroma on this colour-noise texture.
    assert _psnr(_luma(back), _luma(clip)) > 40.0
    assert _psnr(back, clip) > 30.0
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temp file left behind


def test_webp_round_trip_and_fps(tmp_path):
    clip = _moving_clip(t=5)
    out = write_video(clip, tmp_path / "clip.webp", fps=16)
    back = read_frames(out)
    assert back.shape == clip.shape
    assert _psnr(back, clip) > 30.0
    with Image.open(out) as im:
        assert im.n_frames == 5
        im.load()
        assert im.info["duration"] in (62, 63)  # 1000 / 16 ms


def test_gif_and_png_folder(tmp_path):
    clip = np.zeros((3, 20, 30, 3), np.uint8)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        clip[i, :, :] = colour
        clip[i, 5:10, 5 + i : 10 + i] = 255
    imgs = [Image.fromarray(f) for f in clip]
    imgs[0].save(tmp_path / "c.gif", save_all=True, append_images=imgs[1:], duration=100, loop=0)
    np.testing.assert_array_equal(read_frames(tmp_path / "c.gif"), clip)

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, im in zip((2, 0, 1), (imgs[2], imgs[0], imgs[1])):  # written out of order, read sorted by name
        im.save(folder / f"frame_{i:05d}.png")
    (folder / "notes.txt").write_text("not a frame")
    np.testing.assert_array_equal(read_frames(folder), clip)


def test_read_image_modes(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[..., 3] = 0  # fully transparent: ComfyUI keeps the colour and drops the alpha
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), np.broadcast_to([10, 20, 30], (4, 5, 3)))

    Image.fromarray(np.full((4, 5), 77, np.uint8), "L").save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g.png"), np.full((4, 5, 3), 77))

    Image.fromarray(np.full((4, 5), 65535, np.uint16)).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g16.png"), np.full((4, 5, 3), 255))

    Image.fromarray(np.full((4, 5, 3), 200, np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        tmp_path / "p.gif")
    np.testing.assert_array_equal(read_image(tmp_path / "p.gif"), np.full((4, 5, 3), 200))


def test_read_image_applies_exif_rotation(tmp_path):
    img = np.zeros((2, 4, 3), np.uint8)  # landscape 4x2
    im = Image.fromarray(img)
    exif = im.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert read_image(tmp_path / "r.jpg").shape == (4, 2, 3)


# ------------------------------------------------------------------------------------------ atomic writes


def test_failed_write_leaves_existing_file_intact(tmp_path, monkeypatch):
    import wan_pipeline.measure.media as video

    target = tmp_path / "clip.webp"  # the atomic write is the same for both containers; webp needs no ffmpeg
    target.write_bytes(b"previous video")

    def broken_writer(frames, tmp, fps):
        tmp.write_bytes(b"half a video")
        raise RuntimeError("encoder died")

    monkeypatch.setattr(video, "_write_webp", broken_writer)
    with pytest.raises(VideoWriteError, match="clip.webp.*encoder died"):
        write_video(_moving_clip(t=2), target, fps=16)
    assert target.read_bytes() == b"previous video"
    assert [p.name for p in tmp_path.iterdir()] == ["clip.webp"]


def test_write_replaces_existing_file(tmp_path):
    target = tmp_path / "clip.webp"
    target.write_bytes(b"old")
    write_video(_moving_clip(t=2), target, fps=8)
    assert read_frames(target).shape[0] == 2


def test_clips_get_the_same_permissions_as_the_json_records_beside_them(tmp_path):
    from wan_pipeline.fsutil import atomic_write_json

    clip = write_video(_moving_clip(t=2), tmp_path / "clip.webp", fps=8)
    record = atomic_write_json(tmp_path / "clip.json", {})
    mask = os.umask(0o022)
    os.umask(mask)
    assert clip.stat().st_mode & 0o777 == record.stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize(
    "frames, name, message",
    [
        (np.zeros((2, 8, 8, 3), np.float32), "a.mp4", "uint8"),
        (np.zeros((8, 8, 3), np.uint8), "a.mp4", "shape"),
        (np.zeros((2, 7, 8, 3), np.uint8), "a.mp4", "even width and height"),
        (np.zeros((2, 8, 8, 3), np.uint8), "a.avi", "unsupported video suffix"),
    ],
)
def test_write_errors_name_the_file(tmp_path, frames, name, message):
    with pytest.raises(VideoWriteError, match=message) as info:
        write_video(frames, tmp_path / name, fps=16)
    assert name in str(info.value)
    assert isinstance(info.value, WanBenchError)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ read errors


def test_read_errors_name_the_file(tmp_path):
    cases = []
    cases.append((tmp_path / "missing.mp4", "no such"))
    (tmp_path / "empty.mp4").write_bytes(b"")
    cases.append((tmp_path / "empty.mp4", "empty"))
    (tmp_path / "junk.webp").write_bytes(b"RIFF\x00\x00\x00\x00WEBPnonsense" * 10)
    cases.append((tmp_path / "junk.webp", "cannot be decoded"))
    (tmp_path / "noframes").mkdir()
    (tmp_path / "noframes" / "readme.txt").write_text("x")
    cases.append((tmp_path / "noframes", "no .png frames"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(mixed / "0.png")
    Image.fromarray(np.zeros((8, 9, 3), np.uint8)).save(mixed / "1.png")
    cases.append((mixed, "1.png: frame size 9x8 differs"))
    for path, message in cases:
        with pytest.raises(VideoReadError, match=message) as info:
            read_frames(path)
        assert str(path) in str(info.value) or path.name in str(info.value)


@needs_ffmpeg
def test_an_mp4_that_is_not_video_names_the_file(tmp_path):
    (tmp_path / "junk.mp4").write_bytes(os.urandom(4096))
    with pytest.raises(VideoReadError, match="junk.mp4: cannot be decoded as video"):
        read_frames(tmp_path / "junk.mp4")


def test_without_imageio_ffmpeg_mp4_is_a_clear_error_and_no_file_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # what a missing package looks like to `import`
    with pytest.raises(VideoWriteError, match="clip.mp4: mp4 needs imageio-ffmpeg, which is not installed"):
        write_video(_moving_clip(t=2), tmp_path / "clip.mp4", fps=16)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    with pytest.raises(VideoReadError, match="clip.mp4: mp4 needs imageio-ffmpeg.*pip install imageio-ffmpeg"):
        read_frames(tmp_path / "clip.mp4")


def test_read_image_errors(tmp_path):
    (tmp_path / "notes.png").write_text("this is text")
    with pytest.raises(VideoReadError, match="notes.png: cannot be read as an image"):
        read_image(tmp_path / "notes.png")
    with pytest.raises(VideoReadError, match="nope.png: no such image file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(VideoReadError, match="is a folder"):
        read_image(tmp_path)


def test_auto_writes_webp_where_imageio_ffmpeg_is_missing(monkeypatch):
    import wan_pipeline.measure.media as media
    from wan_pipeline.suite.options import clip_format

    monkeypatch.setattr(media, "mp4_writable", lambda: False)
    assert clip_format("auto", "tiny") == "webp" and clip_format("auto", "synthetic") is None
    assert clip_format("mp4", "tiny") == "mp4"  # asked for: the writer says what is missing
    monkeypatch.setattr(media, "mp4_writable", lambda: True)
    assert clip_format("auto", "real") == "mp4"
@needs_ffmpeg
@pytest.mark.parametrize("frames", [5, 49])
def test_a_truncated_mp4_is_an_error_naming_the_frames_read_and_expected(tmp_path, frames):
    rng = np.random.default_rng(frames)
    clip = rng.integers(0, 256, (frames, 64, 64, 3), dtype=np.uint8)
    path = write_video(clip, tmp_path / "clip.mp4", fps=16)
    assert read_frames(path).shape[0] == frames  # the whole clip reads as it was written
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(VideoReadError, match=rf"cut.mp4: truncated: \d+ of {frames} frames read"):
        read_frames(cut)
    with pytest.warns(UserWarning, match=rf"truncated: \d+ of {frames} frames read"):
        partial = read_frames(cut, allow_partial=True)
    assert 0 < partial.shape[0] < frames


@needs_ffmpeg
def test_wan_bench_metrics_refuses_a_truncated_clip_unless_told(tmp_path, capsys):
    from wan_pipeline.cli.main import main

    rng = np.random.default_rng(0)
    path = write_video(rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8), tmp_path / "clip.mp4", fps=16)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert main(["metrics", str(path)]) == 2
    err = capsys.readouterr().err
    assert "wan-bench metrics: error: " in err and "of 5 frames read" in err and "Traceback" not in err
    with pytest.warns(UserWarning, match="of 5 frames read"):  # printed as one `wan-bench: warning:` line
        assert main(["metrics", str(path), "--allow-truncated", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["frames"] < 5


@pytest.mark.parametrize("read, expected, truncated", [(5, 5, False), (4, 5, False), (3, 5, True),
                                                        (159, 161, False), (157, 161, True), (2, 49, True)])
def test_a_clip_is_truncated_beyond_one_frame_or_two_percent_short(read, expected, truncated):
    from wan_pipeline.measure.media import is_truncated

    assert is_truncated(read, expected) is truncated

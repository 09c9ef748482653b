"""`wan-bench metrics VIDEO [--image IMAGE] [--json]`: temporal-consistency metrics of one clip (no torch)."""

from __future__ import annotations

import argparse
import json
import time

from wan_pipeline.measure.media import read_frames, read_image
from wan_pipeline.measure.metrics import METRIC_KEYS, compute_metrics


def configure_metrics_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("video", metavar="VIDEO", help="an mp4, webp or gif file, or a folder of PNG frames")
    p.add_argument("--image", metavar="IMAGE", help="the input image, to score the first frame against it")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON (stable keys)")
    p.add_argument("--allow-truncated", action="store_true",
                   help="score a clip holding fewer frames than its header says (a warning names both counts; "
                        "without it that is an error, exit 2)")


def _fmt(value, spec: str) -> str:
    return "n/a (no --image)" if value is None else format(value, spec)


def format_metrics(result: dict, video: str, image: str | None, height: int, width: int, seconds: float) -> str:
    tr = result["transitions"]
    w = result["worst_transition"]
    lines = [
        f"{video}: {result['frames']} frames, {width}x{height}" + (f", input image {image}" if image else ""),
        f"  flicker_score     {result['flicker_score']:.4f}   (VBench; 1 = no change between frames)",
        f"  ssim_mean         {result['ssim_mean']:.4f}",
        f"  ssim_min          {result['ssim_min']:.4f}",
        f"  warp_error        {result['warp_error']:.3f}    (grey levels after flow warping, occlusions left out)",
        f"  motion            {result['motion']:.3f}    (pixels per frame)",
        f"  first_frame_ssim  {_fmt(result['first_frame_ssim'], '.4f')}",
        f"  first_frame_psnr  {_fmt(result['first_frame_psnr'], '.2f')}" + (" dB" if image else ""),
        f"  worst_transition  {w} (frame {w} -> {w + 1}: warp error {tr['warp_error'][w]:.3f}, "
        f"SSIM {tr['ssim'][w]:.4f}, motion {tr['motion'][w]:.3f})",
        f"  computed in {seconds:.2f} s",
    ]
    return "\n".join(lines)


def run_metrics(args: argparse.Namespace) -> int:
    frames = read_frames(args.video, allow_partial=args.allow_truncated)
    image = read_image(args.image) if args.image else None
    start = time.perf_counter()
    result = compute_metrics(frames, image, name=str(args.video))
    seconds = time.perf_counter() - start
    if args.json:
        out = {key: result[key] for key in METRIC_KEYS}
        out["transitions"] = result["transitions"]
        print(json.dumps(out, indent=2, allow_nan=False))
    else:
        print(format_metrics(result, str(args.video), args.image, frames.shape[1], frames.shape[2], seconds))
    return 0

"""`wan-bench report`: a self-contained HTML page and a markdown summary of a benchmark history, with plots.

Plots (matplotlib, Agg, no pyplot state): latency over the history per GPU and preset with the change points marked,
stage breakdown of the latest run, peak memory, quality metrics over the history, and a frame strip of the latest
video. The HTML embeds every image (base64) so the one file can be uploaded as a CI artifact; the markdown refers to
the PNG files written beside it. Reads history files only; never imports torch.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

from wan_pipeline.errors import WanBenchError
from wan_pipeline.fsutil import atomic_write_bytes
from wan_pipeline.history.compare import DEFAULT_ALPHA, DEFAULT_THRESHOLD, compare
from wan_pipeline.history.runs import HistoryError, Run, is_number, load_history
from wan_pipeline.history.trend import Series, trend
from wan_pipeline.plan.config import ordered_stages


class ReportError(WanBenchError):
    pass


def _figure(width: float = 8.0, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _preset_of(run: Run, name: str) -> str:
    extra = run.benchmarks.get(name, {}).get("extra_info") or {}
    return str(extra.get("preset") or name)


def plot_latency(series_list: list[Series], title: str) -> bytes:
    """Median (and min-max band where known) per run for each benchmark; change points as dashed lines."""
    fig = _figure()
    ax = fig.add_subplot()
    for s in series_list:
        xs = list(range(1, len(s.runs) + 1))
        line, = ax.plot(xs, s.medians, marker="o", ms=3, label=s.benchmark.split("::")[-1])
        lows = [r.benchmarks[s.benchmark]["stats"].get("min") for r in s.runs]
        highs = [r.benchmarks[s.benchmark]["stats"].get("max") for r in s.runs]
        if all(isinstance(v, (int, float)) for v in lows + highs):
            ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.15, lw=0)
        for st in s.steps:
            i = s.runs.index(st.run) + 1
            ax.axvline(i - 0.5, color=line.get_color(), ls="--", lw=1)
            ax.annotate(f"{(st.ratio - 1) * 100:+.1f} %", (i - 0.5, st.after), fontsize=8, color=line.get_color(),
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("run (oldest first)")
    ax.set_ylabel("median time per round (s)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _png(fig)


def plot_stages(run: Run) -> bytes | None:
    rows = [(name.split("::")[-1], (b.get("extra_info") or {}).get("stages") or {}) for name, b in run.benchmarks.items()]
    rows = [(n, s) for n, s in rows if s]
    if not rows:
        return None
    names = ordered_stages(*(st for _, st in rows))
    fig = _figure(8.0, 0.6 + 0.45 * len(rows))
    ax = fig.add_subplot()
    left = [0.0] * len(rows)
    for stage in names:
        widths = [float(st.get(stage) or 0.0) for _, st in rows]
        ax.barh(range(len(rows)), widths, left=left, label=stage)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(rows)), [n for n, _ in rows], fontsize=7)
    ax.set_xlabel("seconds (median over rounds)")
    ax.set_title(f"stage breakdown, latest run {run.path.name}", fontsize=10)
    ax.legend(fontsize=7, ncols=min(6, len(names)), loc="lower right")
    return _png(fig)


def plot_memory(run: Run) -> bytes | None:
    rows = []
    for name, b in run.benchmarks.items():
        mem = (b.get("extra_info") or {}).get("peak_memory") or {}
        vals = {k: v for k, v in mem.items() if is_number(v)}
        if vals:
            rows.append((name.split("::")[-1], vals))
    if not rows:
        return None
    keys = sorted({k for _, v in rows for k in v})
    fig = _figure(8.0, 0.6 + 0.45 * len(rows) * max(1, len(keys)) / 1.5)
    ax = fig.add_subplot()
    height = 0.8 / len(keys)
    for j, key in enumerate(keys):
        ax.barh([i + j * height for i in range(len(rows))], [v.get(key, 0) / 2**30 for _, v in rows], height=height,
                label=key)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(rows))], [n for n, _ in rows], fontsize=7)
    ax.set_xlabel("GiB")
    ax.set_title(f"peak memory, latest run {run.path.name}", fontsize=10)
    ax.legend(fontsize=7)
    return _png(fig)


def metric_history(runs: list[Run]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """metric -> benchmark -> [(run number, value)]."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for i, run in enumerate(runs, 1):
        for name, b in run.benchmarks.items():
            for metric, value in ((b.get("extra_info") or {}).get("metrics") or {}).items():
                if is_number(value):
                    out.setdefault(metric, {}).setdefault(name, []).append((i, float(value)))
    return out


def plot_metrics(runs: list[Run]) -> bytes | None:
    hist = metric_history(runs)
    if not hist:
        return None
    cols = min(3, len(hist))
    rows = math.ceil(len(hist) / cols)
    fig = _figure(8.0, 2.4 * rows)
    for k, (metric, per_bench) in enumerate(sorted(hist.items()), 1):
        ax = fig.add_subplot(rows, cols, k)
        for name, points in per_bench.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=name.split("::")[-1])
        ax.set_title(metric, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return _png(fig)


def read_frames(path: Path, count: int = 8) -> list:
    """Up to `count` evenly spaced RGB frames (numpy arrays) of a video or animated image; [] when unreadable."""
    from wan_pipeline.measure.media import VideoReadError
    from wan_pipeline.measure.media import read_frames as read_video

    try:
        frames = read_video(path)
    except (VideoReadError, OSError, ValueError):
        return []
    idx = sorted({round(i * (len(frames) - 1) / max(1, count - 1)) for i in range(min(count, len(frames)))})
    return [frames[i] for i in idx]


def plot_frame_strip(video: Path, count: int = 8) -> bytes | None:
    frames = read_frames(video, count)
    if not frames:
        return None
    h, w = frames[0].shape[:2]
    fig = _figure(8.0, max(1.2, 8.0 / len(frames) * h / w + 0.4))
    for k, frame in enumerate(frames, 1):
        ax = fig.add_subplot(1, len(frames), k)
        ax.imshow(frame)
        ax.axis("off")
    fig.suptitle(f"frames of {video.name}", fontsize=9)
    return _png(fig)


def _latest_video(run: Run) -> Path | None:
    for b in run.benchmarks.values():
        video = (b.get("extra_info") or {}).get("video")
        if not video:
            continue
        for candidate in (Path(video), run.path.parent / video):
            if candidate.is_file():
                return candidate
    return None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_report(storage: str | Path, out_dir: str | Path, threshold: float = DEFAULT_THRESHOLD,
                 title: str = "wan-bench report", alpha: float = DEFAULT_ALPHA) -> list[Path]:
    """Write index.html (self-contained), summary.md and the PNGs into out_dir; return the paths written."""
    hist = load_history(storage)
    if not hist.runs:
        raise ReportError(f"{storage}: no usable benchmark file to report on"
                          + (f" ({len(hist.skipped)} unusable skipped)" if hist.skipped else ""))
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"{out}: cannot create the report folder: {exc.strerror or exc}") from None
    series = trend(hist, threshold=threshold)
    images: list[tuple[str, str, bytes]] = []  # (file name, caption, png)
    md: list[str] = [f"# {title}", "", f"History: `{hist.root}`, {len(hist.runs)} run(s)."]
    sections_html: list[str] = []

    def add_image(name: str, caption: str, png: bytes | None) -> None:
        if png:
            images.append((name, caption, png))

    groups = hist.by_gpu()
    for gpu, runs in sorted(groups.items()):
        first_image = len(images)
        latest = runs[-1]
        md += ["", f"## {runs[-1].gpu_name or 'CPU (no GPU)'} (`{gpu}`): {len(runs)} run(s), latest {latest.label}"]
        md += memory_cap_lines(latest)
        by_preset: dict[str, list[Series]] = {}
        for s in series:
            if s.gpu == gpu:
                by_preset.setdefault(_preset_of(s.runs[-1], s.benchmark), []).append(s)
        md += ["", "| benchmark | runs | latest median (s) | steps |", "| --- | --- | --- | --- |"]
        for preset, ss in sorted(by_preset.items()):
            for s in ss:
                steps = "; ".join(st.describe().split(": ", 1)[1] for st in s.steps) or "none"
                md.append(f"| `{s.benchmark}` | {len(s.runs)} | {s.medians[-1]:.4g} | {steps} |")
            add_image(f"latency-{gpu}-{_safe(preset)}.png", f"latency over the history: {preset} on {gpu}",
                      plot_latency(ss, f"{preset} on {gpu}"))
        if len(runs) >= 2:
            try:
                result = compare(runs[-2], runs[-1], threshold=threshold, alpha=alpha)
                md += ["", "### Latest run against the one before", "", "```", result.format_text(), "```"]
            except HistoryError as exc:
                md += ["", f"Latest comparison not possible: {exc}"]
        add_image(f"stages-{gpu}.png", f"stage breakdown of the latest run on {gpu}", plot_stages(latest))
        add_image(f"memory-{gpu}.png", f"peak memory of the latest run on {gpu}", plot_memory(latest))
        add_image(f"metrics-{gpu}.png", f"quality metrics over the history on {gpu}", plot_metrics(runs))
        metrics = {n: (b.get("extra_info") or {}).get("metrics") for n, b in latest.benchmarks.items()}
        metrics = {n: m for n, m in metrics.items() if isinstance(m, dict) and m}
        if metrics:
            keys = sorted({k for m in metrics.values() for k in m})
            md += ["", "| benchmark | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
            md += [f"| `{n}` | " + " | ".join(_fmt(m.get(k)) for k in keys) + " |" for n, m in metrics.items()]
        video = _latest_video(latest)
        if video is not None:
            strip = plot_frame_strip(video)
            add_image(f"frames-{gpu}.png", f"frame strip of {video}", strip)
            if strip is None:
                md += ["", f"Latest video `{video}` could not be read."]
        md += ["", "Images:"] + [f"![{cap}]({name})" for name, cap, _ in images[first_image:]]  # this GPU's
    if hist.skipped:
        md += ["", "## Unusable files (skipped, left as they are)", ""]
        md += [f"- `{p}`: {why}" for p, why in hist.skipped]

    written: list[Path] = []
    for name, _, png in images:
        written.append(atomic_write_bytes(out / name, png))
    summary = "\n".join(md) + "\n"
    written.append(atomic_write_bytes(out / "summary.md", summary.encode()))
    for name, caption, png in images:
        sections_html.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,'
                             f'{base64.b64encode(png).decode()}"><figcaption>{html.escape(caption)}</figcaption></figure>')
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;max-width:60em;margin:auto}pre{background:#f4f4f4;padding:.5em;"
            "overflow-x:auto}img{max-width:100%}figure{margin:1em 0}</style></head><body>"
            f"<pre>{html.escape(summary)}</pre>{''.join(sections_html)}</body></html>\n")
    written.append(atomic_write_bytes(out / "index.html", page.encode()))
    return written


def memory_cap_lines(run) -> list[str]:
    """A capped run's caveat and, per benchmark, the memory plan it ran under (policy, peak, bytes streamed)."""
    if run.memory_cap is None:
        return []
    from wan_pipeline.plan.memory import format_bytes

    lines = ["", f"Memory cap {format_bytes(run.memory_cap)}: the CUDA allocator was capped to emulate a smaller "
                 f"card's memory, not its speed (the compute, memory bandwidth and host link are "
                 f"{run.gpu_name or 'this machine'}'s).", "",
             "| benchmark | policy | VAE bands | peak (GB) | streamed per generation (GB) | copy bandwidth (GB/s) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, bench in run.benchmarks.items():
        info = bench.get("extra_info") or {}
        memory = info.get("memory") or {}
        peak = (info.get("peak_memory") or {}).get("torch_peak_bytes")
        streamed = memory.get("streamed_bytes_per_generation")
        bandwidth = memory.get("host_to_device_bandwidth_bytes_per_s")
        lines.append(f"| `{name}` | {memory.get('policy', info.get('residency', '-'))} | {memory.get('vae_bands', '-')} "
                     f"| {_fmt(peak / 1e9 if peak else None)} | {_fmt(streamed / 1e9 if streamed else None)} "
                     f"| {_fmt(bandwidth / 1e9 if bandwidth else None)} |")
    return lines


def _safe(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:80] or "benchmark"


__all__ = ["ReportError", "metric_history", "plot_frame_strip", "plot_latency", "read_frames", "write_report"]

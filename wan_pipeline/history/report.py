"""`wan-bench report`: a self-contained HTML page and a markdown summary of a benchmark history, with plots.

Plots (matplotlib, Agg, no pyplot state): latency over the history per GPU and preset, runs on the x axis by date and
commit, change points and the latest run's regressions marked; stage breakdown and peak memory of the latest run;
quality metrics over the history (real-mode runs only); a frame strip of the latest video. Legends sit below the
axes, outside the data; a panel without data is left out and the page says why. The markdown summary refers to the
PNG files written beside it; index.html is that markdown rendered (python-markdown: tables, code) with every image
embedded (base64), so the one file can be uploaded as a CI artifact. Reads history files only; never imports torch.
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


def run_label(run: Run) -> str:
    """A run on the x axis: its date and time and its commit (as asv's pages name a point), never a bare index."""
    commit = str(run.commit_info.get("id") or "")
    commit = commit[:8] if commit and commit != "unversioned" else "no commit"
    if run.commit_info.get("dirty"):
        commit += "+"
    return f"{run.datetime[:10]} {run.datetime[11:16]}".strip() + f"\n{commit}"


def _run_axis(ax, runs: list[Run]) -> None:
    ax.set_xticks(range(len(runs)), [run_label(r) for r in runs], fontsize=7, rotation=30, ha="right")
    ax.set_xlim(-0.5, len(runs) - 0.5)
    ax.set_xlabel("run (date, commit; oldest first)")


def _legend_below(fig, ax, columns: int = 2) -> None:
    """The legend under the axes, outside the data (constrained layout makes the room)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=max(1, min(columns, len(handles))),
                   fontsize=7, frameon=False)


def plot_latency(series_list: list[Series], title: str, runs: list[Run] | None = None,
                 regressions: set[str] = frozenset()) -> bytes:
    """Median (and min-max band where known) per run for each benchmark, runs by date and commit; change points as
    dashed lines with their step, regressions of the latest run against the one before as red crosses."""
    runs = runs or sorted({r.path: r for s in series_list for r in s.runs}.values(), key=Run.sort_key)
    position = {r.path: i for i, r in enumerate(runs)}
    fig = _figure(8.0, 4.2 + 0.18 * len(series_list))
    ax = fig.add_subplot()
    marked = False
    for s in series_list:
        xs = [position[r.path] for r in s.runs]
        line, = ax.plot(xs, s.medians, marker="o", ms=3, label=s.benchmark.split("::")[-1])
        lows = [r.benchmarks[s.benchmark]["stats"].get("min") for r in s.runs]
        highs = [r.benchmarks[s.benchmark]["stats"].get("max") for r in s.runs]
        if all(is_number(v) for v in lows + highs):
            ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.15, lw=0)
        for st in s.steps:
            i = position[st.run.path]
            ax.axvline(i - 0.5, color=line.get_color(), ls="--", lw=1)
            ax.annotate(f"change point {(st.ratio - 1) * 100:+.1f} %", (i - 0.5, st.after), fontsize=7,
                        color=line.get_color(), xytext=(3, 3), textcoords="offset points")
        if s.benchmark in regressions:
            ax.plot([xs[-1]], [s.medians[-1]], "x", color="red", ms=10, mew=2,
                    label=None if marked else "regression: latest run vs the one before")
            marked = True
    _run_axis(ax, runs)
    ax.set_ylabel("median time per round (s)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _legend_below(fig, ax)
    return _png(fig)


def plot_stages(run: Run) -> bytes | None:
    """Stacked stage times of the latest run's benchmarks; None when no benchmark recorded a stage time."""
    rows = [(name.split("::")[-1], (b.get("extra_info") or {}).get("stages") or {}) for name, b in run.benchmarks.items()]
    rows = [(n, s) for n, s in rows if any(is_number(v) and v > 0 for v in s.values())]
    if not rows:
        return None
    names = ordered_stages(*(st for _, st in rows))
    fig = _figure(8.0, 1.4 + 0.45 * len(rows))
    ax = fig.add_subplot()
    left = [0.0] * len(rows)
    for stage in names:
        widths = [float(st.get(stage) or 0.0) for _, st in rows]
        ax.barh(range(len(rows)), widths, left=left, label=stage)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(rows)), [n for n, _ in rows], fontsize=7)
    ax.set_xlabel("seconds (median over rounds)")
    ax.set_title(f"stage breakdown, latest run ({run.datetime[:16].replace('T', ' ')})", fontsize=10)
    _legend_below(fig, ax, columns=len(names))
    return _png(fig)


def plot_memory(run: Run) -> bytes | None:
    """Peak memory per benchmark of the latest run; None when nothing above zero was recorded (a CPU run: the
    counters are the GPU's)."""
    rows = []
    for name, b in run.benchmarks.items():
        mem = (b.get("extra_info") or {}).get("peak_memory") or {}
        vals = {k: v for k, v in mem.items() if is_number(v) and v > 0}
        if vals:
            rows.append((name.split("::")[-1], vals))
    if not rows:
        return None
    keys = sorted({k for _, v in rows for k in v})
    fig = _figure(8.0, 1.4 + 0.45 * len(rows) * max(1, len(keys)) / 1.5)
    ax = fig.add_subplot()
    height = 0.8 / len(keys)
    for j, key in enumerate(keys):
        ax.barh([i + j * height for i in range(len(rows))], [v.get(key, 0) / 2**30 for _, v in rows], height=height,
                label=key)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(rows))], [n for n, _ in rows], fontsize=7)
    ax.set_xlabel("GiB")
    ax.set_xlim(left=0)
    ax.set_title(f"peak memory, latest run ({run.datetime[:16].replace('T', ' ')})", fontsize=10)
    _legend_below(fig, ax, columns=len(keys))
    return _png(fig)


# Clip metrics that describe the clip, not its quality: never plotted as a quality panel.
NOT_QUALITY = ("frames", "worst_transition")


def metric_history(runs: list[Run]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """metric -> benchmark -> [(index of the run in `runs`, value)], for real-mode benchmarks only: synthetic and
    tiny weights are random, so their clip metrics say nothing about quality."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for i, run in enumerate(runs):
        for name, b in run.benchmarks.items():
            extra = b.get("extra_info") or {}
            if extra.get("mode") != "real":
                continue
            for metric, value in (extra.get("metrics") or {}).items():
                if metric not in NOT_QUALITY and is_number(value):
                    out.setdefault(metric, {}).setdefault(name, []).append((i, float(value)))
    return out


def plot_metrics(runs: list[Run]) -> bytes | None:
    hist = metric_history(runs)
    if not hist:
        return None
    cols = min(3, len(hist))
    rows = math.ceil(len(hist) / cols)
    fig = _figure(9.0, 1.2 + 2.6 * rows)
    used = sorted({i for per_bench in hist.values() for points in per_bench.values() for i, _ in points})
    first = None
    for k, (metric, per_bench) in enumerate(sorted(hist.items()), 1):
        ax = fig.add_subplot(rows, cols, k)
        for name, points in per_bench.items():
            ax.plot([used.index(p[0]) for p in points], [p[1] for p in points], marker="o", ms=3,
                    label=name.split("::")[-1])
        ax.set_xticks(range(len(used)), [run_label(runs[i]).split("\n")[0][:10] for i in used], fontsize=6,
                      rotation=30, ha="right")
        ax.set_title(metric, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3)
        first = first or ax
    _legend_below(fig, first)
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


def _regressed(runs: list[Run], threshold: float, alpha: float) -> tuple[set[str], list[str]]:
    """(benchmarks that regressed in the latest run against the one before, markdown lines of that comparison)."""
    if len(runs) < 2:
        return set(), []
    try:
        result = compare(runs[-2], runs[-1], threshold=threshold, alpha=alpha, allow_missing=True)
    except HistoryError as exc:
        return set(), ["", f"Latest comparison not possible: {exc}"]
    lines = ["", "### Latest run against the one before", ""]
    lines += [f"- **{b.status}**: `{b.fullname}` {b.baseline_median:.4g} s -> {b.current_median:.4g} s "
              f"({(b.ratio - 1) * 100:+.1f} %)" for b in result.benchmarks]
    lines += ["", "```", result.format_text(), "```"]
    return {b.fullname for b in result.regressions}, lines


PAGE_STYLE = ("body{font-family:system-ui,sans-serif;max-width:64em;margin:auto;padding:0 1em;line-height:1.4}"
              "table{border-collapse:collapse;margin:.5em 0;font-size:.9em}th,td{border:1px solid #ccc;"
              "padding:.2em .5em;text-align:left}th{background:#f0f0f0}pre{background:#f4f4f4;padding:.5em;"
              "white-space:pre-wrap;word-break:break-word;font-size:.85em}img{max-width:100%;height:auto}"
              "code{font-size:.9em}")


def render_html(summary: str, images: dict[str, bytes], title: str) -> str:
    """The summary markdown as an HTML page (tables as tables, code as code), each image embedded where the
    markdown shows it, so that the one file can travel as a CI artifact."""
    import markdown

    text = summary
    for name, png in images.items():
        text = text.replace(f"]({name})", f"](data:image/png;base64,{base64.b64encode(png).decode()})")
    body = markdown.markdown(text, extensions=["tables", "fenced_code"], output_format="html")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{PAGE_STYLE}</style></head><body>{body}</body></html>\n")


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
    images: dict[str, bytes] = {}
    md: list[str] = [f"# {title}", "", f"History: `{hist.root}`, {len(hist.runs)} run(s)."]

    def add_image(name: str, caption: str, png: bytes | None, missing: str) -> None:
        """The panel in the page, or the sentence saying why there is none (never an empty plot)."""
        if png:
            images[name] = png
            md.extend(["", f"![{caption}]({name})"])
        else:
            md.extend(["", f"*No {caption.split(',')[0]} panel: {missing}.*"])

    groups = hist.by_gpu()
    for gpu, runs in sorted(groups.items()):
        latest = runs[-1]
        md += ["", f"## {runs[-1].gpu_name or 'CPU (no GPU)'} (`{gpu}`): {len(runs)} run(s), latest {latest.label}"]
        md += memory_cap_lines(latest)
        if latest.incomplete is not None:
            md += ["", f"**The latest run is incomplete** ({latest.incomplete_reason()}): not a clean baseline."]
        regressed, compare_lines = _regressed(runs, threshold, alpha)
        by_preset: dict[str, list[Series]] = {}
        for s in series:
            if s.gpu == gpu:
                by_preset.setdefault(_preset_of(s.runs[-1], s.benchmark), []).append(s)
        md += ["", "| benchmark | mode | runs | latest median (s) | change points |", "| --- | --- | --- | --- | --- |"]
        for preset, ss in sorted(by_preset.items()):
            for s in ss:
                steps = "; ".join(st.describe().split(": ", 1)[1] for st in s.steps) or "none"
                mode = (s.runs[-1].benchmarks[s.benchmark].get("extra_info") or {}).get("mode") or ""
                flag = " **regression**" if s.benchmark in regressed else ""
                md.append(f"| `{s.benchmark}`{flag} | {mode} | {len(s.runs)} | {s.medians[-1]:.4g} | "
                          f"{steps.replace('|', '/')} |")
        for preset, ss in sorted(by_preset.items()):
            add_image(f"latency-{gpu}-{_safe(preset)}.png", f"latency over the history, {preset} on {gpu}",
                      plot_latency(ss, f"{preset} on {gpu}", runs, regressed), "no timings")
        md += compare_lines
        add_image(f"stages-{gpu}.png", f"stage breakdown, latest run on {gpu}", plot_stages(latest),
                  "no benchmark of the latest run recorded stage times")
        add_image(f"memory-{gpu}.png", f"peak memory, latest run on {gpu}", plot_memory(latest),
                  "no peak memory above zero was recorded (the counters are the GPU's; a CPU run has none)")
        add_image(f"metrics-{gpu}.png", f"quality metrics, history on {gpu}", plot_metrics(runs),
                  "no real-mode run (synthetic and tiny weights are random, their clip metrics mean nothing)")
        metrics = {n: (b.get("extra_info") or {}).get("metrics") for n, b in latest.benchmarks.items()
                   if (b.get("extra_info") or {}).get("mode") == "real"}
        metrics = {n: m for n, m in metrics.items() if isinstance(m, dict) and m}
        if metrics:
            keys = sorted({k for m in metrics.values() for k in m})
            md += ["", "| benchmark | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
            md += [f"| `{n}` | " + " | ".join(_fmt(m.get(k)) for k in keys) + " |" for n, m in metrics.items()]
        video = _latest_video(latest)
        if video is not None:
            add_image(f"frames-{gpu}.png", f"frame strip of {video.name}", plot_frame_strip(video),
                      f"the latest video {video} could not be read")
    if hist.skipped:
        md += ["", "## Unusable files (skipped, left as they are)", ""]
        md += [f"- `{p}`: {why}" for p, why in hist.skipped]

    written: list[Path] = []
    for name, png in images.items():
        written.append(atomic_write_bytes(out / name, png))
    summary = "\n".join(md) + "\n"
    written.append(atomic_write_bytes(out / "summary.md", summary.encode()))
    written.append(atomic_write_bytes(out / "index.html", render_html(summary, images, title).encode()))
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


__all__ = ["ReportError", "metric_history", "plot_frame_strip", "plot_latency", "read_frames", "render_html",
           "run_label", "write_report"]

"""report: HTML + markdown with plots from a storage folder."""

import base64
import html
import subprocess
from pathlib import Path
import json
import re

import numpy as np
import pytest

from wan_pipeline.cli.main import main
from wan_pipeline.history.report import read_frames, write_report


def _session(day, factor, rng, video=None, torch_version="2.11.0", mode="real"):
    data = list(60.0 * factor * (1 + 0.01 * rng.standard_normal(6)))
    extra = {"preset": "seed-832x1216-49f", "mode": mode,
             "stages": {"text_encode": 1.0, "image_encode": 2.0, "pass1": 24.0 * factor, "switch": 0.5,
                        "pass2": 24.0, "decode": 8.0},
             "peak_memory": {"torch_peak_bytes": 30 * 2**30, "nvml_used_bytes": 33 * 2**30},
             "metrics": {"flicker_score": 0.97 + 0.001 * day, "ssim_mean": 0.9}, "video": video}
    return {"machine_info": {"gpu": {"name": "NVIDIA H100 80GB HBM3"}, "wan_env": {"version.torch": torch_version}},
            "commit_info": {"id": f"c{day}"}, "datetime": f"2026-11-{day:02d}T00:00:00+00:00", "version": "5.2.3",
            "benchmarks": [{"name": "test_pipeline[seed]", "fullname": "t.py::test_pipeline[seed]", "group": None,
                            "extra_info": extra,
                            "stats": {"median": float(np.median(data)), "min": min(data), "max": max(data),
                                      "rounds": 6, "data": data}}]}


@pytest.fixture
def storage(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    video = tmp_path / "latest.webp"
    frames = [Image.new("RGB", (64, 48), (i * 20, 100, 255 - i * 20)) for i in range(10)]
    frames[0].save(video, save_all=True, append_images=frames[1:], duration=62, lossless=True)
    folder = tmp_path / "storage" / "nvidia-h100-80gb-hbm3"
    folder.mkdir(parents=True)
    for day in range(1, 10):
        upgraded = day >= 6
        s = _session(day, 1.1 if upgraded else 1.0, rng, video=str(video) if day == 9 else None,
                     torch_version="2.12.0" if upgraded else "2.11.0")
        (folder / f"{day:04d}_run.json").write_text(json.dumps(s))
    (folder / "0010_cut.json").write_text('{"benchmarks": [')
    return tmp_path / "storage"


def test_report_writes_html_markdown_and_plots(storage, tmp_path):
    out = tmp_path / "report"
    paths = write_report(storage, out)
    names = sorted(p.name for p in paths)
    assert "index.html" in names and "summary.md" in names
    for kind in ("latency", "stages", "memory", "metrics", "frames"):
        (png,) = [p for p in paths if p.name.startswith(kind)]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "summary.md").read_text()
    assert "stepped +10" in md and "0006_run.json" in md and "env:version.torch: 2.11.0 -> 2.12.0" in md
    assert "0010_cut.json" in md and "truncated" in md  # reported, not touched
    assert (storage / "nvidia-h100-80gb-hbm3" / "0010_cut.json").read_text() == '{"benchmarks": ['
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / name).is_file()
    page = (out / "index.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == sum(1 for p in paths if p.suffix == ".png")
    assert all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)
    assert "src=\"http" not in page and "<script" not in page  # self-contained


def test_report_cli(storage, tmp_path, capsys):
    assert main(["report", str(storage), "--out", str(tmp_path / "r")]) == 0
    assert "index.html" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), "--out", str(tmp_path / "r2")]) == 2
    assert "no usable benchmark file" in capsys.readouterr().err


def test_read_frames_spreads_over_the_video(storage, tmp_path):
    frames = read_frames(tmp_path / "latest.webp", count=4)
    assert len(frames) == 4 and frames[0].shape == (48, 64, 3)
    assert frames[0][0, 0, 0] < frames[-1][0, 0, 0]
    assert read_frames(tmp_path / "missing.mp4") == []


def test_each_gpu_section_lists_only_its_own_images_when_one_slug_ends_another(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("A H100", "H100"):  # slugs a-h100 (reported first) and h100: "-h100" is inside a-h100 names
        s = _session(1, 1.0, rng)
        s["machine_info"]["gpu"]["name"] = name
        folder = tmp_path / "storage" / name.lower().replace(" ", "-")
        folder.mkdir(parents=True)
        (folder / "0001_run.json").write_text(json.dumps(s))
    write_report(tmp_path / "storage", tmp_path / "report")
    md = (tmp_path / "report" / "summary.md").read_text()
    sections = {head.split(" (`")[0]: body for head, body in
                (part.split("\n", 1) for part in md.split("\n## ")[1:])}
    images = {gpu: re.findall(r"!\[[^\]]*\]\(([^)]+)\)", body) for gpu, body in sections.items()}
    assert images["H100"] and not any("a-h100" in n for n in images["H100"])
    assert images["A H100"] and all("a-h100" in n for n in images["A H100"])


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=10000"]
# Appended to a copy of the page only: records what the browser loaded (the report itself carries no script).
IMAGE_PROBE = ("<script>window.addEventListener('load', () => { document.body.setAttribute('data-images', "
               "JSON.stringify([...document.images].map(i => i.complete ? i.naturalWidth : -1))); });</script>")


def chromium(tmp_path, *args):
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    profile.mkdir()
    proc = subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="headless browser check needs /usr/bin/chromium (Debian: "
                                                   "apt-get install chromium)")
def test_the_page_renders_in_a_browser_as_tables_and_loaded_images(storage, tmp_path):
    out = tmp_path / "report"
    write_report(storage, out)
    page = (out / "index.html").read_text()
    probe = out / "probe.html"
    probe.write_text(page.replace("</body>", IMAGE_PROBE + "</body>"))
    dom = chromium(tmp_path, "--dump-dom", probe.as_uri())
    widths = json.loads(html.unescape(re.search(r'data-images="([^"]*)"', dom).group(1)))
    assert len(widths) == page.count("<img") >= 4 and all(w > 0 for w in widths), widths  # every image loaded
    text = re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)[^>]*>.*?</\1>", "", dom, flags=re.S))
    assert "| --- |" not in text and "![" not in text and "](" not in text  # no raw markdown on the page
    assert dom.count("<table>") >= 2 and "<th>benchmark</th>" in dom
    shot = tmp_path / "page.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", (out / "index.html").as_uri())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_empty_panels_and_quality_only_for_real_runs(tmp_path):
    """A CPU history in tiny mode: no peak memory, no quality panel; the page says why instead of empty axes."""
    rng = np.random.default_rng(2)
    folder = tmp_path / "storage" / "cpu"
    folder.mkdir(parents=True)
    for day in (1, 2):
        s = _session(day, 1.0, rng, mode="tiny")
        s["machine_info"]["gpu"] = None
        s["benchmarks"][0]["extra_info"]["peak_memory"] = {"torch_peak_bytes": 0}
        s["benchmarks"][0]["extra_info"]["metrics"]["frames"] = 5
        (folder / f"000{day}_run.json").write_text(json.dumps(s))
    paths = write_report(tmp_path / "storage", tmp_path / "report")
    names = {p.name for p in paths}
    assert not any(n.startswith(("memory", "metrics")) for n in names)
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "*No peak memory panel: no peak memory above zero was recorded" in md
    assert "*No quality metrics panel: no real-mode run" in md
    assert "flicker_score" not in md  # tiny-mode metrics are not shown as quality


def test_runs_are_labelled_by_date_and_commit():
    from wan_pipeline.history.report import run_label
    from wan_pipeline.history.runs import Run

    run = Run(Path("0001_x.json"), {"datetime": "2026-11-03T04:05:06+00:00",
                                    "commit_info": {"id": "75e974f8c2b8aa", "dirty": True}, "benchmarks": []})
    assert run_label(run) == "2026-11-03 04:05\n75e974f8+"

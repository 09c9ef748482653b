"""The README's results table, generated from pytest-benchmark JSON files stored in the repository.

A measured figure is worth quoting only with what it was measured on, so the figures a user reads live in one
table that a command writes from stored benchmark files, never by hand. Each row is one benchmark of one file: its
configuration (preset, mode, precision, attention, compile, the memory cap and residency of a capped run), median
seconds, CV, effective TFLOP/s, peak memory and the cosine to bf16 SDPA where the benchmark recorded one. A second
table names each file with its date, GPU, driver, torch and diffusers versions and commit.

`update_results(markdown, sources)` rewrites the block between the two markers of a markdown file atomically;
everything outside the markers is left as it was. Reads files only: no torch import.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from wan_pipeline.errors import WanBenchError
from wan_pipeline.fsutil import atomic_write_bytes
from wan_pipeline.history.runs import HistoryFileError, Run, is_number, load_run
from wan_pipeline.plan.memory import cap_name

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
GIB = 2 ** 30


class ResultsError(WanBenchError):
    """A markdown file whose results block cannot be rewritten, or sources that give no files."""


@dataclass(frozen=True)
class RunInfo:
    """Where one stored file's figures come from."""

    index: int  # 1-based, as the rows refer to it
    path: str  # as shown: relative to the markdown file's folder where possible
    date: str
    gpu: str
    driver: str
    torch: str
    diffusers: str
    commit: str


@dataclass(frozen=True)
class ResultRow:
    run: int  # RunInfo.index
    benchmark: str
    preset: str
    mode: str
    precision: str
    attention: str
    compile: str
    memory_cap: str  # "24GB: stream-expert" (the cap and the residency it ran with), "" uncapped
    median_s: float
    cv: float | None  # stddev / mean of the rounds (pytest-benchmark's sample standard deviation)
    effective_tflops: float | None
    peak_memory_bytes: int | None
    cosine: float | None


@dataclass(frozen=True)
class Results:
    runs: list[RunInfo]
    rows: list[ResultRow]


def result_files(sources: Iterable[Path | str]) -> list[Path]:
    """The JSON files named, and every *.json under the folders named (recursively, README.md and the like
    ignored), without duplicates. A source that does not exist is an error."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*.json") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise ResultsError(f"{path}: no such file or folder")
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _text(value) -> str:
    return "" if value is None else str(value)


def _shown_path(path: Path, relative_to: Path | None) -> str:
    if relative_to is not None:
        try:
            return Path(os.path.relpath(path.resolve(), relative_to.resolve())).as_posix()
        except ValueError:  # another drive
            pass
    return path.as_posix()


def run_info(run: Run, index: int, relative_to: Path | None = None) -> RunInfo:
    """Date, GPU, driver, versions and commit of one file, from machine_info (the GPU snapshot and the environment
    fingerprint the plugin adds) and commit_info."""
    gpu = run.gpu or {}
    env = run.env
    commit = run.commit_info.get("id")
    commit = "" if not commit or commit == "unversioned" else str(commit)[:12]
    if commit and run.commit_info.get("dirty"):
        commit += " (uncommitted changes)"
    return RunInfo(
        index=index,
        path=_shown_path(run.path, relative_to),
        date=run.datetime[:10],
        gpu=_text(gpu.get("name")) or "no GPU",
        driver=_text(gpu.get("driver") or env.get("nvidia_driver")),
        torch=_text(env.get("version.torch")),
        diffusers=_text(env.get("version.diffusers")),
        commit=commit,
    )


def _compile(info: dict) -> str:
    value = info.get("compile")
    if isinstance(value, dict):
        value = value.get("enabled")
    if value is None:
        return ""
    return "on" if value else "off"


def _attention(info: dict) -> str:
    kernel = _text(info.get("attention_kernel"))
    attention = info.get("attention")
    requested = _text(attention.get("requested")) if isinstance(attention, dict) else ""
    if requested and kernel and requested != kernel:
        return f"{requested}: {kernel}"
    return kernel or requested


def _number(value) -> float | None:
    return float(value) if is_number(value) else None


def _memory_cap(info: dict) -> str:
    """The cap a run emulated (a smaller card's memory on this card's compute) and the residency it chose."""
    cap = info.get("memory_cap_bytes")
    if not is_number(cap) or cap <= 0:
        return ""
    memory = info.get("memory")
    policy = memory.get("policy") if isinstance(memory, dict) else None
    return f"{cap_name(int(cap))}: {policy}" if policy else cap_name(int(cap))


def benchmark_row(bench: dict, run_index: int) -> ResultRow:
    """One row from one benchmark of a pytest-benchmark file (already checked by load_run)."""
    info = bench.get("extra_info") or {}
    stats = bench["stats"]
    mean, stddev = _number(stats.get("mean")), _number(stats.get("stddev"))
    cv = stddev / mean if mean and stddev is not None else None
    peak = info.get("peak_memory")
    peak_bytes = peak.get("torch_peak_bytes") if isinstance(peak, dict) else None
    return ResultRow(
        run=run_index,
        benchmark=str(bench.get("name") or bench.get("fullname")),
        preset=_text(info.get("preset")),
        mode=_text(info.get("mode")),
        precision=_text(info.get("precision")),
        attention=_attention(info),
        compile=_compile(info),
        memory_cap=_memory_cap(info),
        median_s=float(stats["median"]),
        cv=cv,
        effective_tflops=_number(info.get("effective_tflops")),
        peak_memory_bytes=int(peak_bytes) if is_number(peak_bytes) and peak_bytes > 0 else None,
        cosine=_number(info.get("cosine_vs_bf16_sdpa")),
    )


def load_results(sources: Iterable[Path | str], relative_to: Path | None = None) -> Results:
    """Every benchmark of every file, oldest file first. A file that is not a usable pytest-benchmark file is an
    error naming it: the table is generated from stored files, and a broken one must be fixed, not skipped."""
    runs = []
    for path in result_files(sources):
        try:
            runs.append(load_run(path))
        except HistoryFileError as exc:
            raise ResultsError(f"{exc.path}: {exc.problem}; fix or remove this file and run the command again") \
                from None
    runs.sort(key=Run.sort_key)
    infos, rows = [], []
    for i, run in enumerate(runs, 1):
        infos.append(run_info(run, i, relative_to))
        rows += [benchmark_row(bench, i) for bench in run.data["benchmarks"]]
    return Results(infos, rows)


# ------------------------------------------------------------------------------------------------------ markdown

def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def format_seconds(seconds: float) -> str:
    if seconds >= 100:
        return f"{seconds:.1f}"
    if seconds >= 1:
        return f"{seconds:.2f}"
    return f"{seconds:.3g}"


def format_row(row: ResultRow) -> list[str]:
    return [
        f"`{_cell(row.benchmark)}`", _cell(row.preset), _cell(row.mode), _cell(row.precision), _cell(row.attention),
        row.compile,
        _cell(row.memory_cap),
        format_seconds(row.median_s),
        "" if row.cv is None or not math.isfinite(row.cv) else f"{row.cv * 100:.2f} %",
        "" if row.effective_tflops is None else f"{row.effective_tflops:.0f}" if row.effective_tflops >= 100
        else f"{row.effective_tflops:.3g}",
        "" if row.peak_memory_bytes is None else f"{row.peak_memory_bytes / GIB:.1f} GiB",
        "" if row.cosine is None else f"{row.cosine:.5f}",
        str(row.run),
    ]


_ROW_HEADER = ["benchmark", "preset", "mode", "precision", "attention", "compile", "memory cap", "median s", "CV",
               "effective TFLOP/s", "peak memory (torch)", "cosine vs bf16 SDPA", "run"]
_RUN_HEADER = ["run", "file", "date", "GPU", "driver", "torch", "diffusers", "commit"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def render_results(results: Results, regenerate: str | None = None) -> str:
    """The markdown between the markers: the rows, then the runs they came from (or one line: no stored run)."""
    how = f" Regenerate with `{regenerate}`." if regenerate else ""
    if not results.runs:
        return f"No stored benchmark run yet.{how}\n"
    lines = _table(_ROW_HEADER, [format_row(r) for r in results.rows])
    lines += ["", "Runs (median and CV over the timed rounds; peak memory is the torch allocator's):", ""]
    lines += _table(_RUN_HEADER, [[str(r.index), f"[`{_cell(r.path)}`]({r.path})", r.date, _cell(r.gpu),
                                   _cell(r.driver), _cell(r.torch), _cell(r.diffusers),
                                   f"`{r.commit}`" if r.commit else ""] for r in results.runs])
    if how:
        lines += ["", how.strip()]
    return "\n".join(lines) + "\n"


def replace_block(text: str, block: str, name: str = "the markdown file") -> str:
    """`text` with everything between the begin and end markers replaced by `block` (markers kept)."""
    begins, ends = text.count(BEGIN), text.count(END)
    if begins != 1 or ends != 1:
        raise ResultsError(f"{name}: needs exactly one {BEGIN} and one {END} line (found {begins} and {ends}); "
                           "add them where the results table belongs")
    start, stop = text.index(BEGIN), text.index(END)
    if stop < start:
        raise ResultsError(f"{name}: {END} comes before {BEGIN}")
    return text[: start + len(BEGIN)] + "\n" + block + text[stop:]


def update_results(markdown: Path | str, sources: Iterable[Path | str], regenerate: str | None = None) -> bool:
    """Rewrite the results block of `markdown` from the benchmark files in `sources`, atomically; True when the
    file changed. File paths in the table are relative to the markdown file's folder, so its links work."""
    markdown = Path(markdown)
    try:
        text = markdown.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResultsError(f"{markdown}: no such file; create it with a {BEGIN} line and a {END} line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{markdown}: cannot read: {exc}") from None
    results = load_results(sources, relative_to=markdown.parent)
    new = replace_block(text, render_results(results, regenerate), str(markdown))
    if new == text:
        return False
    atomic_write_bytes(markdown, new.encode("utf-8"))
    return True

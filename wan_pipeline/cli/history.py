"""`wan-bench compare`, `trend`, `report` and `results`: verdicts and tables from pytest-benchmark history files.

No torch import here or below: these commands start in well under a second on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from wan_pipeline.errors import WanBenchError
from wan_pipeline.fsutil import atomic_write_json
from wan_pipeline.history.compare import DEFAULT_ALPHA, DEFAULT_THRESHOLD
from wan_pipeline.history.runs import DEFAULT_STORAGE


def parse_percent(text: str) -> float:
    """'5', '5%' or '5 %' -> 0.05."""
    raw = str(text).strip().rstrip("%").strip()
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage: {text!r}") from None
    if not 0 <= value < 1000:
        raise argparse.ArgumentTypeError(f"percentage out of range: {text!r}")
    return value / 100.0


def _emit_json(obj: dict, target: str | None) -> None:
    if target is None:
        return
    if target == "-":
        print(json.dumps(obj, indent=2, default=str))
    else:
        atomic_write_json(target, obj)


def configure_compare_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("baseline", nargs="?", metavar="BASELINE",
                   help="baseline JSON file or storage folder (with no CURRENT: a folder's latest two runs on the "
                        f"same GPU, or a file and the run before it; default {DEFAULT_STORAGE})")
    p.add_argument("current", nargs="?", metavar="CURRENT", help="current JSON file or folder (its latest run)")
    p.add_argument("--threshold", type=parse_percent, default=DEFAULT_THRESHOLD, metavar="PCT",
                   help=f"smallest slowdown that counts, in percent (default {DEFAULT_THRESHOLD * 100:g})")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                   help=f"significance level of the one-sided Mann-Whitney U test (default {DEFAULT_ALPHA:g})")
    p.add_argument("--force", action="store_true", help="compare runs from different GPU models anyway")
    p.add_argument("--json", metavar="FILE", help="also write the verdict as JSON to FILE ('-' for stdout only)")
    missing = p.add_mutually_exclusive_group()
    missing.add_argument("--expect", action="append", metavar="PATTERN",
                         help="a benchmark the current run must hold (fnmatch pattern on the full or short name; "
                              "repeatable); with it, only these must be present (default: every benchmark of the "
                              "baseline, exit 1 when one is missing)")
    missing.add_argument("--allow-missing", action="store_true",
                         help="accept a current run that lacks some benchmarks of the baseline")


def run_compare(args: argparse.Namespace) -> int:
    from wan_pipeline.history.compare import compare
    from wan_pipeline.history.runs import pick_runs

    base, cur, skipped = pick_runs(args.baseline, args.current)
    result = compare(base, cur, threshold=args.threshold, force=args.force, alpha=args.alpha,
                     expected=args.expect, allow_missing=args.allow_missing)
    result.skipped = skipped
    if args.json == "-":
        _emit_json(result.to_json(), "-")
    else:
        print(result.format_text())
        _emit_json(result.to_json(), args.json)
    return result.exit_code


def configure_trend_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("storage", nargs="?", default=DEFAULT_STORAGE, metavar="STORAGE",
                   help=f"pytest-benchmark storage folder (default {DEFAULT_STORAGE})")
    p.add_argument("--benchmark", metavar="TEXT", help="only benchmarks whose name contains TEXT")
    p.add_argument("--threshold", type=parse_percent, default=DEFAULT_THRESHOLD, metavar="PCT",
                   help=f"smallest step reported, in percent (default {DEFAULT_THRESHOLD * 100:g})")
    p.add_argument("--min-runs", type=int, default=2, help="fewest runs on each side of a step (default 2)")
    p.add_argument("--json", metavar="FILE", help="also write the steps as JSON to FILE ('-' for stdout only)")


def trend_json(series_list) -> dict:
    return {"series": [{
        "benchmark": s.benchmark, "gpu": s.gpu,
        "runs": [{"path": str(r.path), "datetime": r.datetime, "median": m} for r, m in zip(s.runs, s.medians)],
        "steps": [{"run": str(st.run.path), "previous": str(st.previous.path), "datetime": st.run.datetime,
                   "before": st.before, "after": st.after, "ratio": st.ratio, "p": st.p,
                   "changes": [{"field": c.field, "before": c.baseline, "after": c.current} for c in st.changes]}
                  for st in s.steps],
    } for s in series_list]}


def run_trend(args: argparse.Namespace) -> int:
    from wan_pipeline.history.runs import HistoryError, load_history
    from wan_pipeline.history.trend import trend

    hist = load_history(args.storage)
    if not hist.runs:
        raise HistoryError(f"{args.storage}: no usable benchmark file")
    series = trend(hist, threshold=args.threshold, benchmark=args.benchmark, min_size=max(1, args.min_runs))
    if args.json != "-":
        for path, why in hist.skipped:
            print(f"skipped unusable file {path}: {why}", file=sys.stderr)
        for s in series:
            print(f"{s.benchmark} [{s.gpu}]: {len(s.runs)} runs, " +
                  (f"{len(s.steps)} step(s)" if s.steps else "no step"))
            for st in s.steps:
                print(f"  {st.describe()}")
    _emit_json(trend_json(series), args.json)
    return 0


def configure_report_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("storage", nargs="?", default=DEFAULT_STORAGE, metavar="STORAGE",
                   help=f"pytest-benchmark storage folder or one JSON file (default {DEFAULT_STORAGE})")
    p.add_argument("--out", metavar="DIR", required=True, help="folder for index.html, summary.md and the plots")
    p.add_argument("--threshold", type=parse_percent, default=DEFAULT_THRESHOLD, metavar="PCT",
                   help=f"threshold for the latest-run verdict and the change points (default {DEFAULT_THRESHOLD * 100:g})")
    p.add_argument("--title", default="wan-bench report", help="page title")


def run_report(args: argparse.Namespace) -> int:
    from wan_pipeline.history.report import write_report

    paths = write_report(args.storage, args.out, threshold=args.threshold, title=args.title)
    for path in paths:
        print(path)
    return 0


def configure_results_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="FILES_OR_FOLDER",
                   help="stored pytest-benchmark JSON files, or folders of them (every *.json inside, recursively; "
                        "the project keeps its own in docs/results)")
    p.add_argument("--out", default="README.md", metavar="MARKDOWN",
                   help="markdown file whose block between '<!-- results:begin -->' and '<!-- results:end -->' is "
                        "rewritten, atomically (default README.md; '-' prints the block instead)")


def _regenerate_command(sources: list[str], out: str) -> str:
    """The command line that wrote the table, as run from the markdown file's folder (so the table says how to
    regenerate it without naming this machine's paths)."""
    base = Path(out).resolve().parent if out != "-" else Path.cwd()

    def shown(path: str) -> str:
        try:
            rel = os.path.relpath(Path(path).resolve(), base)
        except ValueError:  # another drive
            return path
        return path if rel.startswith("..") else Path(rel).as_posix()

    target = "" if out == "-" else f" --out {Path(out).name}"
    return "wan-bench results " + " ".join(shown(s) for s in sources) + target


def run_results(args: argparse.Namespace) -> int:
    from wan_pipeline.history.results import load_results, render_results, update_results

    command = _regenerate_command(args.sources, args.out)
    if args.out == "-":
        print(render_results(load_results(args.sources), command), end="")
        return 0
    changed = update_results(args.out, args.sources, command)
    print(f"{args.out}: results table {'rewritten' if changed else 'already up to date'}")
    return 0


__all__ = ["WanBenchError", "parse_percent"]

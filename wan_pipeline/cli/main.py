"""`wan-bench` command line: one subcommand per job, each module owning its own arguments.

Subcommand modules are imported only when their command runs (and for --help), so `wan-bench compare` and
`wan-bench metrics` start without importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from wan_pipeline.errors import WanBenchError

# name -> (module, one-line help). The module provides configure_<name>_parser(parser) and run_<name>(args) -> int.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("wan_pipeline.cli.run", "print the plan of a preset or workflow (sigmas, passes, shapes)"),
    "run": ("wan_pipeline.cli.run", "run one generation and write the video and its result record"),
    "compare": ("wan_pipeline.cli.history", "compare two benchmark runs: verdict per benchmark, what changed; exit 1 on a regression"),
    "trend": ("wan_pipeline.cli.history", "find the runs where a benchmark stepped and what changed there"),
    "report": ("wan_pipeline.cli.history", "write an HTML page and a markdown summary with plots of the history"),
    "results": ("wan_pipeline.cli.history", "rewrite a markdown file's results table from stored benchmark files"),
    "budgets": ("wan_pipeline.cli.budgets", "write latency budgets for this card from one of its benchmark runs"),
    "crosscheck": ("wan_pipeline.cli.crosscheck", "the same workflow on a ComfyUI server and in wan-bench: seconds per "
                   "stage and the cosine of the two final latents"),
    "metrics": ("wan_pipeline.cli.metrics", "temporal-consistency metrics of a clip (flicker, SSIM, warp, motion)"),
}


DESCRIPTION = ("Benchmark the Wan 2.2 image-to-video A14B two-pass pipeline (ComfyUI's KSamplerAdvanced pair) and "
               "judge its history: plan, run, compare, trend, report, results, budgets, metrics, crosscheck.")
EXAMPLES = """examples:
  wan-bench plan --preset seed-832x1216-49f              the sigmas, hand-over and shapes (no model needed)
  wan-bench run --preset seed-832x1216-49f --out out/    one generation: video and JSON record
  wan-bench compare .benchmarks/<gpu-folder>             latest run against the one before: exit 1 on a regression
  wan-bench compare BASE.json CUR.json --expect 'test_generation*'
  wan-bench trend .benchmarks                            where each benchmark stepped, and what changed there
  wan-bench report .benchmarks --out report/             report/index.html and summary.md
  wan-bench metrics out/clip.mp4 --image start.png       temporal consistency of any clip
  wan-bench crosscheck --comfyui http://127.0.0.1:8188 --workflow wf.json --models ComfyUI/models

the benchmark suite itself is pytest: python3 -m pytest --benchmark-only --benchmark-autosave tests/benchmarks
exit status: 0 ok, 1 regression / partial run / out of memory, 2 bad input, 130 interrupted"""


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wan-bench")
    except PackageNotFoundError:  # a plain checkout on the path, not installed
        return "unknown (not installed)"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with the one line saying what was kept."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wan-bench", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            module = importlib.import_module(module_name)
            getattr(module, f"configure_{name}_parser")(p)
            p.set_defaults(_module=module_name, _handler=f"run_{name}")
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"wan-bench: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning  # a user reads what happened, not the line of code that said it
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    handler = getattr(importlib.import_module(args._module), args._handler)
    try:
        return int(handler(args) or 0)
    except WanBenchError as exc:
        print(f"wan-bench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed
        return 0
    except Exception as exc:
        if type(exc).__name__ != "OutOfMemoryError":
            raise
        first = (str(exc).strip().splitlines() or ["out of memory"])[0].split(". GPU")[0]
        print(f"wan-bench {args.command}: error: out of GPU memory: {first}. Try --precision fp8-scaled-mm or "
              f"fp8-upcast, a smaller preset, or free the card.", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        message = exc.message if isinstance(exc, Interrupted) else "interrupted; nothing half-written was left behind"
        print(f"wan-bench {args.command}: {message}", file=sys.stderr)
        return 130

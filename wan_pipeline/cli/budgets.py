"""`wan-bench budgets --from STORAGE_OR_JSON`: latency budgets for this card from one of its own benchmark runs.

Prints the `[[budget]]` entries as TOML, or merges them into `--out FILE` (atomically), which `pytest
--wan-budgets FILE` then checks. What was skipped, and which run was used, goes to stderr. No torch import.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from wan_pipeline.history.make_budgets import DEFAULT_HEADROOM


def configure_budgets_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, metavar="STORAGE_OR_JSON",
                   help="a pytest-benchmark JSON file, or a storage folder (its newest run that is not partial "
                        "and has a generation benchmark)")
    p.add_argument("--run", metavar="NAME", help="in a storage folder, the run to use: its file name or the start "
                                                 "of it (e.g. 0003)")
    p.add_argument("--headroom", default=f"{DEFAULT_HEADROOM * 100:g}%", metavar="PCT",
                   help=f"budget = median x (1 + headroom): 15%% or 0.15 (default {DEFAULT_HEADROOM * 100:g}%%)")
    p.add_argument("--out", metavar="FILE", help="budgets file to write (atomically); an existing one keeps its "
                                                 "other entries and comments, entries with the same keys are "
                                                 "replaced; without --out the TOML goes to stdout")


def run_budgets(args: argparse.Namespace) -> int:
    from wan_pipeline.history.make_budgets import make_budgets, parse_headroom, render_entries, write_budgets

    headroom = parse_headroom(args.headroom)
    made = make_budgets(args.source, headroom, args.run)
    for note in made.notes:
        print(note, file=sys.stderr)
    command = "wan-bench budgets --from " + shlex.quote(str(args.source)) + \
        (f" --run {shlex.quote(args.run)}" if args.run else "") + f" --headroom {shlex.quote(args.headroom)}"
    header = f"wan-bench latency budgets made by `{command}`"
    if args.out is None:
        print(render_entries(made.entries, header), end="")
        return 0
    for note in write_budgets(args.out, made.entries, header):
        print(note, file=sys.stderr)
    print(f"{args.out}: {len(made.entries)} budget(s) from {made.run.path}; check them with "
          f"`pytest --benchmark-only tests/benchmarks --wan-budgets {shlex.quote(str(args.out))}`")
    return 0

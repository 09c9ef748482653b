"""`wan-bench run --comfyui URL --workflow FILE`: one generation of the workflow on a ComfyUI server, timed from
the server's own events, with the stage breakdown, the saved clip and the record."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from wan_pipeline.errors import WanBenchError


def run_on_server(args: argparse.Namespace) -> int:
    from wan_pipeline.fsutil import atomic_write_json
    from wan_pipeline.run.comfyui.case import ComfyCaseRun, ServerSession, comfy_cases
    from wan_pipeline.run.comfyui.client import ComfyClient

    if not args.workflow:
        raise WanBenchError("--comfyui runs a workflow on the server: give --workflow FILE")
    session = ServerSession(ComfyClient(args.comfyui))
    session.fingerprint()  # unreachable or not ComfyUI: one clear error before anything runs
    case = comfy_cases(args.workflow)[0]  # the workflow as it is
    if args.seed is not None:
        case = dataclasses.replace(case, seed=args.seed)

    def progress(node, value, total):
        print(f"\r{case.id}: node #{node} step {value}/{total}", end="", file=sys.stderr, flush=True)

    run = ComfyCaseRun(session, case, on_progress=progress)
    run.generate_once()
    run.finish()
    print(file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    video = run.fetch_clip(out)
    info = run.extra_info(metrics=None, video=str(video) if video else None, mode=args.mode)
    record = atomic_write_json(out / f"{case.id}.json", run.record(info))
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in info["stages"].items())
    print(f"{case.id}: {run.rounds[-1].total_seconds:.2f} s on {session.client.url} "
          f"(ComfyUI {session.fingerprint().get('version')}): {stages}; video {video}; record {record}")
    return 0

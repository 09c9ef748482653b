"""The one rank entry point of sequence parallelism, started by torchrun (launch.torchrun) for both launchers:

    python -m wan_pipeline.launch.rank generate --preset ...   # wan-bench run --gpus N: one preset, timed
    python -m wan_pipeline.launch.rank pytest ARGS...          # pytest --wan-sp N: the user's session on every rank

Either way the rank joins the process group on its device first and leaves it last. In `generate` every rank builds
the same plan, seeds and synthetic weights and rank 0 writes the record; in `pytest` rank 0 is the session the user
sees, and the other ranks run it without the result files (benchmark JSON, history, junit XML).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from wan_pipeline.errors import WanBenchError
from wan_pipeline.run.parallel import FRAME_SAMPLE_STRIDE, gather_peaks


def in_torchrun_rank() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_world_size(degree: int) -> None:
    """A rank of a degree-N session must be one of N ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != degree:
        raise WanBenchError(f"sequence parallel degree {degree} runs {degree} ranks, this torchrun started {world}")


def join_process_group():
    """Join torchrun's process group on this rank's device (NCCL on a GPU, gloo on a CPU); returns the device."""
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
        return device
    dist.init_process_group("gloo")
    return torch.device("cpu")


def leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def generate(argv: list[str]) -> int:
    """One preset on this rank: warm-up, timed rounds, every rank's peak memory; rank 0 writes latent, frames, JSON."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from wan_pipeline.fsutil import atomic_write_json
    from wan_pipeline.plan.config import ModelSetKey, default_allocator_settings
    from wan_pipeline.plan.plan import make_plan
    from wan_pipeline.plan.presets import get_preset
    from wan_pipeline.run.case import CaseRun
    from wan_pipeline.run.models import load_model_set
    from wan_pipeline.run.pipeline import configure

    parser = argparse.ArgumentParser(prog="wan_pipeline.launch.rank generate")
    for name in ("--preset", "--mode", "--precision", "--attention", "--out", "--tag"):
        parser.add_argument(name, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    default_allocator_settings()

    device = join_process_group()
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        config = get_preset(args.preset).replace(precision=args.precision, attention=args.attention,
                                                 sequence_parallel=world)
        plan = make_plan(config, args.mode)
        models = load_model_set(ModelSetKey.for_run(plan.config, args.mode, None), device=device, seed=0,
                                config=plan.config)
        run = CaseRun(plan, configure(models, plan))
        run.warm_up(1)
        for _ in range(args.rounds):
            run.generate_once()
        peaks = gather_peaks(run.peak_bytes)
        if rank == 0:
            out = Path(args.out)
            last = run.rounds[-1]
            torch.save(last.latent, out / f"{args.tag}.latent.pt")
            np.save(out / f"{args.tag}.frames.npy", last.frames[::FRAME_SAMPLE_STRIDE])
            atomic_write_json(out / f"{args.tag}.json", {
                "preset": args.preset, "mode": args.mode, "world_size": world, "tokens": plan.tokens,
                "round_seconds": [g.total_seconds for g in run.rounds], "median_seconds": run.median_seconds,
                "stages": run.stage_medians, "per_rank_peak_memory_bytes": peaks, "notes": run.prepared.notes,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
            })
        dist.barrier()
    finally:
        leave_process_group()
    return 0


def run_pytest(argv: list[str]) -> int:
    """The user's pytest session on this rank; ranks other than 0 keep their results to themselves."""
    import pytest
    import torch.distributed as dist

    from wan_pipeline.launch.shards import worker_args

    join_process_group()
    try:
        return int(pytest.main(argv if dist.get_rank() == 0 else worker_args(argv)))
    finally:
        leave_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"generate": generate, "pytest": run_pytest}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m wan_pipeline.launch.rank {{{','.join(commands)}}} ARGS (started by torchrun)",
              file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())

"""What each torchrun rank runs: `worker_main` for `wan-bench run --gpus N` (the same plan, seeds and synthetic
weights on every rank, rank 0 writing the record), and `start_rank` / `stop_rank` for a rank of `pytest --wan-sp N`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from wan_pipeline.errors import WanBenchError
from wan_pipeline.run.parallel import FRAME_SAMPLE_STRIDE, gather_peaks

# pytest-benchmark's and pytest's result files: only rank 0 writes them.
RANK0_ONLY_OPTIONS = {"benchmark_json": None, "benchmark_save": None, "benchmark_autosave": False,
                      "benchmark_histogram": None, "xmlpath": None}


def start_rank(config, degree: int) -> None:
    """In a torchrun rank of `pytest --wan-sp N`: join the process group on this rank's GPU; ranks other than 0
    keep their results to themselves."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != degree:
        raise WanBenchError(f"--wan-sp {degree} runs {degree} ranks, this torchrun started {world}")
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    if dist.get_rank() != 0:
        for name, value in RANK0_ONLY_OPTIONS.items():
            if hasattr(config.option, name):
                setattr(config.option, name, value)


def stop_rank() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def worker_main(argv: list[str] | None = None) -> int:
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

    parser = argparse.ArgumentParser(prog="wan_pipeline.launch.rank")
    for name in ("--preset", "--mode", "--precision", "--attention", "--out", "--tag"):
        parser.add_argument(name, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    default_allocator_settings()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
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
                "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
            })
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0



if __name__ == "__main__":
    raise SystemExit(worker_main())

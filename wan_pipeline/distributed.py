"""Sequence-parallel generation: Ulysses over N local GPUs, one process per GPU (torchrun, NCCL).

`run_sequence_parallel` is the launcher (`wan-bench run --gpus N`): it runs the same preset on one GPU and then on
N, through `torch.distributed.run`, and reports seconds, speed-up, scaling efficiency, per-rank peak memory and
the cosine similarity of the final latents. `worker_main` is what each rank runs: the same plan, seeds and
synthetic weights on every rank, diffusers' context parallelism (`ContextParallelConfig(ulysses_degree=N)`,
`enable_parallelism`) splitting the experts' token sequence, and rank 0 writing the record.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .errors import WanBenchError

# Our attention names -> diffusers backends that implement context parallelism (Ulysses all-to-all).
CP_BACKENDS = {"sdpa": "native", "sdpa-cudnn": "_native_cudnn", "sdpa-flash": "_native_flash"}
LAUNCH_TIMEOUT_S = 3600


def check_degree(degree: int, heads: int, available: int) -> None:
    """Ulysses splits attention heads across ranks: the degree must divide them and fit the host's GPUs."""
    if degree < 1:
        raise WanBenchError(f"--gpus must be at least 1, got {degree}")
    if degree > available:
        raise WanBenchError(f"--gpus {degree} asks for more GPUs than this host has ({available} visible)")
    if heads % degree:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0 and d <= max(available, 1)]
        raise WanBenchError(f"Ulysses degree {degree} does not divide the {heads} attention heads; "
                            f"use one of {divisors}")


def scaling(single_seconds: float, parallel_seconds: float, degree: int) -> dict:
    """Speed-up and scaling efficiency of an N-GPU run against the one-GPU run of the same preset."""
    speedup = single_seconds / parallel_seconds
    return {"speedup": round(speedup, 3), "efficiency": round(speedup / degree, 3)}


def worker_command(degree: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={degree}",
            "-m", "wan_pipeline.distributed", *args]


def launch(degree: int, args: list[str], log: Path, timeout: float = LAUNCH_TIMEOUT_S) -> None:
    """Run the ranks; on failure or timeout, end the whole process group and say which rank failed and why."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(worker_command(degree, args), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    if rc != 0:
        lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()]
        failed = [l for l in lines if "Error" in l or "exitcode" in l or "rank" in l.lower()][-6:] or lines[-6:]
        what = f"timed out after {timeout:.0f} s" if rc is None else f"exited with {rc}"
        raise WanBenchError(f"the {degree}-GPU run {what}; all its processes were stopped. Last lines of {log}:\n  "
                            + "\n  ".join(failed))


def run_sequence_parallel(*, preset: str, mode: str, degree: int, precision: str, attention: str, rounds: int,
                          out_dir: str, timeout: float = LAUNCH_TIMEOUT_S) -> dict:
    """The one-GPU run, then the N-GPU run, of the same preset; their comparison, written atomically."""
    import torch

    from .models import A14B_TRANSFORMER, TINY_TRANSFORMER
    from .history import atomic_write_json

    heads = (TINY_TRANSFORMER if mode == "tiny" else A14B_TRANSFORMER)["num_attention_heads"]
    available = torch.cuda.device_count() if mode != "tiny" else max(degree, 1)
    check_degree(degree, heads, available)
    if attention not in CP_BACKENDS:
        raise WanBenchError(f"sequence parallelism runs diffusers' context-parallel attention: choose --attention "
                            f"from {sorted(CP_BACKENDS)}, not {attention!r}")
    out = Path(out_dir)
    records = {}
    for n in sorted({1, degree}):
        tag = f"{preset}-{mode}-gpus{n}"
        common = ["--preset", preset, "--mode", mode, "--precision", precision, "--attention", attention,
                  "--rounds", str(rounds), "--out", str(out), "--tag", tag]
        launch(n, common, out / f"{tag}.log", timeout)
        records[n] = json.loads((out / f"{tag}.json").read_text())
    single, parallel = records[1], records[degree]
    latents = {n: torch.load(out / f"{preset}-{mode}-gpus{n}.latent.pt") for n in records}
    from .reference import cosine

    summary = {
        "preset": preset, "mode": mode, "degree": degree, "precision": precision, "attention": attention,
        "single_gpu_seconds": single["median_seconds"], "parallel_seconds": parallel["median_seconds"],
        **scaling(single["median_seconds"], parallel["median_seconds"], degree),
        "per_rank_peak_memory_bytes": parallel["per_rank_peak_memory_bytes"],
        "single_gpu_peak_memory_bytes": single["per_rank_peak_memory_bytes"],
        "latent_cosine_vs_single_gpu": cosine(latents[degree], latents[1]),
        "stages_single": single["stages"], "stages_parallel": parallel["stages"],
    }
    atomic_write_json(out / f"{preset}-{mode}-sequence-parallel-{degree}.json", summary)
    return summary


# ------------------------------------------------------------------------------------------------ each rank


def enable_sequence_parallel(models, degree: int, attention: str) -> None:
    """Hand the experts' attention to diffusers' context-parallel backend and split their sequence over ranks."""
    from diffusers import ContextParallelConfig

    for expert in models.experts.values():
        expert.set_attention_backend(CP_BACKENDS[attention])
        expert.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))


def worker_main(argv: list[str] | None = None) -> int:
    import statistics

    import torch
    import torch.distributed as dist

    from .config import ModelSetKey
    from .config import default_allocator_settings
    from .models import load_model_set
    from .history import atomic_write_json
    from .pipeline import configure, generate
    from .plan import make_plan
    from .presets import get_preset

    parser = argparse.ArgumentParser(prog="wan_pipeline.distributed")
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
        config = get_preset(args.preset).replace(precision=args.precision, attention=args.attention)
        plan = make_plan(config, args.mode)
        models = load_model_set(ModelSetKey.for_run(plan.config, args.mode, None), device=device, seed=0,
                                config=plan.config)
        prepared = configure(models, plan)
        if world > 1:
            enable_sequence_parallel(models, world, args.attention)
            prepared.notes.append(f"Ulysses sequence parallelism over {world} ranks ({CP_BACKENDS[args.attention]})")
        generate(prepared, plan)  # warm-up
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        rounds = [generate(prepared, plan) for _ in range(args.rounds)]
        peak = torch.cuda.max_memory_allocated(device) if cuda else 0
        peaks = [None] * world
        dist.all_gather_object(peaks, peak)
        if rank == 0:
            out = Path(args.out)
            torch.save(rounds[-1].latent, out / f"{args.tag}.latent.pt")
            names = list(rounds[-1].seconds)
            atomic_write_json(out / f"{args.tag}.json", {
                "preset": args.preset, "mode": args.mode, "world_size": world, "tokens": plan.tokens,
                "round_seconds": [g.total_seconds for g in rounds],
                "median_seconds": statistics.median(g.total_seconds for g in rounds),
                "stages": {n: statistics.median(g.seconds[n] for g in rounds) for n in names},
                "per_rank_peak_memory_bytes": peaks, "notes": prepared.notes,
                "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
            })
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(worker_main())

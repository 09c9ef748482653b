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
import subprocess
import sys
import time
from pathlib import Path

from .errors import WanBenchError
from .processes import start_group, stop_group

# Our attention names -> diffusers backends that implement context parallelism (Ulysses all-to-all).
CP_BACKENDS = {"sdpa": "native", "sdpa-cudnn": "_native_cudnn", "sdpa-flash": "_native_flash"}
LAUNCH_TIMEOUT_S = 3600
FRAME_SAMPLE_STRIDE = 4  # every 4th decoded frame is kept to compare the N-GPU video with the one-GPU video


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


def check_sequence_parallel(degree: int, mode: str, available: int) -> None:
    """check_degree for the experts of `mode` (tiny has its own head count) over `available` devices."""
    from .models import A14B_TRANSFORMER, TINY_TRANSFORMER

    check_degree(degree, (TINY_TRANSFORMER if mode == "tiny" else A14B_TRANSFORMER)["num_attention_heads"], available)


def cp_backend(attention: str) -> str:
    """The diffusers context-parallel backend for one of our attention names (Ulysses needs diffusers' own)."""
    if attention not in CP_BACKENDS:
        raise WanBenchError(f"sequence parallelism runs diffusers' context-parallel attention: choose --attention "
                            f"from {sorted(CP_BACKENDS)}, not {attention!r}")
    return CP_BACKENDS[attention]


def torchrun_command(degree: int, module: str, args: list[str], *torchrun_options: str) -> list[str]:
    """`python -m torch.distributed.run` on this host with `degree` ranks, each running `python -m module args`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={degree}",
            *torchrun_options, "-m", module, *args]


def worker_command(degree: int, args: list[str]) -> list[str]:
    return torchrun_command(degree, "wan_pipeline.distributed", args)


def launch(degree: int, args: list[str], log: Path, timeout: float = LAUNCH_TIMEOUT_S) -> None:
    """Run the ranks; on failure or timeout, end the whole process group and say which rank failed and why."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = start_group(worker_command(degree, args), stdout=out, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            stop_group(proc)  # also whatever a finished torchrun left behind
    if rc != 0:
        lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()]
        failed = [l for l in lines if "Error" in l or "exitcode" in l or "rank" in l.lower()][-6:] or lines[-6:]
        what = f"timed out after {timeout:.0f} s" if rc is None else f"exited with {rc}"
        raise WanBenchError(f"the {degree}-GPU run {what}; all its processes were stopped. Last lines of {log}:\n  "
                            + "\n  ".join(failed))


def run_sequence_parallel(*, preset: str, mode: str, degree: int, precision: str, attention: str, rounds: int,
                          out_dir: str, timeout: float = LAUNCH_TIMEOUT_S) -> dict:
    """The one-GPU run, then the N-GPU run, of the same preset; their comparison, written atomically."""
    import numpy as np
    import torch

    from .history import atomic_write_json

    check_sequence_parallel(degree, mode, max(degree, 1) if mode == "tiny" else torch.cuda.device_count())
    cp_backend(attention)  # before any rank starts
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
    frames = {n: np.load(out / f"{preset}-{mode}-gpus{n}.frames.npy") for n in records}
    summary = {
        "preset": preset, "mode": mode, "degree": degree, "precision": precision, "attention": attention,
        "single_gpu_seconds": single["median_seconds"], "parallel_seconds": parallel["median_seconds"],
        **scaling(single["median_seconds"], parallel["median_seconds"], degree),
        "per_rank_peak_memory_bytes": parallel["per_rank_peak_memory_bytes"],
        "single_gpu_peak_memory_bytes": single["per_rank_peak_memory_bytes"],
        **match_single_gpu(latents[degree], frames[degree], latents[1], frames[1]),
        "stages_single": single["stages"], "stages_parallel": parallel["stages"],
    }
    atomic_write_json(out / f"{preset}-{mode}-sequence-parallel-{degree}.json", summary)
    return summary


# ------------------------------------------------------------------------------------------------ each rank


def enable_sequence_parallel(models, degree: int, attention: str):
    """Hand the experts' attention to diffusers' context-parallel backend and split their sequence over the ranks
    of the running process group (once per model set: diffusers cannot undo it). Returns this rank's VAE split."""
    import torch.distributed as dist

    from .vae_split import VaeBands

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != degree:
        have = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        raise WanBenchError(f"sequence parallel degree {degree} needs {degree} ranks started by torchrun, this process "
                            f"has {have}: use `wan-bench run --gpus {degree}` or `pytest --wan-sp {degree}`")
    backend = cp_backend(attention)
    from diffusers import ContextParallelConfig

    for expert in models.experts.values():
        expert.set_attention_backend(backend)
        if getattr(expert, "_wan_bench_ulysses", None) != degree:
            expert.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
            expert._wan_bench_ulysses = degree
    return VaeBands(parts=degree, rank=dist.get_rank())


def worker_main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch
    import torch.distributed as dist

    from .case import CaseRun
    from .config import ModelSetKey, default_allocator_settings
    from .history import atomic_write_json
    from .models import load_model_set
    from .pipeline import configure
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


# ------------------------------------------------------------------------------------------------ pytest --wan-sp
#
# `pytest --benchmark-only --wan-sp N` reruns the same pytest command under torchrun with N ranks, one per GPU. Every
# rank collects the same matrix, where each case appears at degree 1 and at degree N, and runs it in the same order
# with the same rounds (the collectives of a split generation need every rank). Rank 0 is the session the user
# sees: it alone writes the benchmark JSON, the history, the videos and the records; the other ranks' output goes
# to log files. Degree-1 cases run on every rank at once, each on its own GPU: rank 0's timing is the one-GPU
# figure that the N-GPU case's speed-up and scaling efficiency are computed against.


def is_primary_rank() -> bool:
    """True outside a process group and on rank 0: the process that writes results."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def torchrun_pytest_command(degree: int, args: list[str], log_dir: Path) -> list[str]:
    """The user's pytest command under torchrun: N ranks, rank 0 on the console, every rank's log in `log_dir`."""
    return torchrun_command(degree, "pytest", args, f"--log-dir={log_dir}", "--tee=3", "--local-ranks-filter=0")


def relaunch_pytest(config, degree: int) -> int:
    """Run this pytest session again as `degree` torchrun ranks and return rank 0's exit status. On an interrupt or
    a failure, the whole process group goes: no rank is left behind."""
    import torch

    from .pytest_plugin import read_options

    check_sequence_parallel(degree, read_options(config).mode, torch.cuda.device_count())  # one GPU per rank

    out = Path(config.invocation_params.dir) / read_options(config).out
    log_dir = out / "sequence-parallel" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    command = torchrun_pytest_command(degree, [str(a) for a in config.invocation_params.args], log_dir)
    print(f"wan-bench: --wan-sp {degree}: running this session as {degree} torchrun ranks (logs in {log_dir})",
          flush=True)
    proc = start_group(command, cwd=config.invocation_params.dir)
    try:
        return proc.wait()
    finally:
        stop_group(proc)  # also whatever a finished torchrun left behind


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


def rank_device():
    """This rank's GPU (None outside a process group: the default device)."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return None


def gather_peaks(peak_bytes: int) -> list[int]:
    """Every rank's peak memory, in rank order (a collective: all ranks call it)."""
    import torch.distributed as dist

    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak_bytes)
    return peaks


def sequence_parallel_info(degree: int, peak_bytes: int) -> dict | None:
    """extra_info of a split generation: the degree and every rank's peak memory (a collective: all ranks call it)."""
    if degree <= 1:
        return None
    return {"degree": degree, "backend": "ulysses", "per_rank_peak_memory_bytes": gather_peaks(peak_bytes)}


def match_single_gpu(latent, frames, single_latent, single_frames) -> dict:
    """How close a split generation is to the one-GPU one: cosine of the final latents, PSNR of the sampled frames."""
    from .metrics import psnr
    from .reference import cosine

    return {"latent_cosine_vs_single_gpu": cosine(latent, single_latent),
            "frames_psnr_vs_single_gpu_db": psnr(frames, single_frames)}


def compare_with_single_gpu(case, generation, store: dict) -> dict | None:
    """The split generation's output against the one-GPU generation of the same configuration in this session
    (kept in `store` when the one-GPU case runs): which case that is, cosine of the final latents, PSNR of the
    decoded frames."""
    frames = generation.frames[::FRAME_SAMPLE_STRIDE]
    if case.config.sequence_parallel <= 1:
        store[case.id] = (generation.latent, frames.copy())  # a copy: a strided view would keep every frame alive
        return None
    single = store.get(case.single_gpu_id)
    if single is None:
        return {"single_gpu_case": case.single_gpu_id, "latent_cosine_vs_single_gpu": None,
                "frames_psnr_vs_single_gpu_db": None}
    return {"single_gpu_case": case.single_gpu_id, **match_single_gpu(generation.latent, frames, *single)}


def add_scaling_to_json(benchmarks: list[dict]) -> list[str]:
    """Give every N-GPU generation its speed-up and scaling efficiency over the one-GPU case of the same
    configuration in the same session (pytest-benchmark JSON, in place); returns summary lines."""
    by_name = {b.get("name"): b for b in benchmarks}
    lines = []
    for bench in benchmarks:
        sp = (bench.get("extra_info") or {}).get("sequence_parallel") or {}
        degree = sp.get("degree") or 1
        if degree <= 1 or not sp.get("single_gpu_case"):
            continue
        single = by_name.get(f"{bench['name'].split('[', 1)[0]}[{sp['single_gpu_case']}]")  # same test, 1-GPU case
        if single is None:
            continue
        result = scaling(single["stats"]["median"], bench["stats"]["median"], degree)
        sp.update(single_gpu_seconds=single["stats"]["median"], **result)
        lines.append(f"{bench['name']}: {result['speedup']}x one GPU ({single['stats']['median']:.2f} s -> "
                     f"{bench['stats']['median']:.2f} s), scaling efficiency {result['efficiency']}")
    return lines


if __name__ == "__main__":
    raise SystemExit(worker_main())

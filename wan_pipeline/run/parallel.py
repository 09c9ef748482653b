"""Sequence parallelism, the torch side: Ulysses over the ranks of a running process group (diffusers' context
parallelism, `ContextParallelConfig(ulysses_degree=N)`, splitting the experts' token sequence), this rank's device,
every rank's peak memory, and the comparison of a split generation with the one-GPU one (speed-up, scaling
efficiency, cosine of the final latents, PSNR of the frames). torch is imported inside the functions only.
"""

from __future__ import annotations

from wan_pipeline.errors import WanBenchError

# Our attention names -> diffusers backends that implement context parallelism (Ulysses all-to-all).
CP_BACKENDS = {"sdpa": "native", "sdpa-cudnn": "_native_cudnn", "sdpa-flash": "_native_flash"}
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
    from wan_pipeline.run.models import A14B_TRANSFORMER, TINY_TRANSFORMER

    check_degree(degree, (TINY_TRANSFORMER if mode == "tiny" else A14B_TRANSFORMER)["num_attention_heads"], available)


def cp_backend(attention: str) -> str:
    """The diffusers context-parallel backend for one of our attention names (Ulysses needs diffusers' own)."""
    if attention not in CP_BACKENDS:
        raise WanBenchError(f"sequence parallelism runs diffusers' context-parallel attention: choose --attention "
                            f"from {sorted(CP_BACKENDS)}, not {attention!r}")
    return CP_BACKENDS[attention]


# ------------------------------------------------------------------------------------------------ each rank


def enable_sequence_parallel(models, degree: int, attention: str):
    """Hand the experts' attention to diffusers' context-parallel backend and split their sequence over the ranks
    of the running process group (once per model set: diffusers cannot undo it). Returns this rank's VAE split."""
    import torch.distributed as dist

    from wan_pipeline.run.vae_split import VaeBands

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


def is_primary_rank() -> bool:
    """True outside a process group and on rank 0: the process that writes results."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


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
    from wan_pipeline.measure.metrics import psnr
    from wan_pipeline.run.reference import cosine

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

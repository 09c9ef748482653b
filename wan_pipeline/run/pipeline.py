"""The two-pass pipeline, top to bottom: text encode, image encode, pass 1, switch, pass 2, decode.

`prepare` loads a model set and configures it for a plan (attention kernel, compile); `generate` runs one
generation with every stage bracketed by device synchronisation and its own peak-memory reading; `run_and_save`
is the CLI's whole job (plan, prepare, generate, write the video and the JSON result record).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from wan_pipeline.errors import WanBenchError
from wan_pipeline.fsutil import atomic_write_json
from wan_pipeline.plan.config import ModelSetKey, RunConfig, config_to_dict
from wan_pipeline.plan.plan import Plan, make_plan, uses_cfg
from wan_pipeline.plan.memory import working_memory
from wan_pipeline.run import attention, conditioning, vae_kernels
from wan_pipeline.run.models import ModelSet, Residency, load_model_set, resolve_run_precision
from wan_pipeline.run.sampler import flow_denoiser, run_pass


class StageTimer:
    """Seconds and peak allocator bytes per stage; synchronises the device at each boundary."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str):
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device)
                self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), peak)


@dataclass
class Prepared:
    """A model set configured for one plan: what `generate` needs besides the plan."""

    models: ModelSet
    kernel: attention.KernelChoice
    residency: Residency
    compile_enabled: bool
    image: np.ndarray  # the start image as loaded (ComfyUI's LoadImage: read once, not part of a round)
    notes: list[str] = field(default_factory=list)
    vae_bands: object | None = None  # vae_split.VaeBands: this rank's band (sequence parallel) or bands in turn


@dataclass
class Generation:
    frames: np.ndarray  # [T, H, W, 3] uint8
    latent: torch.Tensor  # final VAE-space latent (float32, CPU)
    seconds: dict[str, float]
    peak_bytes: dict[str, int]
    # stage -> bytes moved host->device: streamed expert blocks (pass stages), swapped-in experts ("switch")
    streamed_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def expert_attention_shape(models: ModelSet) -> tuple[int, int]:
    cfg = next(iter(models.experts.values())).config
    return cfg.num_attention_heads, cfg.attention_head_dim


def configure(models: ModelSet, plan: Plan) -> Prepared:
    """Install the attention kernel (profiled to prove which one runs), split the experts' sequence over the ranks
    (sequence parallel), compile if asked, speed up the VAE's memory-bound work (vae_kernels), decide residency,
    and load the start image."""
    heads, head_dim = expert_attention_shape(models)
    kernel, choice = attention.choose(plan.config.attention, tokens=plan.tokens, heads=heads, head_dim=head_dim,
                                      device=models.device, dtype=models.dtype)
    for expert in models.experts.values():
        attention.install(expert, kernel)
    notes = list(models.notes)
    config = plan.config
    inner = heads * head_dim
    capped_auto = config.residency == "auto" and config.memory_cap is not None and config.sequence_parallel == 1
    residency = Residency(models, lambda bands: working_memory(plan.tokens, plan.width, plan.height, inner, bands),
                          policy=config.residency, vae_bands=config.vae_bands, auto_bands=capped_auto)
    if residency.choice is not None:
        notes.append(memory_note(residency))
    vae_bands = None
    if plan.config.sequence_parallel > 1:
        from wan_pipeline.run.parallel import enable_sequence_parallel

        vae_bands = enable_sequence_parallel(models, plan.config.sequence_parallel, plan.config.attention)
        from wan_pipeline.run.parallel import cp_backend

        notes.append(f"Ulysses sequence parallelism over {vae_bands.parts} ranks; the VAE split into "
                     f"{vae_bands.parts} bands of rows, one per rank (halo {vae_bands.halo} latent rows); attention "
                     f"runs diffusers' context-parallel backend {cp_backend(plan.config.attention)!r} on each rank's "
                     f"share: the kernel recorded was profiled on one GPU at the full sequence")
    elif residency.vae_bands > 1:
        from wan_pipeline.run.vae_split import VaeBands

        vae_bands = VaeBands(residency.vae_bands)
        notes.append(f"VAE in {vae_bands.parts} bands of rows one after another (halo {vae_bands.halo} latent rows), "
                     f"as ComfyUI's tiled VAE nodes: less memory, frames close to the whole-frame VAE's")
    compile_enabled = models.key.compile
    if compile_enabled and residency.policy == "stream-expert" and models.device.type == "cuda":
        raise WanBenchError(
            f"{plan.config.name}: compile with streamed experts is not supported: the blocks compile as full graphs "
            f"and diffusers' group-offloading hooks, which bring each block in, are not traceable; run without "
            f"compile, or with a memory cap that keeps an expert whole (residency {residency.policy} was chosen)")
    if compile_enabled and not getattr(models, "_compiled", False):
        for expert in models.experts.values():
            expert.compile_repeated_blocks(fullgraph=True)
        models._compiled = True
    if models.device.type == "cuda":  # measured faster on an H100; on a CPU the stock modules are faster
        notes += vae_kernels.apply(models.vae, channels_last=True, fuse_norms=compile_enabled)
    residency.start()
    image = conditioning.start_image(plan.config.image, plan.width, plan.height)
    return Prepared(models, choice, residency, compile_enabled, image, notes, vae_bands)


def memory_note(residency: Residency) -> str:
    from wan_pipeline.plan.memory import format_bytes

    choice = residency.choice
    capped = getattr(residency.models.key, "memory_cap", None) is not None
    return (f"memory: residency {choice.policy}, VAE in {choice.vae_bands} band(s), planned for "
            f"{format_bytes(choice.budget)} ({'the memory cap' if capped else 'the card'}); needs by policy "
            + ", ".join(f"{k} {v / 1e9:.1f} GB" for k, v in choice.needs.items()))


def prepare(config: RunConfig, mode: str, models_dir: str | None = None, seed: int = 0) -> tuple[Plan, Prepared]:
    plan = make_plan(resolve_run_precision(config, mode, models_dir), mode)
    key = ModelSetKey.for_run(plan.config, mode, models_dir)
    models = load_model_set(key, seed=seed, models_dir=models_dir, config=plan.config)
    return plan, configure(models, plan)


@torch.no_grad()
def generate(prepared: Prepared, plan: Plan, progress: bool = False) -> Generation:
    models, residency = prepared.models, prepared.residency
    timer = StageTimer(models.device)
    config = plan.config
    needs_negative = any(uses_cfg(p.config.cfg) and p.steps_run for p in plan.passes)

    with timer.stage("text_encode"):
        residency.need("text_encoder")
        positive = conditioning.encode_text(models, config.prompt)
        negative = conditioning.encode_text(models, config.negative_prompt) if needs_negative else None
        residency.release("text_encoder")

    with timer.stage("image_encode"):
        residency.need("vae")
        image01 = conditioning.upscale_center(prepared.image, plan.width, plan.height)
        concat = conditioning.image_conditioning(models, image01, plan, prepared.vae_bands)

    streamed: dict[str, int] = {}
    latent = torch.zeros(plan.latent_shape, dtype=torch.float32, device=models.device)
    bar = _progress_bar(plan) if progress else None
    for i, pass_plan in enumerate(plan.passes, 1):
        swapped = residency.moved_bytes
        with timer.stage("switch"):
            residency.need(f"expert:{pass_plan.config.expert}")
        if residency.moved_bytes > swapped:
            streamed["switch"] = streamed.get("switch", 0) + residency.moved_bytes - swapped
        model = models.expert_for(pass_plan.config.expert)
        callback = (lambda step, sigma: bar.update(1)) if bar else None
        with timer.stage(f"pass{i}"):  # the denoiser's one-off cast of the image conditioning is the pass's work
            denoise = flow_denoiser(_call(model), concat, positive, negative, pass_plan.config.cfg, models.dtype)
            latent = run_pass(denoise, latent, pass_plan, config.seed, callback)
        moved = residency.streamed_bytes(pass_plan.config.expert, pass_plan.forwards)
        if moved:
            streamed[f"pass{i}"] = moved
    if bar:
        bar.close()

    with timer.stage("decode"):
        residency.need("vae")
        frames = conditioning.decode(models, latent, prepared.vae_bands)

    return Generation(frames, latent.cpu(), dict(timer.seconds), dict(timer.peak_bytes), streamed)


def _call(model):
    def forward(hidden_states, timestep, context):
        return model(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=context,
                     return_dict=False)[0]

    return forward


def _progress_bar(plan: Plan):
    from tqdm import tqdm

    return tqdm(total=sum(p.steps_run for p in plan.passes), desc=f"{plan.config.name} ({plan.mode})", unit="step")


def result_record(plan: Plan, prepared: Prepared, gen: Generation, extra: dict | None = None) -> dict:
    """The JSON record of one generation: configuration, plan, stage times, memory, kernel, environment."""
    from wan_pipeline.measure.telemetry import environment_fingerprint, gpu_snapshot

    models = prepared.models
    return {
        "preset": plan.config.name,
        "mode": plan.mode,
        "config": config_to_dict(plan.config),
        "plan": plan.to_json(),
        "stages": {k: round(v, 6) for k, v in gen.seconds.items()},
        "total_seconds": gen.total_seconds,
        "peak_memory_bytes": gen.peak_bytes,
        "load_seconds": models.load_seconds,
        "attention": prepared.kernel.to_json(),
        "compile": prepared.compile_enabled,
        "residency": prepared.residency.describe(),
        "precision": plan.config.precision,
        "notes": prepared.notes,
        "gpu": gpu_snapshot(),
        "env": environment_fingerprint(),
        **(extra or {}),
    }


def run_and_save(config: RunConfig, *, mode: str, models_dir: str | None, out_dir: str | os.PathLike,
                 video_format: str = "mp4", progress: bool = False) -> dict:
    """Plan, load, generate once, compute the metrics and write the video plus its JSON record."""
    from wan_pipeline.measure.media import write_video
    from wan_pipeline.measure.metrics import compute_metrics

    plan, prepared = prepare(config, mode, models_dir)
    gen = generate(prepared, plan, progress=progress)
    out = Path(out_dir)
    stem = f"{plan.config.name}-{plan.mode}-seed{plan.config.seed}"
    video_path = write_video(gen.frames, out / f"{stem}.{video_format}", plan.config.fps)
    metrics = compute_metrics(gen.frames, prepared.image)
    record = result_record(plan, prepared, gen, {
        "video": str(video_path),
        "metrics": metrics,
        "metrics_meaningful": plan.mode == "real",
    })
    record["record"] = str(out / f"{stem}.json")
    atomic_write_json(record["record"], record)
    return record

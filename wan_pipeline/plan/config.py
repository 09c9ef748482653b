"""Run configuration: what one generation is, before anything is planned or loaded.

A configuration mirrors what a ComfyUI user sets in the Wan 2.2 i2v template: image, prompts, size, length,
seed and an ordered list of KSamplerAdvanced passes, each bound to one expert. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass

from wan_pipeline.errors import WanBenchError

EXPERTS = ("high", "low")
SAMPLERS = ("euler",)
SCHEDULERS = ("simple",)
MODES = ("tiny", "synthetic", "real")
# fp8-upcast(-fp16): fp8 storage, bf16 (float16) math, ComfyUI's "default" weight_dtype for fp8_scaled files;
# fp8-scaled-mm(-fp16) is fp8 matmul with exact fp32 accumulation and bf16 (float16) output, ComfyUI's
# fp8_e4m3fn_fast; fp8-scaled-mm-fast lets the tensor cores accumulate as torchao's float8 inference does.
FP8_MATMUL_PRECISIONS = ("fp8-scaled-mm", "fp8-scaled-mm-fp16", "fp8-scaled-mm-fast")
FP8_PRECISIONS = ("fp8-upcast", "fp8-upcast-fp16", *FP8_MATMUL_PRECISIONS)
FP16_PRECISIONS = ("fp16", "fp8-upcast-fp16", "fp8-scaled-mm-fp16")  # compute in float16 on a GPU
PRECISIONS = ("auto", "bf16", "fp16", *FP8_PRECISIONS)
# UNETLoader's weight_dtype choices (ComfyUI 0.3.64 nodes.py); `auto` precision follows the workflow's.
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
# How a LoRA merged into fp8 weights is requantized: ComfyUI's stochastic rounding seeded per weight name, or
# round to nearest.
LORA_ROUNDINGS = ("comfyui", "nearest")
# The timed stages of one generation, in pipeline order (result records and reports use these names).
STAGES = ("text_encode", "image_encode", "pass1", "switch", "pass2", "decode")


def ordered_stages(*stage_dicts: dict) -> list[str]:
    """The stage names present in any of `stage_dicts`: pipeline order first, then any others sorted."""
    present = set().union(*stage_dicts)
    return [s for s in STAGES if s in present] + sorted(present - set(STAGES))


RESIDENCIES = ("auto", "resident", "offload-text-encoder", "offload-idle-expert", "stream-expert")
ATTENTION_BACKENDS = ("auto", "sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "sage", "flash-attn",
                      "cudnn-fp8", "fa3", "fa3-fp8")

# ComfyUI file names of the i2v A14B template (video_wan2_2_14B_i2v).
HIGH_NOISE_MODEL = "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"
LOW_NOISE_MODEL = "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"
HIGH_NOISE_LORA = "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors"
LOW_NOISE_LORA = "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors"
TEXT_ENCODER = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
VAE = "wan_2.1_vae.safetensors"

DEFAULT_PROMPT = (
    "A woman in a red coat walks along a rainy city street at night, neon reflections on the wet pavement, "
    "the camera slowly tracking beside her"
)
# The Chinese negative prompt that ships with the Wan templates.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)


class ConfigError(WanBenchError, ValueError):
    """A configuration value that cannot be run; the message names the field and the value."""


# ComfyUI 0.3.64's own input limits (nodes.py: MAX_RESOLUTION, KSamplerAdvanced, LoraLoaderModelOnly;
# comfy_extras/nodes_wan.py WanImageToVideo; comfy_extras/nodes_model_advanced.py ModelSamplingSD3): a value ComfyUI
# refuses is refused here too, where it enters (workflow import, the command line, the suite's options), before a
# run can grow without bound.
MAX_RESOLUTION = 16384
MAX_STEPS = 10000  # KSamplerAdvanced steps, start_at_step, end_at_step
MAX_SEED = 0xFFFFFFFFFFFFFFFF  # KSamplerAdvanced noise_seed: 0 .. 2**64 - 1
MAX_CFG = 100.0
MAX_SHIFT = 100.0
MAX_LORA_STRENGTH = 100.0
MAX_BATCH = 4096  # WanImageToVideo batch_size
MIN_VAE_BAND_ROWS = 64  # VAEDecodeTiled's smallest tile_size: a band is at least this many pixel rows


def check_range(what: str, value, low, high, integer: bool = True, why: str = "ComfyUI's limit"):
    """`value` if it is a number (an integer when `integer`) in [low, high]; else ConfigError naming `what`."""
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{what} must be {kind} in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{what} must be in [{low}, {high}] ({why}), got {value!r}")
    return value


def seed_value(text: str) -> int:
    """An argparse type for a noise seed: an integer in ComfyUI's 0 .. 2**64 - 1."""
    import argparse

    try:
        return check_range("seed", int(str(text).strip()), 0, MAX_SEED)
    except ValueError as exc:  # ConfigError is a ValueError too
        message = str(exc) if isinstance(exc, ConfigError) else f"must be an integer, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def vae_bands_value(text: str) -> int:
    """An argparse type for a VAE band count: an integer from 1 to MAX_RESOLUTION // MIN_VAE_BAND_ROWS (the size of
    the frame is checked against it when the run is planned)."""
    import argparse

    try:
        return check_range("vae bands", int(str(text).strip()), 1, MAX_RESOLUTION // MIN_VAE_BAND_ROWS,
                           why=f"bands of at least {MIN_VAE_BAND_ROWS} rows of the largest frame")
    except ValueError as exc:
        message = str(exc) if isinstance(exc, ConfigError) else f"must be an integer, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


@dataclass(frozen=True)
class PassConfig:
    """One KSamplerAdvanced node and the model chain feeding it (UNETLoader -> LoRA -> ModelSamplingSD3)."""

    expert: str
    model_file: str
    lora_file: str | None
    lora_strength: float
    shift: float
    steps: int
    start_at_step: int
    end_at_step: int
    add_noise: bool
    return_with_leftover_noise: bool
    cfg: float
    sampler: str = "euler"
    scheduler: str = "simple"
    weight_dtype: str = "default"  # the UNETLoader's weight_dtype

    def __post_init__(self):
        # One meaning of "no LoRA" for every consumer (model-set key, file lookup, loader): a LoRA at strength 0
        # changes nothing (ComfyUI skips it), and strength without a file is no LoRA.
        if not self.lora_file or self.lora_strength == 0:
            object.__setattr__(self, "lora_file", None)
            object.__setattr__(self, "lora_strength", 0.0)

    def validate(self, where: str = "pass") -> None:
        if self.expert not in EXPERTS:
            raise ConfigError(f"{where}: expert {self.expert!r} is not one of {EXPERTS}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"{where}: sampler {self.sampler!r} is not supported (supported: {SAMPLERS})")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"{where}: scheduler {self.scheduler!r} is not supported (supported: {SCHEDULERS})")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ConfigError(f"{where}: UNETLoader weight_dtype {self.weight_dtype!r} is not one of {WEIGHT_DTYPES}")
        check_range(f"{where}: steps", self.steps, 1, MAX_STEPS)
        check_range(f"{where}: start_at_step", self.start_at_step, 0, MAX_STEPS)
        check_range(f"{where}: end_at_step", self.end_at_step, 0, MAX_STEPS)
        if self.start_at_step > self.end_at_step:
            raise ConfigError(f"{where}: start_at_step {self.start_at_step} is after end_at_step "
                              f"{self.end_at_step}; a pass runs steps start_at_step..end_at_step")
        if not (isinstance(self.shift, (int, float)) and self.shift > 0 and math.isfinite(self.shift)):
            raise ConfigError(f"{where}: shift must be a positive number, got {self.shift!r}")
        check_range(f"{where}: shift", self.shift, 0.0, MAX_SHIFT, integer=False)
        if not (isinstance(self.cfg, (int, float)) and self.cfg > 0 and math.isfinite(self.cfg)):
            raise ConfigError(f"{where}: cfg must be a positive number, got {self.cfg!r}")
        check_range(f"{where}: cfg", self.cfg, 0.0, MAX_CFG, integer=False)
        check_range(f"{where}: LoRA strength", self.lora_strength, -MAX_LORA_STRENGTH, MAX_LORA_STRENGTH,
                    integer=False)


@dataclass(frozen=True)
class RunConfig:
    """One generation: conditioning inputs, geometry, seed, passes and the execution options."""

    name: str
    passes: tuple[PassConfig, ...]
    width: int = 832
    height: int = 1216
    length: int = 49
    fps: int = 16
    seed: int = 0
    batch_size: int = 1
    image: str | None = None  # None: the built-in test card (conditioning.test_card)
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    text_encoder_file: str = TEXT_ENCODER
    vae_file: str = VAE
    attention: str = "sdpa"
    precision: str = "auto"  # what ComfyUI does with fp8_scaled files on this card (precision.resolve_precision)
    compile: bool = False
    sequence_parallel: int = 1  # Ulysses degree: one generation split over this many GPUs (torchrun ranks)
    residency: str = "auto"  # what stays on the GPU (models.Residency); auto: everything that fits
    vae_bands: int = 1  # VAE in N bands of rows one after another (ComfyUI's tiled VAE nodes); 1: whole frame
    lora_rounding: str = "comfyui"  # LoRA into fp8 weights: ComfyUI's stochastic rounding, or "nearest"
    memory_cap: int | None = None  # bytes the CUDA allocator may use (a small card emulated); None: the whole card

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "RunConfig":
        """Check every field; return the configuration ComfyUI would actually run (geometry snapped, with a warning)."""
        if not self.passes:
            raise ConfigError(f"{self.name}: a run needs at least one sampling pass")
        for i, p in enumerate(self.passes, 1):
            p.validate(f"{self.name}: pass {i} ({p.expert})")
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(f"{self.name}: attention {self.attention!r} is not one of {ATTENTION_BACKENDS}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"{self.name}: precision {self.precision!r} is not one of {PRECISIONS}")
        if self.lora_rounding not in LORA_ROUNDINGS:
            raise ConfigError(f"{self.name}: lora_rounding {self.lora_rounding!r} is not one of {LORA_ROUNDINGS}")
        if self.residency not in RESIDENCIES:
            raise ConfigError(f"{self.name}: residency {self.residency!r} is not one of {RESIDENCIES}")
        for field_name in ("width", "height", "length", "fps", "batch_size", "sequence_parallel", "vae_bands"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{self.name}: {field_name} must be a positive integer, got {value!r}")
        if self.memory_cap is not None and (not isinstance(self.memory_cap, int) or self.memory_cap < 1):
            raise ConfigError(f"{self.name}: memory_cap must be a positive number of bytes, got {self.memory_cap!r}")
        if self.width < 16 or self.height < 16:
            raise ConfigError(f"{self.name}: width and height must be at least 16, got {self.width}x{self.height}")
        for field_name in ("width", "height", "length"):
            check_range(f"{self.name}: {field_name}", getattr(self, field_name), 1, MAX_RESOLUTION)
        check_range(f"{self.name}: batch_size", self.batch_size, 1, MAX_BATCH)
        check_range(f"{self.name}: seed", self.seed, 0, MAX_SEED)
        most_bands = max(1, self.height // MIN_VAE_BAND_ROWS)
        if self.vae_bands > most_bands:
            raise ConfigError(f"{self.name}: vae_bands {self.vae_bands} leaves bands under {MIN_VAE_BAND_ROWS} rows "
                              f"of a {self.height}-row frame (ComfyUI's smallest VAE tile); use at most {most_bands}")
        if self.sequence_parallel > 1 and self.vae_bands not in (1, self.sequence_parallel):
            raise ConfigError(f"{self.name}: with sequence parallelism the VAE bands are the {self.sequence_parallel} "
                              f"ranks; vae_bands {self.vae_bands} cannot apply as well")
        snapped = snap_geometry(self.width, self.height, self.length)
        if snapped != (self.width, self.height, self.length):
            w, h, n = snapped
            warnings.warn(
                f"{self.name}: {self.width}x{self.height}x{self.length} is not runnable as given; ComfyUI's "
                f"WanImageToVideo steps width/height by 16 and makes (length-1)//4+1 latent frames, so "
                f"{w}x{h}x{n} is used",
                stacklevel=2,
            )
            return self.replace(width=w, height=h, length=n)
        return self


def compile_values(value: str | None) -> tuple[bool, ...]:
    """TORCH_COMPILE as users set it (or --wan-compile): 0/1 and their spellings, or `both` (the suite's matrix)."""
    v = (value or "0").strip().lower()
    if v == "both":
        return (False, True)
    if v in ("1", "true", "yes", "on"):
        return (True,)
    if v in ("0", "false", "no", "off", ""):
        return (False,)
    raise ConfigError(f"--wan-compile / TORCH_COMPILE must be 0, 1 or both, got {value!r}")


def snap_geometry(width: int, height: int, length: int) -> tuple[int, int, int]:
    """ComfyUI's rule: width/height in steps of 16 (rounded down), length of the form 4k+1 (rounded down)."""
    return (width // 16) * 16, (height // 16) * 16, ((length - 1) // 4) * 4 + 1


def two_pass(
    *,
    shift_high: float,
    shift_low: float,
    steps: int,
    split: int,
    cfg: float,
    lora: bool,
    lora_strength: float = 1.0,
) -> tuple[PassConfig, PassConfig]:
    """The A14B template's two KSamplerAdvanced passes: high noise [0, split), low noise [split, steps)."""
    high = PassConfig(
        expert="high",
        model_file=HIGH_NOISE_MODEL,
        lora_file=HIGH_NOISE_LORA if lora else None,
        lora_strength=lora_strength,  # no file: PassConfig makes it 0
        shift=shift_high,
        steps=steps,
        start_at_step=0,
        end_at_step=split,
        add_noise=True,
        return_with_leftover_noise=True,
        cfg=cfg,
    )
    low = PassConfig(
        expert="low",
        model_file=LOW_NOISE_MODEL,
        lora_file=LOW_NOISE_LORA if lora else None,
        lora_strength=lora_strength,  # no file: PassConfig makes it 0
        shift=shift_low,
        steps=steps,
        start_at_step=split,
        end_at_step=10000,
        add_noise=False,
        return_with_leftover_noise=False,
        cfg=cfg,
    )
    return high, low


def config_to_dict(config: RunConfig) -> dict:
    """A JSON-ready dict of the configuration (for result records)."""
    return dataclasses.asdict(config)


@dataclass(frozen=True)
class ModelSetKey:
    """What must be loaded for a run: runs with equal keys share loaded models."""

    mode: str
    models_dir: str | None
    experts: tuple[tuple[str, str, str | None, float], ...]  # (expert, model_file, lora_file, lora_strength)
    text_encoder_file: str
    vae_file: str
    precision: str
    attention: str
    compile: bool
    sequence_parallel: int = 1  # experts with context parallelism enabled cannot go back: part of the weights
    lora_rounding: str = "comfyui"  # how LoRAs were merged into fp8 weights: part of the weights
    memory_cap: int | None = None  # a capped run builds or loads what does not fit in host memory

    @classmethod
    def for_run(cls, config: RunConfig, mode: str, models_dir: str | None) -> "ModelSetKey":
        experts = []
        seen = set()
        for p in config.passes:
            item = (p.expert, p.model_file, p.lora_file, float(p.lora_strength))
            if item not in seen:
                seen.add(item)
                experts.append(item)
        return cls(
            mode=mode,
            models_dir=models_dir if mode == "real" else None,
            experts=tuple(experts),
            text_encoder_file=config.text_encoder_file,
            vae_file=config.vae_file,
            precision=config.precision,
            attention=config.attention,
            compile=config.compile,
            sequence_parallel=config.sequence_parallel,
            lora_rounding=config.lora_rounding,
            memory_cap=config.memory_cap,
        )

    def weights(self) -> "ModelSetKey":
        """What forces a reload: everything but the attention kernel, which is re-installed in place."""
        return dataclasses.replace(self, attention="*")


def default_allocator_settings() -> None:
    """Expandable segments unless the user chose an allocator: 14B experts plus a VAE at 49 frames leave little
    room for fragmentation on an 80 GB card. Must run before CUDA is initialised; recorded in the fingerprint."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

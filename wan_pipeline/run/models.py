"""Model sources (real, synthetic, tiny) behind one ModelSet, and where each component lives in memory.

*synthetic* and *tiny* build the same diffusers / transformers classes as *real*: synthetic at the A14B size
with random weights created directly on the GPU in the target dtype (no host copy), tiny with a few layers on a
CPU. Everything downstream (conditioning, sampler, pipeline) sees only a ModelSet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field

import torch

from wan_pipeline.errors import WanBenchError
from wan_pipeline.plan.config import FP8_PRECISIONS, FP16_PRECISIONS, ModelSetKey, RunConfig

# WanTransformer3DModel configuration of the A14B i2v experts (the Wan 2.2 I2V-A14B config).
A14B_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=36,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
)
TINY_TRANSFORMER = dict(A14B_TRANSFORMER, num_attention_heads=2, attention_head_dim=24, text_dim=32, freq_dim=32,
                        ffn_dim=64, num_layers=2)

# UMT5-XXL encoder (docs/comfyui.md, section 14) and a tiny one of the same class.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_encoder_decoder=False,
                tie_word_embeddings=False, layer_norm_epsilon=1e-6)
TINY_UMT5 = dict(UMT5_XXL, vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)

# AutoencoderKLWan() defaults are the Wan 2.1 VAE; tiny keeps z_dim 16 and the 4x/8x compression.
WAN21_VAE: dict = {}
TINY_VAE = dict(base_dim=8, num_res_blocks=1)

TEXT_CONTEXT = 512  # UMT5 tokens the experts attend to (ComfyUI pads to at least 512)


def run_device(mode: str) -> torch.device:
    """Where a mode runs: tiny on the CPU, the others on the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() and mode != "tiny" else "cpu")


def resolve_run_precision(config: RunConfig, mode: str, models_dir: str | None = None) -> RunConfig:
    """The configuration with `precision="auto"` replaced by what ComfyUI runs on this machine: it follows the
    first pass's UNETLoader weight_dtype and, in real mode, the high-noise file's format and scaled_fp8 marker
    (read from its header); synthetic and tiny runs stand for the template's fp8_scaled files."""
    from wan_pipeline.run.precision import resolve_precision

    if config.precision != "auto":
        return config
    device = run_device(mode)
    weight_dtype = config.passes[0].weight_dtype if config.passes else "default"
    file_format, fp8_matmul_file = "fp8_scaled", False
    if mode == "real" and models_dir and device.type == "cuda":
        from wan_pipeline.run import loading

        try:
            files = loading.find_model_files(models_dir, config)
        except loading.LoadingError:
            files = None  # loading reports the missing files later, with every folder searched
        if files is not None:
            first = files.experts[config.passes[0].expert].model
            file_format = loading.file_format(first)
            marker = loading.scaled_fp8_marker_elements(first)
            fp8_matmul_file = marker is not None and marker != 2
    return config.replace(precision=resolve_precision("auto", device, weight_dtype=weight_dtype,
                                                      file_format=file_format, fp8_matmul_file=fp8_matmul_file))


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype activations run in: float32 on a CPU (tiny mode), else bf16 or fp16."""
    if device.type == "cpu":
        return torch.float32
    return torch.float16 if precision in FP16_PRECISIONS else torch.bfloat16


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_on_device(factory, device: torch.device, dtype: torch.dtype, seed: int):
    """Construct a module straight on `device` in `dtype`, its random init seeded (no full-precision host copy)."""
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        module = factory()
    return module.eval().requires_grad_(False)


def keep_fp32_modules(model: torch.nn.Module) -> torch.nn.Module:
    """Cast the submodules diffusers keeps in float32 (`_keep_in_fp32_modules`), as its loader does."""
    patterns = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, module in model.named_modules():
        if any(p in name.split(".") for p in patterns):
            module.float()
    return model


def random_transformer(config: dict, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    model = build_on_device(lambda: WanTransformer3DModel(**config), device, dtype, seed)
    return keep_fp32_modules(model)


def random_vae(config: dict, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    return build_on_device(lambda: AutoencoderKLWan(**config), device, dtype, seed)


def random_text_encoder(config: dict, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(**config)
    return build_on_device(lambda: UMT5EncoderModel(cfg), device, dtype, seed)


class ByteTokenizer:
    """Tokenizer for random-weight encoders: UTF-8 bytes as ids (there is no vocabulary to honour).

    Shapes follow ComfyUI's umt5 tokenization (loading.UMT5Tokenizer): no start token, end token 1, padding 0 up
    to at least 512.
    """

    def __init__(self, vocab_size: int, min_length: int = TEXT_CONTEXT):
        self.vocab_size = vocab_size
        self.min_length = min_length

    def tokenize(self, text: str):
        from wan_pipeline.run.loading import TokenizedPrompt

        ids = [2 + (b % (self.vocab_size - 2)) for b in text.encode("utf-8")] + [1]
        pad = max(self.min_length - len(ids), 0)
        return TokenizedPrompt(ids + [0] * pad, [1] * len(ids) + [0] * pad)


@dataclass
class ModelSet:
    """Everything a run needs, loaded once: experts by name, text encoder + tokenizer, VAE."""

    key: ModelSetKey
    experts: dict[str, torch.nn.Module]
    text_encoder: torch.nn.Module
    tokenizer: object  # .tokenize(text) -> TokenizedPrompt(ids, attention_mask)
    vae: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    load_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # offloaded component -> its host copy by tensor name: made at the first offload (an untimed warm-up), kept
    # for every later case on this set, since the weights never change
    host_copies: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def device_name(self) -> str | None:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None

    def expert_for(self, expert: str) -> torch.nn.Module:
        return self.experts[expert]


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


class Residency:
    """Keeps the components on the GPU while they fit; otherwise moves idle ones to CPU memory (as ComfyUI does).

    `policy` is decided once per model set: "resident" (everything stays), "offload-text-encoder" (the encoder
    leaves after encoding), or "offload-idle-expert" (one expert at a time; the swap is its own timed stage).
    """

    def __init__(self, models: ModelSet, reserve_bytes: int, total_bytes: int | None = None, policy: str = "auto"):
        self.models = models
        self.device = models.device
        self.sizes = {
            "text_encoder": parameter_bytes(models.text_encoder),
            "vae": parameter_bytes(models.vae),
            **{f"expert:{k}": parameter_bytes(m) for k, m in models.experts.items()},
        }
        if self.device.type != "cuda":
            self.policy = "resident"
            return
        total = total_bytes if total_bytes is not None else torch.cuda.get_device_properties(self.device).total_memory
        experts = sum(v for k, v in self.sizes.items() if k.startswith("expert:"))
        largest_expert = max(v for k, v in self.sizes.items() if k.startswith("expert:"))
        fits = {
            "resident": sum(self.sizes.values()) + reserve_bytes <= total,
            "offload-text-encoder": experts + self.sizes["vae"] + reserve_bytes <= total,
            "offload-idle-expert": largest_expert + self.sizes["vae"] + reserve_bytes <= total,
        }
        if policy != "auto":
            if not fits[policy]:
                raise WanBenchError(f"residency {policy!r} does not fit this card ({total / 1e9:.1f} GB) with "
                                    f"{reserve_bytes / 1e9:.1f} GB working memory; try auto")
            self.policy = policy
        elif fits["resident"]:
            self.policy = "resident"
        elif fits["offload-text-encoder"]:
            self.policy = "offload-text-encoder"
        elif fits["offload-idle-expert"]:
            self.policy = "offload-idle-expert"
        else:
            raise WanBenchError(
                f"{models.key.mode} models do not fit: one expert ({largest_expert / 1e9:.1f} GB) + VAE + "
                f"{reserve_bytes / 1e9:.1f} GB working memory exceed the card's {total / 1e9:.1f} GB"
            )

    def _module(self, name: str) -> torch.nn.Module:
        if name == "text_encoder":
            return self.models.text_encoder
        if name == "vae":
            return self.models.vae
        return self.models.experts[name.split(":", 1)[1]]

    def _place(self, name: str, device: torch.device | str) -> None:
        module = self._module(name)
        first = next(module.parameters(), None)
        target = torch.device(device)
        if first is None or first.device.type == target.type:
            return
        if target.type == "cpu":
            self._offload(name, module)
        else:
            module.to(target, non_blocking=True)  # from pinned host memory: an asynchronous copy

    def _offload(self, name: str, module: torch.nn.Module) -> None:
        """Point the module back at its host copy. Weights never change, so the model set's copy made at the first
        offload (pinned, for fast copies back) is reused by every case and later offloads move no data."""
        host = self.models.host_copies.get(name)
        if host is None:
            host = self.models.host_copies[name] = {key: _host_copy(t) for key, t in _tensors(module)}
        for key, tensor in _tensors(module):
            tensor.data = host[key]

    def need(self, name: str) -> None:
        """Make `name` resident on the device, evicting what the policy says must leave: the text encoder for
        anything else, and (one expert at a time) the other experts for an expert or the text encoder."""
        if self.device.type != "cuda":
            return
        if self.policy != "resident" and name != "text_encoder":
            self._place("text_encoder", "cpu")
        if self.policy == "offload-idle-expert" and name != "vae":
            for other in self.sizes:
                if other.startswith("expert:") and other != name:
                    self._place(other, "cpu")
        self._place(name, self.device)

    def place_all(self) -> None:
        """Every component on the device, whatever the policy (for code that manages no memory itself)."""
        for name in self.sizes:
            self._place(name, self.device)

    def release(self, name: str) -> None:
        if self.device.type == "cuda" and self.policy != "resident" and name == "text_encoder":
            self._place(name, "cpu")

    def describe(self) -> dict:
        return {"policy": self.policy, "bytes": dict(self.sizes)}


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """One copy into page-locked host memory (a plain host copy when none can be pinned)."""
    try:
        return torch.empty_like(tensor, device="cpu", pin_memory=True).copy_(tensor.detach())
    except RuntimeError:  # no page-locked memory to spare, or no CUDA to pin with
        return tensor.detach().to("cpu", copy=True)


def _tensors(module: torch.nn.Module):
    yield from module.named_parameters()
    yield from module.named_buffers()


def working_memory_estimate(tokens: int, width: int, height: int, inner_dim: int = 5120, vae_bands: int = 1) -> int:
    """Bytes a run needs beyond the weights: the larger of a transformer forward's activations and the VAE.

    VAE encode/decode of 49 x 1216 x 832 in bf16 is taken as 12 GiB (a round figure above what the allocator showed
    for the decode stage on an 80 GB card, so the estimate errs high) and scales with the frame area; a block's activations are about a dozen bf16 copies of the hidden states.
    3 GiB margin for the allocator and the text encoder's activations.
    """
    vae = int(12 * 2**30 * (width * height) / (832 * 1216) / vae_bands)
    transformer = tokens * inner_dim * 2 * 12
    return max(vae, transformer) + 3 * 2**30


def load_model_set(key: ModelSetKey, *, device: torch.device | None = None, seed: int = 0,
                   models_dir: str | None = None, config: RunConfig | None = None) -> ModelSet:
    """Load (real) or build (synthetic, tiny) every component of `key`, timed."""
    if device is None:
        device = run_device(key.mode)
    if key.precision == "auto":
        from wan_pipeline.run.precision import resolve_precision

        key = dataclasses.replace(key, precision=resolve_precision("auto", device))
    if key.mode == "synthetic" and device.type != "cuda":
        raise WanBenchError("synthetic mode builds the full A14B experts on a GPU; on a CPU use --mode tiny")
    dtype = compute_dtype(key.precision, device)
    start = time.perf_counter()
    if key.mode == "real":
        models = _load_real(key, device, dtype, models_dir or key.models_dir, config)
    else:
        models = _build_random(key, device, dtype, seed)
    from wan_pipeline.run.precision import apply_precision

    for name, expert in models.experts.items():
        models.notes += apply_precision(expert, key.precision, dtype, run_on=device)
    if key.mode != "real" and key.precision in FP8_PRECISIONS:
        from wan_pipeline.run.precision import store_text_encoder_fp8

        models.notes += store_text_encoder_fp8(models.text_encoder, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    models.load_seconds = time.perf_counter() - start
    return models


def _build_random(key: ModelSetKey, device: torch.device, dtype: torch.dtype, seed: int) -> ModelSet:
    tiny = key.mode == "tiny"
    transformer_cfg = TINY_TRANSFORMER if tiny else A14B_TRANSFORMER
    te_cfg = TINY_UMT5 if tiny else UMT5_XXL
    experts = {}
    for i, (expert, *_rest) in enumerate(key.experts):
        experts[expert] = random_transformer(transformer_cfg, device, dtype, seed + 1 + i)
    text_encoder = random_text_encoder(te_cfg, device, dtype, seed + 101)
    vae = random_vae(TINY_VAE if tiny else WAN21_VAE, device, dtype, seed + 201)
    what = "a few-layer configuration of the A14B classes" if tiny else "the full A14B architecture"
    return ModelSet(
        key=key,
        experts=experts,
        text_encoder=text_encoder,
        tokenizer=ByteTokenizer(te_cfg["vocab_size"]),
        vae=vae,
        device=device,
        dtype=dtype,
        notes=[f"{key.mode}: {what} with random weights; timings are real, the video is noise and its quality "
               f"metrics are meaningless"],
    )


def _load_real(key: ModelSetKey, device: torch.device, dtype: torch.dtype, models_dir: str | None,
               config: RunConfig | None) -> ModelSet:
    from wan_pipeline.run import loading

    if not models_dir:
        raise WanBenchError("real mode needs a models folder: pass --models DIR or set WAN_MODELS_DIR")
    if config is None:
        raise WanBenchError("real mode needs the run configuration to know which files to load")
    files = loading.find_model_files(models_dir, config)
    keep_fp8 = key.precision in FP8_PRECISIONS
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    park = expert_load_device(device, total, [files.experts[e[0]].model.stat().st_size for e in key.experts],
                              keep_fp8)
    experts = {}
    expert_notes: list[str] = []
    for expert, _model_file, _lora, _strength in key.experts:
        found = files.experts[expert]
        weights = loading.load_expert_weights(found.model, lora_path=found.lora, lora_strength=found.lora_strength,
                                              compute_dtype=dtype, keep_fp8=keep_fp8,
                                              lora_rounding=key.lora_rounding, merge_device=device)
        expert_notes += [f"expert {expert}: {n}" for n in weights.notes]
        model = loading.load_transformer(weights, device=park, dtype=dtype)
        experts[expert] = attach_fp8_scales(model, weights.fp8_scales, weights.input_scales, dtype)
    text_encoder, tokenizer = loading.load_text_encoder(files.text_encoder, device=device, dtype=dtype)
    notes = [f"real: weights from {files.root} ({files.layout} layout)", *expert_notes]
    if text_encoder.fp8_file_scales:  # an fp8 file stays in fp8, as ComfyUI keeps it
        from wan_pipeline.run.precision import store_text_encoder_fp8

        notes += store_text_encoder_fp8(text_encoder, dtype, text_encoder.fp8_file_scales)
    vae = loading.load_vae(files.vae, device=device, dtype=dtype)
    return ModelSet(key=key, experts=experts, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae,
                    device=device, dtype=dtype, notes=notes)


def expert_load_device(device: torch.device, device_bytes: int | None, file_bytes: list[int],
                       keep_fp8: bool) -> torch.device:
    """Where real experts are loaded: on the device when all of them fit with room to run, else in CPU memory,
    from where the residency policy brings one at a time (a 24 GB card with two 14 GB fp8 experts)."""
    if device.type != "cuda" or device_bytes is None:
        return device
    # fp8 files dequantized to bf16 double in size; 12 GiB for the text encoder, VAE and working memory
    needed = sum(file_bytes) * (1 if keep_fp8 else 2) + 12 * 2**30
    return device if needed <= device_bytes else torch.device("cpu")


def attach_fp8_scales(model: torch.nn.Module, scales: dict, input_scales: dict, dtype: torch.dtype):
    """Give each fp8-stored Linear its file scale (precision.apply_precision runs it in fp8); dequantize any other
    fp8 parameter, which no fp8 kernel would consume."""
    for name, scale in scales.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr == "weight" and isinstance(module, torch.nn.Linear) and ".blocks." in f".{module_name}":
            module.weight_scale = scale
            if name in input_scales:
                module.input_scale = input_scales[name]
        else:
            param = getattr(module, attr)
            param.data = (param.data.float() * scale.to(param.device)).to(dtype)
    return model

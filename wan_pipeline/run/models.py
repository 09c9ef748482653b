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
from wan_pipeline.plan.memory import (ComponentBytes, MemoryChoice, Working, choose_memory, policy_needs,
                                      working_memory_bytes)
from wan_pipeline.run.memory import (built_in_host, component_bytes, copy_bandwidth, device_budget,
                                     enable_streaming, pinned_copy, to_host)

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


def random_transformer(config: dict, device: torch.device, dtype: torch.dtype, seed: int,
                       in_host: bool = False, quantize_block=None) -> torch.nn.Module:
    """A seeded random expert. `in_host`: the same values (drawn on `device`, in the same order), each transformer
    block and each top-level part moved to pinned host memory as soon as it is whole (run.memory.built_in_host): an
    expert that does not fit the device beside its working memory never has to. `quantize_block`
    (precision.block_quantizer) swaps each block to fp8 on the device before it moves, so the host holds the fp8
    expert only, never its bf16 weights."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    if not in_host:
        return keep_fp32_modules(build_on_device(lambda: WanTransformer3DModel(**config), device, dtype, seed))

    with built_in_host(unit=WanTransformerBlock, top=WanTransformer3DModel, finish=quantize_block):
        model = build_on_device(lambda: WanTransformer3DModel(**config), device, dtype, seed)
    return to_host(keep_fp32_modules(to_host(model, pin=False)))  # pinned: the fp32 casts made new host tensors


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
    streaming: dict[str, dict] | None = None  # expert -> what a forward streams (Residency.start installs it)
    host_to_device_bandwidth: float | None = None  # bytes/s of one pinned block copy, measured at that install

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
    """Keeps the components on the GPU while they fit the memory budget (the cap, else the card); otherwise moves
    idle ones to pinned host memory (as ComfyUI does) or streams the experts from there.

    `policy` is decided once per model set and plan (plan.memory.choose_memory, the fastest that fits; with
    `auto_bands` the VAE bands may rise to let a faster one fit): "resident"
    (everything stays), "offload-text-encoder" (the encoder leaves after encoding), "offload-idle-expert" (one
    expert at a time; the swap is its own timed stage) or "stream-expert" (the experts stay in host memory and run
    block by block through diffusers' group offloading). `reserve_bytes`: the working memory (plan.memory.Working,
    one figure for every stage, or a function of the VAE bands giving a Working).
    """

    def __init__(self, models: ModelSet, reserve_bytes, total_bytes: int | None = None,
                 policy: str = "auto", vae_bands: int = 1, auto_bands: bool = False):
        self.models = models
        self.device = models.device
        self.vae_bands = vae_bands
        self.choice: MemoryChoice | None = None
        self.moved_bytes = 0  # host->device bytes of whole components brought in by need() (swaps)
        self.sizes = {
            "text_encoder": parameter_bytes(models.text_encoder),
            "vae": parameter_bytes(models.vae),
            **{f"expert:{k}": parameter_bytes(m) for k, m in models.experts.items()},
        }
        if self.device.type != "cuda":
            self.policy = "resident"
            return
        if total_bytes is None:
            total_bytes = device_budget(self.device, getattr(models.key, "memory_cap", None))
        if callable(reserve_bytes):  # VAE bands -> Working
            working_at = reserve_bytes
        else:
            fixed = reserve_bytes if isinstance(reserve_bytes, Working) else Working(reserve_bytes, reserve_bytes)
            working_at = lambda bands: fixed  # noqa: E731
        sizes = self.component_bytes()
        needs_at = lambda bands: policy_needs(sizes, working_at(bands))  # noqa: E731
        if getattr(models, "streaming", None) and policy == "auto":
            policy = "stream-expert"  # group offloading hooks stay on the model set once installed
        what = f"the {models.key.mode} model set"
        self.choice = choose_memory(needs_at, total_bytes, policy=policy, vae_bands=vae_bands,
                                    auto_bands=auto_bands, what=what)
        self.policy, self.vae_bands = self.choice.policy, self.choice.vae_bands

    def component_bytes(self) -> ComponentBytes:
        experts = self.models.experts
        if all(isinstance(m, torch.nn.Module) for m in experts.values()):
            measured = component_bytes(experts, self.models.text_encoder, self.models.vae)
            return dataclasses.replace(measured, experts=tuple(self.sizes[f"expert:{k}"] for k in experts),
                                       text_encoder=self.sizes["text_encoder"], vae=self.sizes["vae"])
        sizes = tuple(self.sizes[f"expert:{k}"] for k in experts)
        return ComponentBytes(sizes, self.sizes["text_encoder"], self.sizes["vae"], 0, max(sizes))

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
            self.moved_bytes += self.sizes.get(name, 0)
            module.to(target, non_blocking=True)  # from pinned host memory: an asynchronous copy

    def _offload(self, name: str, module: torch.nn.Module) -> None:
        """Point the module back at its host copy. Weights never change, so the model set's copy made at the first
        offload (pinned, for fast copies back) is reused by every case and later offloads move no data."""
        host = self.models.host_copies.get(name)
        if host is None:
            host = self.models.host_copies[name] = {key: _host_copy(t) for key, t in _tensors(module)}
        for key, tensor in _tensors(module):
            tensor.data = host[key]

    def start(self) -> None:
        """Put the model set in the shape the policy runs it in: streamed experts get their offloading hooks (once
        per model set), experts kept in host memory by the others wait there until a pass needs them."""
        if self.device.type != "cuda":
            return
        if self.policy == "stream-expert":
            if not getattr(self.models, "streaming", None):
                self.models.streaming = {name: enable_streaming(expert, self.device)
                                         for name, expert in self.models.experts.items()}
                first = next(iter(self.models.experts.values()))
                blocks = getattr(first, "blocks", None)
                self.models.host_to_device_bandwidth = copy_bandwidth(blocks[0], self.device) if blocks else None
        elif getattr(self.models, "streaming", None):
            raise WanBenchError("this model set streams its experts (group offloading installed); residency "
                                f"{self.policy!r} needs a fresh model set")

    def need(self, name: str) -> None:
        """Make `name` resident on the device, evicting what the policy says must leave: the text encoder for
        anything else, and (one expert at a time) the other experts for an expert or the text encoder. Streamed
        experts are brought in block by block by their hooks, never whole."""
        if self.device.type != "cuda":
            return
        if self.policy != "resident" and name != "text_encoder":
            self._place("text_encoder", "cpu")
        if self.policy == "offload-idle-expert" and name != "vae":
            for other in self.sizes:
                if other.startswith("expert:") and other != name:
                    self._place(other, "cpu")
        if self.policy == "stream-expert" and name.startswith("expert:"):
            return
        self._place(name, self.device)

    def place_all(self) -> None:
        """Every component on the device, whatever the policy (for code that manages no memory itself)."""
        for name in self.sizes:
            self._place(name, self.device)

    def release(self, name: str) -> None:
        if self.device.type == "cuda" and self.policy != "resident" and name == "text_encoder":
            self._place(name, "cpu")

    def streamed_bytes(self, expert: str, forwards: int) -> int:
        """Bytes one pass of `forwards` forwards moves host->device: every group of the expert once per forward."""
        info = (getattr(self.models, "streaming", None) or {}).get(expert)
        return info["bytes_per_forward"] * forwards if info and self.policy == "stream-expert" else 0

    def describe(self) -> dict:
        out = {"policy": self.policy, "bytes": dict(self.sizes), "vae_bands": self.vae_bands}
        if self.choice is not None:
            out["budget_bytes"] = self.choice.budget
            out["needs_bytes"] = dict(self.choice.needs)
            out["smallest_cap_bytes"] = self.choice.smallest_cap
        if self.policy == "stream-expert" and getattr(self.models, "streaming", None):
            out["streaming"] = {k: dict(v) for k, v in self.models.streaming.items()}
            out["host_to_device_bandwidth_bytes_per_s"] = getattr(self.models, "host_to_device_bandwidth", None)
        return out


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in (pinned, where it can be) host memory, never the tensor itself."""
    copy = pinned_copy(tensor)
    return copy if copy is not tensor else tensor.detach().clone()


def _tensors(module: torch.nn.Module):
    yield from module.named_parameters()
    yield from module.named_buffers()


def experts_in_host(key: ModelSetKey, device: torch.device, config: RunConfig | None) -> bool:
    """Whether the experts are built or loaded in pinned host memory: when the policy the memory budget allows for
    this plan (estimated A14B sizes) does not keep both experts on the device at once."""
    if device.type != "cuda" or config is None or key.mode == "tiny":
        return False
    from wan_pipeline.plan.memory import plan_memory
    from wan_pipeline.plan.plan import make_plan

    budget = device_budget(device, key.memory_cap)
    try:
        choice = plan_memory(make_plan(config, key.mode), budget)
    except WanBenchError:
        return True  # nothing fits by the estimate: the host is the only place; configure() says why it fails
    return choice.policy in ("offload-idle-expert", "stream-expert")


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
    in_host = experts_in_host(key, device, config)
    if in_host and device.type == "cuda" and key.mode != "tiny":
        from wan_pipeline.plan.memory import a14b_pinned_expert_bytes
        from wan_pipeline.run.memory import check_host_room

        fp8 = key.precision in FP8_PRECISIONS
        check_host_room(len(key.experts) * a14b_pinned_expert_bytes(fp8),
                        f"{len(key.experts)} A14B experts in {'fp8' if fp8 else '16-bit'} in pinned host memory")
    start = time.perf_counter()
    if key.mode == "real":
        models = _load_real(key, device, dtype, models_dir or key.models_dir, config, in_host)
    else:
        models = _build_random(key, device, dtype, seed, in_host)
    from wan_pipeline.run.precision import apply_precision

    for name, expert in models.experts.items():
        staged = device if in_host and device.type == "cuda" else None
        models.notes += apply_precision(expert, key.precision, dtype, run_on=device, stage_on=staged)
        if in_host:  # the host tensors are the model set's host copy: offloading them again moves no data
            models.host_copies[f"expert:{name}"] = dict(_tensors(to_host(expert, pin=device.type == "cuda")))
    if in_host:
        models.notes.append("experts kept in pinned host memory (they do not fit the memory budget beside their "
                            "working memory); the residency policy brings them in")
    if key.mode != "real" and key.precision in FP8_PRECISIONS:
        from wan_pipeline.run.precision import store_text_encoder_fp8

        models.notes += store_text_encoder_fp8(models.text_encoder, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    models.load_seconds = time.perf_counter() - start
    return models


def _build_random(key: ModelSetKey, device: torch.device, dtype: torch.dtype, seed: int,
                  in_host: bool = False) -> ModelSet:
    tiny = key.mode == "tiny"
    transformer_cfg = TINY_TRANSFORMER if tiny else A14B_TRANSFORMER
    te_cfg = TINY_UMT5 if tiny else UMT5_XXL
    experts = {}
    quantize_block = None
    if in_host and device.type == "cuda":  # fp8 blocks swapped on the device as they are built: no bf16 host copy
        from wan_pipeline.run.precision import block_quantizer

        quantize_block = block_quantizer(key.precision, dtype, device)
    for i, (expert, *_rest) in enumerate(key.experts):
        experts[expert] = random_transformer(transformer_cfg, device, dtype, seed + 1 + i, in_host=in_host,
                                             quantize_block=quantize_block)
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
               config: RunConfig | None, in_host: bool = False) -> ModelSet:
    from wan_pipeline.run import loading

    if not models_dir:
        raise WanBenchError("real mode needs a models folder: pass --models DIR or set WAN_MODELS_DIR")
    if config is None:
        raise WanBenchError("real mode needs the run configuration to know which files to load")
    files = loading.find_model_files(models_dir, config)
    keep_fp8 = key.precision in FP8_PRECISIONS
    park = torch.device("cpu") if in_host else expert_load_device(
        device, device_budget(device, key.memory_cap), [files.experts[e[0]].model.stat().st_size
                                                        for e in key.experts], keep_fp8)
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

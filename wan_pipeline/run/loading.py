"""Loading the user's real weight files: ComfyUI ``models/`` folders, diffusers folders, fp8 formats and LoRAs.

Transformer files in the original Wan key layout are read, their fp8 scales split off, the LoRA merged (in the stored
precision, see :mod:`wan_pipeline.run.lora`), the key names converted with diffusers'
``convert_wan_transformer_to_diffusers`` and the result loaded into a ``WanTransformer3DModel`` built from a config
inferred from the tensor shapes (never ``from_single_file``: it drops ``scale_weight`` and mistakes Wan 2.2 for 2.1).
The VAE goes through diffusers' ``convert_wan_vae_to_diffusers``. Only safetensors are read; pickle files are refused (finding and checking the files is
:mod:`wan_pipeline.run.model_files`, which needs no torch).

fp8 formats understood: plain float8_e4m3fn weights (scale 1); ComfyUI's ``scaled_fp8`` marker with
``<layer>.scale_weight`` (and ``.scale_input``, recorded in ``input_scales``); ComfyUI's newer form, a
``_quantization_metadata`` JSON in the safetensors header (or per-layer ``<layer>.comfy_quant`` JSON tensors) with
``{"layers": {layer: {"format": "float8_e4m3fn"}}}`` and ``<layer>.weight_scale`` / ``<layer>.input_scale`` tensors.
Other formats named there (int8, nvfp4, ...) are refused with an error naming the layer and the format.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights  # parameters on the meta device, buffers (rope tables) built for real

from wan_pipeline.run.lora import LoraError, LoraReport, apply_lora
from wan_pipeline.run.model_files import (CheckpointError, LoadingError, MissingModelFiles, ModelFiles,
                                          PickleCheckpointRefused, _diffusers_weight_files, find_model_files,
                                          read_safetensors_header)

__all__ = [
    "CheckpointError", "ExpertWeights", "LoadingError", "LoraError", "MissingModelFiles", "ModelFiles",
    "PickleCheckpointRefused", "UMT5Tokenizer", "TokenizedPrompt", "build_transformer", "find_model_files",
    "load_expert_weights", "load_text_encoder", "load_transformer", "load_vae", "read_safetensors",
]

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
FP8 = torch.float8_e4m3fn

def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors (on the CPU) and the header metadata of a checked safetensors file."""
    from safetensors import safe_open

    path = Path(path)
    header, metadata = read_safetensors_header(path)
    out = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in header:
                out[name] = f.get_tensor(name)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
        raise CheckpointError(f"{path}: cannot read tensors ({exc})") from None
    return out, metadata


# ---------------------------------------------------------------------------------------------------------------
# fp8 formats


def _strip_prefix(sd: dict, prefixes=PREFIXES) -> dict:
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in sd):
            return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
    return sd


@dataclass
class _Split:
    tensors: dict  # name -> stored tensor (fp8 stays fp8)
    scales: dict  # weight name -> float32 scalar, for every float8_e4m3fn weight
    input_scales: dict
    source_format: str
    marker_elements: int | None = None  # elements of the scaled_fp8 marker tensor; None: no marker


def _split_fp8(sd: dict, metadata: dict, path: Path) -> _Split:
    """Separate scale tensors from weights (all key names already without the model prefix)."""
    sd = dict(sd)
    layers: dict[str, dict] = {}
    raw = metadata.get("_quantization_metadata")
    if raw:
        try:
            layers.update(json.loads(raw)["layers"])
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{path}: unreadable _quantization_metadata in the header") from None
    for k in [k for k in sd if k.endswith(".comfy_quant")]:
        try:
            layers[k[: -len(".comfy_quant")]] = json.loads(bytes(sd.pop(k).tolist()).decode())
        except ValueError:
            raise CheckpointError(f"{path}: tensor {k} is not a JSON quantization marker") from None
    layers = {next((n[len(p):] for p in PREFIXES if n.startswith(p)), n): v for n, v in layers.items()}
    marker = sd.pop("scaled_fp8", None)
    scaled = marker is not None
    scales, input_scales = {}, {}
    for layer, conf in layers.items():
        fmt = conf.get("format") if isinstance(conf, dict) else conf
        if fmt != "float8_e4m3fn":
            raise CheckpointError(f"{path}: layer {layer} uses the quantization format {fmt!r}; only "
                                  "float8_e4m3fn (per-tensor scale) is supported")
    for k in list(sd):
        for suffix, dest in ((".scale_weight", scales), (".weight_scale", scales),
                             (".scale_input", input_scales), (".input_scale", input_scales)):
            if k.endswith(suffix):
                t = sd.pop(k)
                if t.numel() != 1:
                    raise CheckpointError(f"{path}: tensor {k} has shape {tuple(t.shape)}; only per-tensor "
                                          "(one-element) fp8 scales are supported")
                dest[k[: -len(suffix)] + ".weight"] = t.float().reshape(())
                break
    for k in scales:
        if k not in sd:
            raise CheckpointError(f"{path}: scale for {k} but no tensor {k}")
        if sd[k].dtype != FP8:
            raise CheckpointError(f"{path}: tensor {k} has a scale but is stored as {sd[k].dtype}, not float8_e4m3fn")
    plain_fp8 = [k for k, t in sd.items() if t.dtype == FP8 and k not in scales]
    for k in plain_fp8:
        scales[k] = torch.tensor(1.0)
    if scaled or raw or layers or len(scales) > len(plain_fp8):
        fmt = "fp8_scaled"
    elif plain_fp8:
        fmt = "fp8_e4m3fn"
    else:
        dtypes = [t.dtype for k, t in sd.items() if t.is_floating_point() and k.endswith(".weight")]
        common = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
        fmt = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(common, str(common))
    return _Split(sd, scales, input_scales, fmt, None if marker is None else marker.numel())


# The Linear layers of ComfyUI's WanModel (comfy/ldm/wan/model.py), by original tensor name.
_WAN_LINEAR = re.compile(r"(text_embedding\.[02]|time_embedding\.[02]|time_projection\.1|head\.head|img_emb\.proj\.[13]"
                         r"|blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o|k_img|v_img)|blocks\.\d+\.ffn\.[02])"
                         r"\.(weight|bias)")


def comfy_scaled_fp8_storage(sd: dict, scales: dict, original_names: dict[str, str]) -> tuple[int, int]:
    """Store every Linear of an fp8_scaled (``scaled_fp8`` marker) transformer as ComfyUI 0.3.64 does: its
    scaled-fp8 Linear is created in float8_e4m3fn (comfy/ops.py ``scaled_fp8_ops`` passes the marker's dtype to
    ``torch.nn.Linear``), so the file's biases are copied into fp8 unscaled, and a weight the file holds in another
    dtype is cast to fp8 with the default scale 1. ``original_names``: original Wan name -> key in ``sd``.
    Returns (weights cast to fp8, biases cast to fp8)."""
    weights = biases = 0
    for orig, key in original_names.items():
        t = sd.get(key)
        if t is None or t.dtype == FP8 or not t.is_floating_point() or not _WAN_LINEAR.fullmatch(orig):
            continue
        sd[key] = t.to(FP8)  # round to nearest, saturating (what copying into an fp8 parameter does)
        if orig.endswith(".bias"):
            biases += 1
        else:
            scales[key] = torch.tensor(1.0)
            weights += 1
    return weights, biases


def scaled_fp8_marker_elements(path) -> int | None:
    """The element count of a transformer file's ``scaled_fp8`` marker (header only); None without one or for a
    folder. ComfyUI turns its fp8 optimizations on for a marker of any size but two."""
    path = Path(path)
    if path.is_dir():
        return None
    header, _ = read_safetensors_header(path)
    for prefix in ("",) + PREFIXES:
        info = header.get(prefix + "scaled_fp8")
        if info is not None:
            return math.prod(info["shape"])
    return None


def file_format(path) -> str:
    """fp8_scaled / fp8_e4m3fn / bf16 / fp16 / fp32 of a transformer file, from its header alone."""
    path = Path(path)
    if path.is_dir():
        return "fp8_scaled" if any("scale" in k for f in _diffusers_weight_files(path)
                                   for k in read_safetensors_header(f)[0]) else "bf16"
    header, metadata = read_safetensors_header(path)
    if metadata.get("_quantization_metadata") or any(k.endswith(("scaled_fp8", ".scale_weight", ".weight_scale",
                                                                  ".comfy_quant")) for k in header):
        return "fp8_scaled"
    dtypes = [v["dtype"] for k, v in header.items() if k.endswith(".weight")]
    common = max(set(dtypes), key=dtypes.count) if dtypes else "F32"
    return {"F8_E4M3": "fp8_e4m3fn", "BF16": "bf16", "F16": "fp16"}.get(common, "fp32")


def _finalize(sd: dict, scales: dict, *, compute_dtype, keep_fp8: bool, fp32_modules=()) -> dict:
    """Dequantize (or keep) fp8 tensors and cast the rest in place; returns the scales of the kept fp8 tensors."""
    kept = {}
    for k, t in sd.items():
        fp32 = any(m in k.split(".") for m in fp32_modules)
        target = torch.float32 if fp32 else compute_dtype
        if k in scales:
            if keep_fp8 and not fp32 and t.dtype == FP8:
                kept[k] = scales[k]
                continue
            sd[k] = (t.float() * scales[k]).to(target)
        elif t.is_floating_point():
            sd[k] = t.to(target)
    return kept


# ---------------------------------------------------------------------------------------------------------------
# Transformer experts


@dataclass
class ExpertWeights:
    """One expert's weights in diffusers ``WanTransformer3DModel`` names, ready for :func:`load_transformer`.

    ``state_dict``: float tensors in ``compute_dtype`` (float32 for the modules diffusers keeps in float32:
    ``time_embedder``, ``scale_shift_table``, ``norm1/2/3``), or float8_e4m3fn for weights kept in fp8.
    ``fp8_scales``: diffusers weight name -> float32 scalar, for every tensor kept in fp8 (``weight.float() * scale``).
    ``input_scales``: the static activation scales some fp8_scaled files carry (``scale_input``), recorded only.
    """

    state_dict: dict[str, torch.Tensor]
    fp8_scales: dict[str, torch.Tensor]
    config: dict
    source_format: str
    path: Path
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)
    lora: LoraReport | None = None
    original_names: dict[str, str] = field(default_factory=dict)  # diffusers name -> name in the file
    notes: list[str] = field(default_factory=list)  # for the run record: where loading followed a ComfyUI quirk
    marker_elements: int | None = None  # the scaled_fp8 marker's size (two: the file asks for full-precision mm)


def _transformer_fp32_modules() -> tuple[str, ...]:
    from diffusers import WanTransformer3DModel

    return tuple(getattr(WanTransformer3DModel, "_keep_in_fp32_modules", None) or ())


def _to_diffusers_names(original_keys, path: Path) -> dict[str, str]:
    """original Wan name -> diffusers name, by running diffusers' own converter over the names."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    keys = list(original_keys)
    converted = convert_wan_transformer_to_diffusers({k: k for k in keys})
    mapping = {orig: new for new, orig in converted.items()}
    if len(mapping) != len(keys):
        raise CheckpointError(f"{path}: tensor names collide after conversion to diffusers names")
    return mapping


def _original_name_candidates(num_layers: int) -> list[str]:
    """The original Wan tensor names a model of ``num_layers`` blocks may hold."""
    wb = ("weight", "bias")
    names = ["head.modulation"]
    for m in ("patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
              "time_projection.1", "head.head", "img_emb.proj.0", "img_emb.proj.1", "img_emb.proj.3", "img_emb.proj.4"):
        names += [f"{m}.{s}" for s in wb]
    for i in range(num_layers):
        b = f"blocks.{i}"
        names += [f"{b}.modulation"] + [f"{b}.{m}.{s}" for m in ("norm3", "ffn.0", "ffn.2") for s in wb]
        for a in ("self_attn", "cross_attn"):
            names += [f"{b}.{a}.{m}.{s}" for m in ("q", "k", "v", "o", "k_img", "v_img") for s in wb]
            names += [f"{b}.{a}.{m}.weight" for m in ("norm_q", "norm_k", "norm_k_img")]
    return names


def _shape(sd: dict, key: str, path: Path) -> torch.Size:
    if key not in sd:
        raise CheckpointError(f"{path}: tensor {key} is missing; this does not look like a Wan transformer")
    return sd[key].shape


def infer_transformer_config(sd: dict, path: Path, num_attention_heads: int | None = None) -> dict:
    """WanTransformer3DModel config (A14B i2v defaults) with the sizes read off diffusers-named tensors."""
    pe = _shape(sd, "patch_embedding.weight", path)
    inner, in_channels, patch = pe[0], pe[1], tuple(pe[2:])
    if num_attention_heads is None:
        if inner % 128:
            raise CheckpointError(f"{path}: inner dim {inner} is not a multiple of the head dim 128; pass "
                                  "num_attention_heads")
        num_attention_heads = inner // 128
    if inner % num_attention_heads:
        raise CheckpointError(f"{path}: inner dim {inner} is not divisible by {num_attention_heads} heads")
    layers = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    config = dict(
        patch_size=patch, num_attention_heads=num_attention_heads, attention_head_dim=inner // num_attention_heads,
        in_channels=in_channels, out_channels=_shape(sd, "proj_out.weight", path)[0] // math.prod(patch),
        text_dim=_shape(sd, "condition_embedder.text_embedder.linear_1.weight", path)[1],
        freq_dim=_shape(sd, "condition_embedder.time_embedder.linear_1.weight", path)[1],
        ffn_dim=_shape(sd, "blocks.0.ffn.net.0.proj.weight", path)[0], num_layers=max(layers) + 1 if layers else 0,
        cross_attn_norm="blocks.0.norm2.weight" in sd,
        qk_norm="rms_norm_across_heads" if "blocks.0.attn1.norm_q.weight" in sd else None,
        eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
    )
    if "condition_embedder.image_embedder.norm1.weight" in sd:  # Wan 2.1 i2v (CLIP image branch)
        config["image_dim"] = sd["condition_embedder.image_embedder.norm1.weight"].shape[0]
        config["added_kv_proj_dim"] = inner
    if layers != set(range(config["num_layers"])):
        raise CheckpointError(f"{path}: transformer blocks {sorted(set(range(max(layers) + 1)) - layers)} missing")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}


def load_expert_weights(
    path,
    *,
    lora_path=None,
    lora_strength: float = 1.0,
    compute_dtype: torch.dtype = torch.bfloat16,
    keep_fp8: bool = False,
    num_attention_heads: int | None = None,
    lora_rounding: str = "comfyui",
    merge_device=None,
) -> ExpertWeights:
    """Read one expert (a single-file checkpoint or a diffusers ``transformer/`` folder), merge its LoRA, convert.

    The LoRA is merged before dequantization, into the weights as ComfyUI stores them (an fp8_scaled file's
    Linear layers all in fp8, see :func:`comfy_scaled_fp8_storage`; the rest in the compute dtype; fp8 tensors:
    dequantize, add, requantize with the same scale, by ``lora_rounding``), so that ``keep_fp8=False`` gives what
    ComfyUI's fp8 model computes, dequantized. ``merge_device``: where fp8 requantization runs (the run's device:
    ComfyUI patches on its GPU and stochastic rounding's draws depend on the device type).
    """
    path = Path(path)
    if path.is_dir():
        stored, metadata = _read_component_folder(path)
        split = _split_fp8(stored, metadata, path)
        sd = split.tensors
        num_layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        candidates = _original_name_candidates(num_layers)
        names = {o: d for o, d in _to_diffusers_names(candidates, path).items() if d in sd}
        file_config = json.loads((path / "config.json").read_text())
        if num_attention_heads is None:
            num_attention_heads = file_config.get("num_attention_heads")
    else:
        stored, metadata = read_safetensors(path)
        split = _split_fp8(_strip_prefix(stored), metadata, path)
        names = _to_diffusers_names(split.tensors, path)
        sd = {names[k]: v for k, v in split.tensors.items()}
    scales = {names.get(k, k): v for k, v in split.scales.items()}
    input_scales = {names.get(k, k): v for k, v in split.input_scales.items()}
    source_format, marker = split.source_format, split.marker_elements
    del stored, split
    config = infer_transformer_config(sd, path, num_attention_heads)
    notes = []
    if marker is not None:  # ComfyUI 0.3.64's scaled-fp8 Linear; _quantization_metadata files are not read by it
        weights, biases = comfy_scaled_fp8_storage(sd, scales, names)
        if weights:
            notes.append(f"{path.name}: {weights} Linear weights stored in another dtype than fp8 in this fp8_scaled "
                         f"file were rounded to fp8 with scale 1, as ComfyUI 0.3.64 loads them (a quirk of its "
                         f"scaled-fp8 Linear, matched on purpose)")
        if biases:
            notes.append(f"{path.name}: {biases} Linear biases rounded to fp8 (unscaled), as ComfyUI's scaled-fp8 "
                         f"Linear stores them")
    # Non-fp8 tensors take their run dtype before the merge (ComfyUI's: its unet dtype, the compute dtype; the
    # modules diffusers keeps in float32 go to float32), so that a LoRA delta is rounded once, into that dtype.
    fp32_modules = _transformer_fp32_modules()
    for k, t in sd.items():
        if t.is_floating_point() and t.dtype != FP8:
            sd[k] = t.to(torch.float32 if any(m in k.split(".") for m in fp32_modules) else compute_dtype)
    report = None
    if lora_path is not None and lora_strength != 0:
        lora_sd, _ = read_safetensors(lora_path)
        report = apply_lora(sd, scales, lora_sd, original_names=names, strength=lora_strength,
                            lora_name=str(lora_path), rounding=lora_rounding, device=merge_device)
        notes += report.notes(Path(lora_path).name)
    kept = _finalize(sd, scales, compute_dtype=compute_dtype, keep_fp8=keep_fp8,
                     fp32_modules=_transformer_fp32_modules())
    return ExpertWeights(sd, kept, config, source_format, path, input_scales, report,
                         {d: o for o, d in names.items()}, notes, marker)


def _load_into(model: torch.nn.Module, sd: dict, path: Path, *, device, dtype, fp32_modules=(), tied=None,
               aliases=None):
    """Shape-checked ``load_state_dict(assign=True)``; fp8 tensors keep their dtype, the rest go to ``dtype``."""
    expected = model.state_dict()
    tied = tied or {}
    for alias, source in tied.items():
        if alias in expected and alias not in sd and source in sd:
            sd[alias] = sd[source]
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
                              f"unexpected: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    out = {}
    for k, t in sd.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            name = f"{aliases[k]} ({k})" if aliases and aliases.get(k, k) != k else k
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(t.shape)}, the model expects "
                                  f"{tuple(expected[k].shape)}")
        if t.dtype != FP8 and t.is_floating_point():
            fp32 = dtype in (torch.float16, torch.bfloat16) and any(m in k.split(".") for m in fp32_modules)
            t = t.to(torch.float32 if fp32 else dtype)
        out[k] = t.to(device)
    model.load_state_dict(out, strict=True, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def build_transformer(config: dict, *, device="cpu"):
    """An empty WanTransformer3DModel: parameters on the meta device (they take the dtype of the tensors assigned
    later), rope buffers on ``device``. from_config drops the ``_``-prefixed keys of a config.json itself."""
    from diffusers import WanTransformer3DModel

    with torch.device(device), init_empty_weights(include_buffers=False):
        return WanTransformer3DModel.from_config(config)


def load_transformer(weights: ExpertWeights, *, device="cpu", dtype=torch.bfloat16):
    """The expert as a WanTransformer3DModel on ``device``; fp8-kept weights stay float8_e4m3fn parameters.

    The scales of those are in ``weights.fp8_scales`` (not attached to the module): swap those Linear layers for an
    fp8 matmul module, or dequantize them, before running the model.
    """
    model = build_transformer(weights.config, device=device)
    return _load_into(model, weights.state_dict, weights.path, device=device, dtype=dtype,
                      fp32_modules=_transformer_fp32_modules(), aliases=weights.original_names)


# ---------------------------------------------------------------------------------------------------------------
# VAE


def _read_component_folder(folder: Path) -> tuple[dict, dict]:
    """All shards of a diffusers component folder: (tensors, header metadata, e.g. _quantization_metadata)."""
    sd: dict = {}
    metadata: dict = {}
    for f in _diffusers_weight_files(folder):
        part, meta = read_safetensors(f)
        sd.update(part)
        metadata.update(meta)
    return sd, metadata


def load_vae(path_or_dir, *, device="cpu", dtype=torch.float32):
    """AutoencoderKLWan from ComfyUI's ``wan_2.1_vae.safetensors`` (original Wan keys) or a diffusers ``vae/`` folder.

    Single files go through diffusers' ``convert_wan_vae_to_diffusers``; the model is the Wan 2.1 VAE
    (``AutoencoderKLWan`` defaults) with ``base_dim`` read from the file, so small test files load too.
    """
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    path = Path(path_or_dir)
    if path.is_dir():
        config = dict(AutoencoderKLWan.load_config(str(path)))
        sd, _metadata = _read_component_folder(path)
    else:
        stored, metadata = read_safetensors(path)
        split = _split_fp8(_strip_prefix(stored, ("first_stage_model.", "vae.")), metadata, path)
        raw = {k: (t.float() * split.scales[k] if k in split.scales else t) for k, t in split.tensors.items()}
        if "decoder.middle.0.residual.0.gamma" not in raw:
            raise CheckpointError(f"{path}: tensor decoder.middle.0.residual.0.gamma is missing; this is not a Wan "
                                  "VAE in the original key layout")
        sd = convert_wan_vae_to_diffusers(raw)
        z_dim = _shape(sd, "post_quant_conv.weight", path)[0]
        if z_dim != 16:
            raise CheckpointError(f"{path}: tensor conv2.weight gives a latent of {z_dim} channels; only the Wan 2.1 "
                                  "VAE (16 channels) is supported")
        config = {"base_dim": _shape(sd, "encoder.conv_in.weight", path)[0], "z_dim": z_dim}
    with torch.device(device), init_empty_weights(include_buffers=False):
        model = AutoencoderKLWan.from_config(config)
    return _load_into(model, sd, path, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Text encoder (UMT5-XXL) and its tokenizer


@dataclass(frozen=True)
class TokenizedPrompt:
    ids: list[int]
    attention_mask: list[int]


class UMT5Tokenizer:
    """ComfyUI's umt5 tokenization: SentencePiece ids without a start token, end token 1, padding 0 up to 512.

    Prompts longer than 511 tokens are not truncated (ComfyUI's max length is unbounded for umt5). ComfyUI's
    ``(text:1.2)`` emphasis syntax is not parsed: the text is tokenized as written.
    """

    def __init__(self, encode, *, end_token: int = 1, pad_token: int = 0, min_length: int = 512):
        self._encode = encode
        self.end_token, self.pad_token, self.min_length = end_token, pad_token, min_length

    @classmethod
    def from_spiece(cls, model_proto: bytes, **kwargs) -> "UMT5Tokenizer":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto, add_bos=False, add_eos=False)
        return cls(lambda text: list(sp.encode(text)), **kwargs)

    @classmethod
    def from_folder(cls, folder) -> "UMT5Tokenizer":
        folder = Path(folder)
        if (folder / "spiece.model").is_file():
            return cls.from_spiece((folder / "spiece.model").read_bytes())
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            return cls(lambda text: tok.encode(text, add_special_tokens=False).ids)
        raise MissingModelFiles([("spiece.model or tokenizer.json", [folder])])

    def tokenize(self, text: str) -> TokenizedPrompt:
        ids = [int(i) for i in self._encode(text)] + [self.end_token]
        n = len(ids)
        pad = max(self.min_length - n, 0)
        return TokenizedPrompt(ids + [self.pad_token] * pad, [1] * n + [0] * pad)


def infer_umt5_config(sd: dict, path: Path):
    from transformers import UMT5Config

    vocab, d_model = _shape(sd, "shared.weight", path)
    buckets, heads = _shape(sd, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", path)
    inner = _shape(sd, "encoder.block.0.layer.0.SelfAttention.q.weight", path)[0]
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.block.")}
    return UMT5Config(
        vocab_size=vocab, d_model=d_model, d_kv=inner // heads, num_heads=heads, num_layers=max(layers) + 1,
        d_ff=_shape(sd, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", path)[0],
        relative_attention_num_buckets=buckets, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        is_encoder_decoder=False, use_cache=False,
    )


def load_text_encoder(path_or_dir, *, device="cpu", dtype=torch.bfloat16):
    """(UMT5EncoderModel, UMT5Tokenizer) from ComfyUI's umt5 file (tokenizer inside, ``spiece_model``) or a diffusers
    ``text_encoder/`` folder (tokenizer from the ``tokenizer/`` folder next to it). fp8 weights are dequantized;
    their file scales stay on the model (``fp8_file_scales``) so fp8 storage can be restored exactly.
    ``wo`` stays float32 when ``dtype`` is float16, as transformers keeps it (``_keep_in_fp32_modules``)."""
    from transformers import UMT5Config, UMT5EncoderModel

    path = Path(path_or_dir)
    if path.is_dir():
        config = UMT5Config.from_pretrained(str(path))
        stored, metadata = _read_component_folder(path)
        split = _split_fp8(stored, metadata, path)  # a quantized folder's _quantization_metadata counts too
        tokenizer = UMT5Tokenizer.from_folder(path.parent / "tokenizer")
    else:
        stored, metadata = read_safetensors(path)
        split = _split_fp8(_strip_prefix(stored, ("umt5xxl.transformer.", "transformer.")), metadata, path)
        spiece = split.tensors.pop("spiece_model", None)
        if spiece is None:
            raise CheckpointError(f"{path}: tensor spiece_model (the SentencePiece tokenizer ComfyUI stores in umt5 "
                                  "files) is missing; use ComfyUI's umt5_xxl file or a diffusers folder")
        tokenizer = UMT5Tokenizer.from_spiece(bytes(spiece.to(torch.uint8).tolist()))
        config = infer_umt5_config(split.tensors, path)
    sd = split.tensors
    fp32 = tuple(getattr(UMT5EncoderModel, "_keep_in_fp32_modules", None) or ()) if dtype == torch.float16 else ()
    file_scales = dict(split.scales)
    _finalize(sd, split.scales, compute_dtype=dtype, keep_fp8=False, fp32_modules=fp32)
    with torch.device(device), init_empty_weights(include_buffers=False):
        model = UMT5EncoderModel(config)
    model = _load_into(model, sd, path, device=device, dtype=dtype, fp32_modules=fp32,
                       tied={"encoder.embed_tokens.weight": "shared.weight", "shared.weight": "encoder.embed_tokens.weight"})
    model.fp8_file_scales = file_scales  # precision.store_text_encoder_fp8 restores the file's fp8 storage with them
    return model, tokenizer

"""Small checkpoints in the real key layouts, for tests.

The original-layout names are produced by hand-written inverses of diffusers' converters (diffusers name -> original
Wan name). They are independent of the code under test; ``test_loading`` checks that diffusers' own converters map
them back onto the diffusers names, so a wrong inverse fails a test instead of hiding a loader bug.
"""

from __future__ import annotations

import functools
import io
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

# the package writes ComfyUI-layout VAE files with it (wan_pipeline.run.comfy_files); test_loading checks it against
# diffusers' own converter
from wan_pipeline.run.comfy_files import wan_vae_original_name

FP8 = torch.float8_e4m3fn

TINY_WAN = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4, text_dim=12,
    freq_dim=16, ffn_dim=48, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
)
TINY_UMT5 = dict(vocab_size=40, d_model=16, d_kv=4, num_heads=4, d_ff=24, num_layers=2, feed_forward_proj="gated-gelu",
                 tie_word_embeddings=False)
SENTENCES = ["a woman walks in the rain at night", "the camera tracks slowly beside her",
             "neon reflections on the wet street", "a red coat in a city of lights"]


def randomize(model: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Every parameter drawn from N(0, std) (so that swapped tensors cannot go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tiny_transformer(seed: int = 0, **overrides):
    from diffusers import WanTransformer3DModel

    return randomize(WanTransformer3DModel(**{**TINY_WAN, **overrides}), seed)


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKLWan

    return randomize(AutoencoderKLWan(base_dim=4, z_dim=16), seed, std=0.1)


def tiny_umt5(seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    return randomize(UMT5EncoderModel(UMT5Config(**TINY_UMT5)), seed)


@functools.lru_cache(maxsize=1)
def tiny_spiece() -> bytes:
    """A SentencePiece model trained in memory, with T5's special ids (pad 0, end 1, unk 2, no start token)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 4), model_writer=buf, vocab_size=30, pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, model_type="unigram", minloglevel=3)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# diffusers -> original names


def wan_original_name(key: str) -> str:
    """Original Wan transformer name of a diffusers WanTransformer3DModel tensor name (the original key layout)."""
    top = {
        "condition_embedder.time_embedder.linear_1.": "time_embedding.0.",
        "condition_embedder.time_embedder.linear_2.": "time_embedding.2.",
        "condition_embedder.text_embedder.linear_1.": "text_embedding.0.",
        "condition_embedder.text_embedder.linear_2.": "text_embedding.2.",
        "condition_embedder.time_proj.": "time_projection.1.",
        "proj_out.": "head.head.",
    }
    if key == "scale_shift_table":
        return "head.modulation"
    for a, b in top.items():
        if key.startswith(a):
            return b + key[len(a):]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if not m:
        return key  # patch_embedding.*
    i, rest = m.groups()
    rest = {"scale_shift_table": "modulation"}.get(rest, rest)
    for a, b in (("attn1.", "self_attn."), ("attn2.", "cross_attn."), ("to_q.", "q."), ("to_k.", "k."),
                 ("to_v.", "v."), ("to_out.0.", "o."), ("norm2.", "norm3."), ("ffn.net.0.proj.", "ffn.0."),
                 ("ffn.net.2.", "ffn.2.")):
        rest = rest.replace(a, b)
    return f"blocks.{i}.{rest}"


# ---------------------------------------------------------------------------------------------------------------
# writers


def fp8_scale(t: torch.Tensor) -> torch.Tensor:
    return (t.float().abs().max() / 448.0).clamp(min=1e-12).reshape(())


# ComfyUI's WanModel Linear layers (comfy/ldm/wan/model.py), original names; written out here on purpose (not
# imported from the loader under test)
COMFY_LINEAR = re.compile(r"(text_embedding\.[02]|time_embedding\.[02]|time_projection\.1|head\.head"
                          r"|blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]|blocks\.\d+\.ffn\.[02])\.(weight|bias)")


def write_wan_file(path, model, fmt: str = "bf16", *, prefix: str = "", scale_input: bool = False,
                   edit=None, marker_elements: int = 0) -> dict[str, torch.Tensor]:
    """Write ``model`` as a single-file checkpoint in the original Wan layout; return {original name: float32 value
    the loader should reproduce (dequantized)}.

    fmt: "fp32", "bf16", "fp16", "fp8_e4m3fn" (2-D weights cast to fp8, scale 1), "fp8_scaled" (2-D block weights
    quantized with a per-tensor scale, ``scale_weight`` + ``scaled_fp8`` marker of ``marker_elements`` elements;
    the returned values of Linear biases and non-fp8 Linear weights are fp8-rounded, as ComfyUI loads them),
    "fp8_quant_metadata" (the same
    with ``weight_scale`` tensors and ``_quantization_metadata`` in the header).
    """
    sd = {wan_original_name(k): v.detach().clone() for k, v in model.state_dict().items()}
    if edit:
        edit(sd)
    out, expected, metadata = {}, {}, None
    layers = {}
    for k, v in sd.items():
        if fmt in ("fp32", "bf16", "fp16"):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[fmt]
            out[k] = v.to(dtype)
            expected[k] = out[k].float()
        elif fmt == "fp8_e4m3fn":
            out[k] = v.to(FP8) if v.dim() == 2 else v.to(torch.bfloat16)
            expected[k] = out[k].float()
        else:
            if k.startswith("blocks.") and k.endswith(".weight") and v.dim() == 2:
                scale = fp8_scale(v)
                out[k] = (v / scale).to(FP8)
                layer = k[: -len(".weight")]
                if fmt == "fp8_scaled":
                    out[layer + ".scale_weight"] = scale.clone()
                    if scale_input:
                        out[layer + ".scale_input"] = torch.tensor(0.5)
                else:
                    out[layer + ".weight_scale"] = scale.clone()
                    layers[prefix + layer] = {"format": "float8_e4m3fn"}
                expected[k] = out[k].float() * scale
            else:
                out[k] = v.to(torch.bfloat16)
                expected[k] = out[k].float()
    if fmt == "fp8_scaled":
        out["scaled_fp8"] = torch.empty(marker_elements, dtype=FP8)
        # ComfyUI 0.3.64's scaled-fp8 Linear holds every Linear weight and bias in fp8: a bias is copied in
        # unscaled, a weight stored in another dtype is cast with scale 1
        for k in out:
            if COMFY_LINEAR.fullmatch(k) and out[k].dtype != FP8:
                expected[k] = out[k].to(FP8).float()
    if fmt == "fp8_quant_metadata":
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    save_file({prefix + k: v.contiguous() for k, v in out.items()}, str(path), metadata=metadata)
    return expected


def write_vae_file(path, vae, dtype=torch.float32) -> dict[str, torch.Tensor]:
    sd = {wan_vae_original_name(k): v.detach().to(dtype).contiguous() for k, v in vae.state_dict().items()}
    save_file(sd, str(path))
    return sd


def write_umt5_file(path, model, *, fp8_scaled: bool = False, spiece: bool = True) -> dict[str, torch.Tensor]:
    """ComfyUI's umt5 layout: HF T5 names, ``shared.weight``, ``spiece_model`` uint8 tensor, optional fp8_scaled."""
    out, expected = {}, {}
    for k, v in model.state_dict().items():
        if k == "encoder.embed_tokens.weight":
            continue
        if fp8_scaled and k.startswith("encoder.block.") and v.dim() == 2 and "relative_attention_bias" not in k:
            scale = fp8_scale(v)
            out[k] = (v / scale).to(FP8)
            out[k[: -len(".weight")] + ".scale_weight"] = scale.clone()
            expected[k] = out[k].float() * scale
        else:
            out[k] = v.detach().float().contiguous()
            expected[k] = out[k]
    if fp8_scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    if spiece:
        out["spiece_model"] = torch.frombuffer(bytearray(tiny_spiece()), dtype=torch.uint8)
    save_file(out, str(path))
    return expected


def write_diffusers_folder(root, *, high=None, low=None, vae=None, text_encoder=None, max_shard_size=None) -> Path:
    """A diffusers Wan 2.2 i2v folder: model_index.json, transformer/ (high), transformer_2/ (low), vae/,
    text_encoder/, tokenizer/spiece.model."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline"}))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    high = high if high is not None else tiny_transformer(1)
    low = low if low is not None else tiny_transformer(2)
    high.save_pretrained(root / "transformer", safe_serialization=True, **kwargs)
    low.save_pretrained(root / "transformer_2", safe_serialization=True, **kwargs)
    (vae if vae is not None else tiny_vae(3)).save_pretrained(root / "vae", safe_serialization=True)
    (text_encoder if text_encoder is not None else tiny_umt5(4)).save_pretrained(root / "text_encoder")
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "spiece.model").write_bytes(tiny_spiece())
    return root


def touch(path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"x": torch.zeros(1)}, str(path))
    return path

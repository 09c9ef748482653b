"""Random-weight model files in ComfyUI's layout, so that a ComfyUI server and wan-bench run the same files.

`write_comfyui_models(root, size)` writes ``diffusion_models/`` (the two Wan 2.2 i2v experts, fp8_scaled: block
Linear weights in float8_e4m3fn with a per-tensor ``scale_weight``, the ``scaled_fp8`` marker, the rest bf16, in
the original Wan key layout under ``model.diffusion_model.``), ``loras/`` (lightx2v-style LoRAs: lora_up/lora_down
and alpha on every block Linear), ``text_encoders/`` (UMT5 in ComfyUI's umt5 layout, fp8_e4m3fn_scaled, with the
``spiece_model`` tokenizer tensor) and ``vae/`` (the Wan 2.1 VAE, bf16), under the template's file names.

``full`` is the real architecture (A14B experts, UMT5-XXL, the Wan 2.1 VAE): about 14.3 GB per expert, 6.7 GB of
text encoder, 0.25 GB of VAE and 1.2 GB of LoRAs. The values are drawn on ``--device`` (a CUDA device draws the
full set far faster than a CPU; each device draws its own values for a seed, every file is seeded random data
either way), each tensor moved to the host as it is drawn, so the device never holds a whole expert. ``tiny`` shrinks the experts to what ComfyUI still detects as
Wan (2 heads of 128, 2 layers) and the text encoder; the VAE keeps the Wan 2.1 width, the one ComfyUI builds.

    python -m wan_pipeline.run.comfy_files MODELS_DIR [--size full|tiny] [--seed N] [--device cuda]
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import time
from pathlib import Path

import torch

from wan_pipeline.errors import WanBenchError
from wan_pipeline.plan.config import (HIGH_NOISE_LORA, HIGH_NOISE_MODEL, LOW_NOISE_LORA, LOW_NOISE_MODEL,
                                      TEXT_ENCODER)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
VAE_FILE = "wan_2.1_vae.safetensors"
SIZES = ("full", "tiny")
# ComfyUI reads the expert's head count as dim // 128 and builds its text and time embeddings for 4096-wide UMT5
# states and a 256-wide frequency embedding: the tiny experts keep those.
TINY_COMFY_EXPERT = dict(num_attention_heads=2, attention_head_dim=128, text_dim=4096, freq_dim=256, ffn_dim=64,
                         num_layers=2)
# ... so the tiny text encoder gives 4096-wide states too (a few layers, a small vocabulary), and the tiny set runs
# end to end: wan-bench's real mode on these files, text encoder included.
TINY_COMFY_UMT5_WIDTH = 4096
LORA_RANK = {"full": 64, "tiny": 4}
_BLOCK_LINEAR = re.compile(r"blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]|blocks\.\d+\.ffn\.[02]")
# AutoencoderKLWan residual-block names -> the original Wan 2.1 VAE's (dim_mult [1, 2, 4, 4], 2 res blocks)
_VAE_RES = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
            "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
            "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}


def wan_vae_original_name(key: str) -> str:
    """The original Wan 2.1 VAE name (what ComfyUI's VAELoader reads) of an AutoencoderKLWan tensor name."""
    fixed = {"quant_conv.weight": "conv1.weight", "quant_conv.bias": "conv1.bias",
             "post_quant_conv.weight": "conv2.weight", "post_quant_conv.bias": "conv2.bias"}
    if key in fixed:
        return fixed[key]
    side, rest = key.split(".", 1)
    for a, b in (("conv_in.", "conv1."), ("norm_out.", "head.0."), ("conv_out.", "head.2.")):
        if rest.startswith(a):
            return f"{side}.{b}{rest[len(a):]}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", rest)
    if m:
        kind, i, tail = m.groups()
        idx = 1 if kind == "attentions" else 2 * int(i)
        return f"{side}.middle.{idx}.{_VAE_RES.get(tail, tail)}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest)
    if m:
        return f"{side}.downsamples.{m.group(1)}.{_VAE_RES.get(m.group(2), m.group(2))}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest)
    if m:
        b, r, tail = m.groups()
        return f"{side}.upsamples.{4 * int(b) + int(r)}.{_VAE_RES.get(tail, tail)}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest)
    if m:
        return f"{side}.upsamples.{4 * int(m.group(1)) + 3}.{m.group(2)}"
    raise WanBenchError(f"no original Wan 2.1 VAE name for {key}")


def _shapes(factory) -> dict[str, torch.Size]:
    """Parameter names and shapes of a module built without allocating its weights."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = factory()
    return {k: v.shape for k, v in module.state_dict().items()}


def _random(shape, g: torch.Generator, std: float) -> torch.Tensor:
    return (torch.randn(shape, generator=g, device=g.device, dtype=torch.float32) * std).to(torch.bfloat16)


def _generator(seed: int, device: str) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def _on_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to("cpu").contiguous() for k, v in tensors.items()}


def draw_device(name: str) -> str:
    """The device the values are drawn on, checked: a usage error where it does not exist here."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise WanBenchError(f"--device {name!r}: not a torch device (cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise WanBenchError(f"--device {name}: no CUDA device is visible here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise WanBenchError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise WanBenchError(f"--device {name}: expected cpu or a CUDA device")
    return str(device)


def _to_fp8_scaled(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (value.float().abs().amax() / FP8_MAX).clamp(min=1e-12).reshape(())
    return (value.float() / scale).to(FP8), scale.float()


def _fp8_scaled_on_host(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weight, scale = _to_fp8_scaled(value)
    return weight.to("cpu"), scale.to("cpu")


def expert_tensors(config: dict, seed: int, std: float = 0.02, marker_elements: int = 2,
                   device: str = "cpu") -> dict[str, torch.Tensor]:
    """One Wan 2.2 i2v expert in ComfyUI's fp8_scaled layout (original names, ``model.diffusion_model.``)."""
    from diffusers import WanTransformer3DModel

    from wan_pipeline.run.loading import _original_name_candidates, _to_diffusers_names

    shapes = _shapes(lambda: WanTransformer3DModel(**config))
    to_diffusers = _to_diffusers_names(_original_name_candidates(config["num_layers"]), Path("<names>"))
    original = {d: o for o, d in to_diffusers.items()}
    missing = [k for k in shapes if k not in original]
    if missing:
        raise WanBenchError(f"no original Wan name for {missing[:3]}")
    g = _generator(seed, device)
    out: dict[str, torch.Tensor] = {}
    for dname, shape in shapes.items():
        name = original[dname]
        value = _random(shape, g, std if len(shape) >= 2 else 0.1) if not name.endswith("norm_q.weight") \
            and not name.endswith("norm_k.weight") else torch.ones(shape, dtype=torch.bfloat16)
        layer = name[: -len(".weight")]
        if name.endswith(".weight") and len(shape) == 2 and _BLOCK_LINEAR.fullmatch(layer):
            out[name], out[layer + ".scale_weight"] = _fp8_scaled_on_host(value)
        else:
            out[name] = value.to("cpu")
    out["scaled_fp8"] = torch.empty(marker_elements, dtype=FP8)
    return {f"model.diffusion_model.{k}": v.contiguous() for k, v in out.items()}


def lora_tensors(config: dict, rank: int, seed: int, std: float = 0.01, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A lightx2v-style LoRA: lora_up/lora_down (bf16) and alpha on every block Linear."""
    g = _generator(seed, device)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    out = {}
    for i in range(config["num_layers"]):
        layers = [(f"blocks.{i}.{a}.{m}", dim, dim) for a in ("self_attn", "cross_attn") for m in "qkvo"]
        layers += [(f"blocks.{i}.ffn.0", config["ffn_dim"], dim), (f"blocks.{i}.ffn.2", dim, config["ffn_dim"])]
        for layer, out_f, in_f in layers:
            out[f"diffusion_model.{layer}.lora_up.weight"] = _random((out_f, rank), g, std)
            out[f"diffusion_model.{layer}.lora_down.weight"] = _random((rank, in_f), g, std)
            out[f"diffusion_model.{layer}.alpha"] = torch.tensor(float(rank))
    return _on_host(out)


def spiece_model(vocab_size: int = 256) -> bytes:
    """A small SentencePiece model (T5's special ids: pad 0, end 1, unk 2, no start token), trained in memory: the
    tokenizer both ComfyUI and wan-bench read from the umt5 file (its ids index the first rows of the embedding)."""
    import sentencepiece as spm

    text = ("a white dragon warrior stands still eyes full of determination and strength the camera slowly moves "
            "closer or circles around the warrior highlighting the powerful presence and heroic spirit").split()
    sentences = [" ".join(text[i:] + text[:i]) for i in range(len(text))] * 8
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram", minloglevel=3,
                                   hard_vocab_limit=False)
    return buf.getvalue()


def umt5_tensors(config: dict, seed: int, std: float = 0.02, device: str = "cpu") -> dict[str, torch.Tensor]:
    """UMT5 encoder in ComfyUI's umt5 layout, fp8_e4m3fn_scaled (every 2-D weight but the embedding in fp8 with a
    per-tensor scale, the ``scaled_fp8`` marker), with the ``spiece_model`` tensor."""
    import numpy as np
    from transformers import UMT5Config, UMT5EncoderModel

    shapes = _shapes(lambda: UMT5EncoderModel(UMT5Config(**config)))
    g = _generator(seed, device)
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name == "encoder.embed_tokens.weight":  # tied to shared.weight
            continue
        if name.endswith("layer_norm.weight"):
            out[name] = torch.ones(shape, dtype=torch.bfloat16)
            continue
        value = _random(shape, g, std if "relative_attention_bias" not in name else 0.1)
        if len(shape) == 2 and name != "shared.weight" and "relative_attention_bias" not in name:
            out[name], out[name[: -len(".weight")] + ".scale_weight"] = _fp8_scaled_on_host(value)
        else:
            out[name] = value.to("cpu")
    out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    out["spiece_model"] = torch.from_numpy(np.frombuffer(spiece_model(), dtype=np.uint8).copy())
    return out


def vae_tensors(seed: int, std: float = 0.02, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The Wan 2.1 VAE (the width ComfyUI builds whatever the file holds), original names, bf16."""
    from diffusers import AutoencoderKLWan

    shapes = _shapes(lambda: AutoencoderKLWan())
    g = _generator(seed, device)
    return _on_host({wan_vae_original_name(k): (torch.ones(s, dtype=torch.bfloat16) if k.endswith("gamma")
                                                else _random(s, g, std if len(s) >= 2 else 0.01))
                     for k, s in shapes.items()})


def write_comfyui_models(root, size: str = "full", seed: int = 0, log=None, device: str = "cpu") -> dict[str, Path]:
    """Write the model set into ``root`` (ComfyUI's models folder layout), drawn on `device`; returns
    {file name: path}."""
    from safetensors.torch import save_file

    from wan_pipeline.fsutil import atomic_target
    from wan_pipeline.run.models import A14B_TRANSFORMER, TINY_UMT5, UMT5_XXL

    if size not in SIZES:
        raise WanBenchError(f"size {size!r}: expected one of {', '.join(SIZES)}")
    root = Path(root)
    device = draw_device(device)
    expert = A14B_TRANSFORMER if size == "full" else dict(A14B_TRANSFORMER, **TINY_COMFY_EXPERT)
    umt5 = UMT5_XXL if size == "full" else dict(TINY_UMT5, d_model=TINY_COMFY_UMT5_WIDTH)
    jobs = [("diffusion_models", HIGH_NOISE_MODEL, lambda: expert_tensors(expert, seed, device=device)),
            ("diffusion_models", LOW_NOISE_MODEL, lambda: expert_tensors(expert, seed + 1, device=device)),
            ("loras", HIGH_NOISE_LORA, lambda: lora_tensors(expert, LORA_RANK[size], seed + 2, device=device)),
            ("loras", LOW_NOISE_LORA, lambda: lora_tensors(expert, LORA_RANK[size], seed + 3, device=device)),
            ("text_encoders", TEXT_ENCODER, lambda: umt5_tensors(umt5, seed + 4, device=device)),
            ("vae", VAE_FILE, lambda: vae_tensors(seed + 5, device=device))]
    written = {}
    for folder, name, build in jobs:
        start = time.perf_counter()
        tensors = build()
        path = root / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_target(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "wan_bench": f"random weights, {size}, seed {seed}"})
        del tensors
        written[name] = path
        if log:
            log(f"{path}: {path.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m wan_pipeline.run.comfy_files", description=__doc__.split("\n")[0])
    p.add_argument("models_dir", help="ComfyUI models folder to write into (diffusion_models/, loras/, ...)")
    p.add_argument("--size", choices=SIZES, default="full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the values are drawn: cpu (default) or cuda (far faster "
                                                   "for the full set)")
    args = p.parse_args(argv)
    try:
        write_comfyui_models(args.models_dir, args.size, args.seed, log=print, device=args.device)
    except WanBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or a folder it may not write: the files written so far are whole
        print(f"error: writing the model files under {args.models_dir} failed: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

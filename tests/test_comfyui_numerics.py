"""ComfyUI 0.3.64's numerics in the fp8_scaled + LoRA path, pinned on small files in the original key layout.

The stochastic-rounding vectors and a whole two-pass generation (ComfyUI's own loader, LoRA and sampler nodes in
a subprocess on the CPU in float32) are checked against ComfyUI's code from the snapshot when it is there (the
tests skip, naming what is missing, otherwise); the rest against hand-computed values.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
from checkpoints import TINY_WAN, randomize, tiny_transformer, wan_original_name, write_wan_file
from comfyui_server import comfyui_snapshot, extract_snapshot, torchvision_stub
from safetensors.torch import save_file

from wan_pipeline.run.conditioning import to_uint8_frames
from wan_pipeline.run.loading import load_expert_weights
from wan_pipeline.run.precision import key_seed, stochastic_round_fp8

FP8 = torch.float8_e4m3fn




def test_key_seed_is_crc32_of_the_weight_name():
    assert key_seed("diffusion_model.blocks.0.self_attn.q.weight") == zlib.crc32(
        b"diffusion_model.blocks.0.self_attn.q.weight")
    assert key_seed("") == 0


def test_stochastic_rounding_lands_on_the_two_fp8_neighbours():
    x = torch.linspace(-500, 500, 4001)
    q = stochastic_round_fp8(x, 7).float()
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[grid.isfinite()].unique()
    x16 = x.half().float().clamp(-448, 448)
    lo = grid[(torch.searchsorted(grid, x16, right=True) - 1).clamp(min=0)]
    hi = grid[torch.searchsorted(grid, x16).clamp(max=len(grid) - 1)]
    assert ((q == lo) | (q == hi)).all()
    assert torch.equal(stochastic_round_fp8(x, 7), stochastic_round_fp8(x, 7))
    assert not torch.equal(stochastic_round_fp8(x, 7), stochastic_round_fp8(x, 8))
    # unbiased: the mean of many roundings of 1.03 (between 1.0 and 1.125) is close to 1.03
    assert abs(stochastic_round_fp8(torch.full((20000,), 1.03), 3).float().mean().item() - 1.03) < 2e-3


@pytest.mark.skipif(not comfyui_snapshot().is_file(),
                    reason=f"ComfyUI snapshot not found at {comfyui_snapshot()} (set WAN_COMFYUI_SNAPSHOT)")
def test_stochastic_rounding_matches_comfyui_bit_for_bit(tmp_path):
    import tarfile

    with tarfile.open(comfyui_snapshot()) as tar:
        member = tar.getmember("ComfyUI/comfy/float.py")
        (tmp_path / "comfy_float.py").write_bytes(tar.extractfile(member).read())
    values = torch.randn(300, 70, generator=torch.Generator().manual_seed(0)) * 3
    values[0, :5] = torch.tensor([0.0, 1e-4, -600.0, 448.0, 2.0 ** -8])
    torch.save(values, tmp_path / "v.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        import comfy_float
        v = torch.load({str(tmp_path / 'v.pt')!r})
        out = comfy_float.stochastic_rounding(v, torch.float8_e4m3fn, seed=1234)
        torch.save(out.view(torch.uint8), {str(tmp_path / 'ref.pt')!r})
    """)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    ref = torch.load(tmp_path / "ref.pt")
    assert torch.equal(stochastic_round_fp8(values, 1234).view(torch.uint8), ref)


@pytest.fixture(scope="module")
def model():
    return tiny_transformer(0)


def test_fp8_scaled_linear_biases_and_plain_weights_become_fp8(tmp_path, model):
    path = tmp_path / "e.safetensors"
    write_wan_file(path, model, "fp8_scaled", marker_elements=2)
    w = load_expert_weights(path, compute_dtype=torch.float32, num_attention_heads=2)
    src = model.state_dict()
    for name in ("blocks.0.attn1.to_q.bias", "blocks.1.ffn.net.2.bias", "proj_out.bias",
                 "condition_embedder.text_embedder.linear_1.bias"):  # biases: fp8, unscaled
        assert torch.equal(w.state_dict[name], src[name].bfloat16().to(FP8).float()), name
    for name in ("proj_out.weight", "condition_embedder.time_proj.weight"):  # bf16 in the file: fp8, scale 1
        assert torch.equal(w.state_dict[name], src[name].bfloat16().to(FP8).float()), name
    # not Linear: untouched
    assert torch.equal(w.state_dict["blocks.0.norm2.weight"], src["blocks.0.norm2.weight"].bfloat16().float())
    assert torch.equal(w.state_dict["patch_embedding.weight"], src["patch_embedding.weight"].bfloat16().float())
    assert w.marker_elements == 2
    assert any("rounded to fp8 with scale 1, as ComfyUI 0.3.64 loads them" in n for n in w.notes)


def test_quantization_metadata_files_keep_biases_and_plain_weights(tmp_path, model):
    """ComfyUI 0.3.64 does not read _quantization_metadata; the later loaders that do keep biases and the layers
    not listed in the compute dtype, so wan-bench leaves them as stored."""
    path = tmp_path / "e.safetensors"
    write_wan_file(path, model, "fp8_quant_metadata")
    w = load_expert_weights(path, compute_dtype=torch.float32, num_attention_heads=2)
    src = model.state_dict()
    assert torch.equal(w.state_dict["blocks.0.attn1.to_q.bias"], src["blocks.0.attn1.to_q.bias"].bfloat16().float())
    assert torch.equal(w.state_dict["proj_out.weight"], src["proj_out.weight"].bfloat16().float())
    assert w.notes == [] and w.marker_elements is None


def test_diff_b_on_an_fp8_bias_is_rounded_twice(tmp_path, model):
    path = tmp_path / "e.safetensors"
    write_wan_file(path, model, "fp8_scaled")
    d_b = torch.full((32,), 0.01)
    save_file({"diffusion_model.blocks.0.self_attn.q.diff_b": d_b,
               "diffusion_model.head.modulation.diff": torch.ones(1, 2, 32),
               "diffusion_model.blocks.1.modulation.diff_b": torch.ones(32)}, str(tmp_path / "l.safetensors"))
    for rounding in ("comfyui", "nearest"):
        w = load_expert_weights(path, lora_path=tmp_path / "l.safetensors", lora_strength=1.0,
                                compute_dtype=torch.float32, num_attention_heads=2, lora_rounding=rounding)
        stored = model.state_dict()["blocks.0.attn1.to_q.bias"].bfloat16().to(FP8).float()  # file -> fp8 at load
        if rounding == "comfyui":
            want = stochastic_round_fp8(stored + d_b, key_seed("diffusion_model.blocks.0.self_attn.q.bias")).float()
        else:
            want = (stored + d_b).to(FP8).float()
        assert torch.equal(w.state_dict["blocks.0.attn1.to_q.bias"], want)
        src = model.state_dict()
        assert torch.equal(w.state_dict["scale_shift_table"], src["scale_shift_table"].bfloat16().float())
        assert w.lora.accepted_unapplied == ["diffusion_model.blocks.1.modulation.diff_b",
                                             "diffusion_model.head.modulation.diff"]
        assert any("2 LoRA keys accepted and ignored, as ComfyUI does" in n for n in w.notes)


def test_frames_are_truncated_like_save_video():
    x = torch.tensor([0.0, 0.999 / 255, 0.5, 0.99, 1.0, 1.2, -0.1])
    assert to_uint8_frames(x).tolist() == [0, 0, 127, 252, 255, 255, 0]


# ---------------------------------------------------------------------------------------------------------------
# ComfyUI 0.3.64's own nodes against wan-bench, end to end on tiny fp8_scaled experts with a lightx2v-style LoRA

# ComfyUI's Wan detection reads the head count as dim // 128 and builds its text embedding for 4096-wide UMT5
# states with a 256-wide frequency embedding, so the tiny experts keep those and shrink the rest.
COMFY_TINY_WAN = dict(attention_head_dim=128, in_channels=36, out_channels=16, text_dim=4096, freq_dim=256,
                      ffn_dim=64)
@pytest.fixture(scope="session")
def comfyui_tree(tmp_path_factory) -> Path:
    return extract_snapshot(tmp_path_factory)


COMFY_RUN = r'''
"""Runs ComfyUI's own nodes on the CPU in float32 and saves what the test compares."""
import sys, json
import torch

job = torch.load(sys.argv[1])
sys.path[:0] = job["path"]
sys.argv = ["comfyui", "--cpu", "--force-fp32", "--disable-all-custom-nodes"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.cli_args
import comfy.model_management
import folder_paths
import nodes
from comfy_extras.nodes_model_advanced import ModelSamplingSD3

folder_paths.add_model_folder_path("diffusion_models", job["dir"])
folder_paths.add_model_folder_path("loras", job["dir"])
out = {"latents": {}, "weights": {}, "fp8_optimizations": {}, "compute": {}}
latent = {"samples": job["latent"]}
with torch.inference_mode():  # as ComfyUI's executor runs every node
    for p in job["passes"]:
        model = nodes.UNETLoader().load_unet(p["model"], "default")[0]
        out["fp8_optimizations"][p["expert"]] = model.model.model_config.optimizations.get("fp8", False)
        out["compute"][p["expert"]] = str(model.model.get_dtype())
        if p["lora"]:
            model = nodes.LoraLoaderModelOnly().load_lora_model_only(model, p["lora"], p["strength"])[0]
        model = ModelSamplingSD3().patch(model, p["shift"])[0]
        positive = [[job["context"], {"concat_latent_image": job["concat_latent_image"],
                                      "concat_mask": job["concat_mask"]}]]
        negative = [[job["context"] * 0, {"concat_latent_image": job["concat_latent_image"],
                                          "concat_mask": job["concat_mask"]}]]
        latent = nodes.KSamplerAdvanced().sample(
            model, "enable" if p["add_noise"] else "disable", job["seed"], p["steps"], p["cfg"], "euler", "simple",
            positive, negative, latent, p["start"], p["end"],
            "enable" if p["leftover"] else "disable")[0]
        out["latents"][p["expert"]] = latent["samples"].clone()
        comfy.model_management.load_models_gpu([model])  # the patched weights, as the sampler ran them
        out["weights"][p["expert"]] = {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}
torch.save(out, job["out"])
'''


def _lightx2v_lora(model_sd: dict, seed: int) -> dict[str, torch.Tensor]:
    """A lightx2v-style LoRA: lora_up/lora_down with alpha on every block Linear and on the head, full ``diff``
    on a block Linear and a norm, ``diff_b`` on fp8 biases, and the modulation diffs ComfyUI accepts and ignores."""
    g = torch.Generator().manual_seed(seed)
    rank, lora = 4, {}
    layers = [f"blocks.{i}.{m}" for i in range(2) for m in
              ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
               "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")] + ["head.head", "text_embedding.0"]
    for layer in layers:
        out_f, in_f = model_sd[layer + ".weight"].shape
        lora[f"diffusion_model.{layer}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.05
        lora[f"diffusion_model.{layer}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * 0.05
        lora[f"diffusion_model.{layer}.alpha"] = torch.tensor(float(rank) * 2)
    lora["diffusion_model.blocks.1.cross_attn.k.diff"] = torch.randn(model_sd["blocks.1.cross_attn.k.weight"].shape,
                                                                     generator=g) * 0.01
    lora["diffusion_model.blocks.0.norm3.diff"] = torch.randn(256, generator=g) * 0.01
    for layer in ("blocks.0.self_attn.q", "blocks.1.ffn.2", "head.head"):
        lora[f"diffusion_model.{layer}.diff_b"] = torch.randn(model_sd[layer + ".bias"].shape, generator=g) * 0.01
    lora["diffusion_model.blocks.0.modulation.diff"] = torch.randn(1, 6, 256, generator=g) * 0.1
    lora["diffusion_model.head.modulation.diff"] = torch.randn(1, 2, 256, generator=g) * 0.1
    return {k: v.contiguous() for k, v in lora.items()}


def _wan_bench_latents(files: dict, passes: list[dict], context, concat_latent_image, concat_mask, seed):
    """wan-bench's loading and sampler on the same files and plan (float32 on the CPU): each pass's latent, and
    the merged weights as stored (fp8 kept)."""
    from wan_pipeline.plan.config import PassConfig
    from wan_pipeline.run.loading import load_transformer
    from wan_pipeline.run.pipeline import _call
    from wan_pipeline.plan.plan import plan_pass
    from wan_pipeline.run.sampler import flow_denoiser, process_latent_in, run_pass

    # WanImageToVideo's mask is 0 on the start frame; the model's concat is 1 - mask, in 4 channels
    concat = torch.cat([(1.0 - concat_mask).repeat(1, 4, 1, 1, 1), process_latent_in(concat_latent_image)], dim=1)
    latent = torch.zeros(1, 16, *concat_latent_image.shape[2:])
    latents, stored = {}, {}
    for p in passes:
        kw = dict(lora_path=files[p["lora"]] if p["lora"] else None, lora_strength=p["strength"],
                  compute_dtype=torch.float32, num_attention_heads=2)
        kept = load_expert_weights(files[p["model"]], keep_fp8=True, **kw)
        stored[p["expert"]] = kept
        weights = load_expert_weights(files[p["model"]], keep_fp8=False, **kw)
        model = load_transformer(weights, dtype=torch.float32)
        config = PassConfig(expert=p["expert"], model_file=p["model"], lora_file=p["lora"],
                            lora_strength=p["strength"], shift=p["shift"], steps=p["steps"],
                            start_at_step=p["start"], end_at_step=p["end"], add_noise=p["add_noise"],
                            return_with_leftover_noise=p["leftover"], cfg=p["cfg"])
        with torch.no_grad():
            denoise = flow_denoiser(_call(model), concat, context, None, p["cfg"], torch.float32)
            latent = run_pass(denoise, latent, plan_pass(config), seed)
        latents[p["expert"]] = latent.clone()
    return latents, stored


@pytest.mark.slow
@pytest.mark.parametrize("with_lora", [True, False], ids=["lora", "no-lora"])
def test_fp8_scaled_generation_matches_comfyui_own_nodes(tmp_path, comfyui_tree, with_lora):
    """UNETLoader ("default") -> LoraLoaderModelOnly -> ModelSamplingSD3 (5 / 6) -> KSamplerAdvanced 0-2 with
    leftover noise, then 2-4, run by ComfyUI 0.3.64 itself, against wan-bench on the same tiny fp8_scaled files
    (biases and the non-block Linear weights bf16 in the file: ComfyUI rounds both to fp8), seed and conditioning.
    The merged weights must be ComfyUI's bit for bit (its stochastic rounding, the diff_b double rounding, the
    modulation diffs left out), the latents equal to float32 rounding."""
    import importlib.util

    from diffusers import WanTransformer3DModel

    import wan_pipeline.run.loading as loading
    from wan_pipeline.run.precision import resolve_precision

    files, sds = {}, {}
    for i, (expert, marker) in enumerate((("high", 2), ("low", 0))):
        model = randomize(WanTransformer3DModel(**{**TINY_WAN, **COMFY_TINY_WAN}), 10 + i, std=0.05)
        name = f"wan2.2_i2v_{expert}_noise_tiny_fp8_scaled.safetensors"
        write_wan_file(tmp_path / name, model, "fp8_scaled", prefix="model.diffusion_model.",
                       marker_elements=marker)
        files[name] = tmp_path / name
        sds[expert] = {wan_original_name(k): v for k, v in model.state_dict().items()}
        if with_lora:
            lora_name = f"lightx2v_tiny_{expert}.safetensors"
            save_file(_lightx2v_lora(sds[expert], 20 + i), str(tmp_path / lora_name))
            files[lora_name] = tmp_path / lora_name
    lora = {e: (f"lightx2v_tiny_{e}.safetensors" if with_lora else None) for e in ("high", "low")}
    passes = [dict(expert="high", model="wan2.2_i2v_high_noise_tiny_fp8_scaled.safetensors", lora=lora["high"],
                   strength=1.0 if with_lora else 0.0, shift=5.0, steps=4, start=0, end=2, add_noise=True,
                   leftover=True, cfg=1.0),
              dict(expert="low", model="wan2.2_i2v_low_noise_tiny_fp8_scaled.safetensors", lora=lora["low"],
                   strength=1.0 if with_lora else 0.0, shift=6.0, steps=4, start=2, end=4, add_noise=False,
                   leftover=False, cfg=1.0)]
    g = torch.Generator().manual_seed(5)
    t, h, w = 2, 6, 8
    context = torch.randn(1, 24, 4096, generator=g)
    concat_latent_image = torch.randn(1, 16, t, h, w, generator=g)
    concat_mask = torch.ones(1, 1, t, h, w)
    concat_mask[:, :, 0] = 0.0
    seed = 123

    stub = torchvision_stub(tmp_path / "stubs")
    job = dict(path=[str(comfyui_tree), *stub], dir=str(tmp_path), passes=passes, context=context,
               concat_latent_image=concat_latent_image, concat_mask=concat_mask, seed=seed,
               latent=torch.zeros(1, 16, t, h, w), out=str(tmp_path / "comfy_out.pt"))
    torch.save(job, tmp_path / "job.pt")
    (tmp_path / "comfy_run.py").write_text(COMFY_RUN)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, str(tmp_path / "comfy_run.py"), str(tmp_path / "job.pt")],
                         env=env, timeout=600, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    comfy = torch.load(tmp_path / "comfy_out.pt")
    assert comfy["compute"] == {"high": "torch.float32", "low": "torch.float32"}

    # the scaled_fp8 marker: two elements keep ComfyUI's fp8 optimizations off, any other size turns them on,
    # and auto precision follows it on a GPU with fp8 compute
    assert comfy["fp8_optimizations"] == {"high": False, "low": True}
    for expert, p in zip(("high", "low"), passes):
        marker = loading.scaled_fp8_marker_elements(files[p["model"]])
        assert (marker is not None and marker != 2) == comfy["fp8_optimizations"][expert]
    assert resolve_precision("auto", torch.device("cpu"), fp8_matmul_file=True) == "bf16"  # float32 math on a CPU

    ours, stored = _wan_bench_latents(files, passes, context, concat_latent_image, concat_mask, seed)

    # merged weights, bit for bit (fp8 tensors as bytes; ComfyUI's float32 tensors as float32)
    compared = 0
    for expert in ("high", "low"):
        kept = stored[expert]
        theirs = comfy["weights"][expert]
        for dname, oname in kept.original_names.items():
            ref = theirs[oname]
            got = kept.state_dict[dname]
            if got.dtype == FP8 and ref.dtype == FP8:
                assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8)), (expert, oname)
                assert torch.equal(kept.fp8_scales[dname].float().reshape(()),
                                   theirs[oname[: -len("weight")] + "scale_weight"].float().reshape(())), oname
            else:  # kept here dequantized (fp8 biases, the non-block Linear weights with scale 1): same values
                assert got.dtype == torch.float32, (expert, oname, got.dtype)
                assert torch.equal(got, ref.float()), (expert, oname)
            compared += 1
        if with_lora:  # what the LoRA changed, and what ComfyUI leaves alone
            assert torch.equal(theirs["blocks.0.modulation"], sds[expert]["blocks.0.modulation"].bfloat16().float())
            assert kept.lora.accepted_unapplied == ["diffusion_model.blocks.0.modulation.diff",
                                                    "diffusion_model.head.modulation.diff"]
            assert kept.lora.superseded == [f"diffusion_model.blocks.1.cross_attn.k.{r}"
                                            for r in ("alpha", "lora_down.weight", "lora_up.weight")]
    assert compared == 2 * len(stored["high"].original_names)

    for expert in ("high", "low"):
        ref, got = comfy["latents"][expert], ours[expert]
        assert got.shape == ref.shape
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        print(f"{expert} pass latent: max |wan-bench - ComfyUI| / max |ComfyUI| = {err:.3g}")
        assert err < 1e-5, (expert, err)

"""ComfyUI 0.3.64's numerics in the fp8_scaled + LoRA path, pinned on small files in the original key layout.

The stochastic-rounding and seed vectors are checked against ComfyUI's own code from the snapshot when it is
there (the test skips, naming what is missing, otherwise); the rest against hand-computed values.
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
from checkpoints import tiny_transformer, write_wan_file
from safetensors.torch import save_file

from wan_pipeline.run.conditioning import to_uint8_frames
from wan_pipeline.run.loading import load_expert_weights
from wan_pipeline.run.precision import key_seed, stochastic_round_fp8

FP8 = torch.float8_e4m3fn
SNAPSHOT = Path(__file__).resolve().parents[1].parent / "shared" / "comfyui" / "ComfyUI-0.3.64-a125cd8.tar.gz"


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


@pytest.mark.skipif(not SNAPSHOT.is_file(), reason=f"ComfyUI snapshot not found at {SNAPSHOT}")
def test_stochastic_rounding_matches_comfyui_bit_for_bit(tmp_path):
    import tarfile

    with tarfile.open(SNAPSHOT) as tar:
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

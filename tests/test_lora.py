"""LoRA merging: every key format changes its weight by exactly the hand-computed delta."""

from __future__ import annotations

import pytest
import torch
from checkpoints import tiny_transformer, write_diffusers_folder, write_wan_file
from safetensors.torch import save_file

from wan_pipeline.run.loading import load_expert_weights
from wan_pipeline.run.lora import LoraError

TARGET = "blocks.1.self_attn.q"  # original name; diffusers: blocks.1.attn1.to_q
TARGET_D = "blocks.1.attn1.to_q.weight"


@pytest.fixture(scope="module")
def model():
    return tiny_transformer(0)


def dyadic(shape, seed):
    """Small multiples of 1/8: products and sums of a few of them are exact in float32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, shape, generator=g).float() / 8


def module_name(prefix, name=TARGET):
    return prefix + (name if prefix == "diffusion_model." else name.replace(".", "_"))


def load(path, lora, strength, **kw):
    kw.setdefault("compute_dtype", torch.float32)
    return load_expert_weights(path, lora_path=lora, lora_strength=strength, num_attention_heads=2, **kw)


@pytest.mark.parametrize("prefix", ["diffusion_model.", "lora_unet_"])
@pytest.mark.parametrize("pair", [("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight"),
                                  ("lora_up", "lora_down"), ("lora_B", "lora_A")])
@pytest.mark.parametrize("alpha", [None, 2.0])
def test_lora_pair_delta(tmp_path, model, prefix, pair, alpha):
    base = tmp_path / "base.safetensors"
    write_wan_file(base, model, "fp32")
    rank, strength = 4, 0.5
    up, down = dyadic((32, rank), 1), dyadic((rank, 32), 2)
    name = module_name(prefix)
    lora = {f"{name}.{pair[0]}": up, f"{name}.{pair[1]}": down}
    if alpha is not None:
        lora[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    w = load(base, tmp_path / "lora.safetensors", strength)
    scale = strength * (alpha / rank if alpha is not None else 1.0)
    src = model.state_dict()
    assert torch.equal(w.state_dict[TARGET_D], src[TARGET_D] + scale * (up @ down))
    assert w.lora.patched == [TARGET_D] and w.lora.ignored_keys == []
    for k, v in src.items():  # nothing else moved
        if k != TARGET_D:
            assert torch.equal(w.state_dict[k], v), k


def test_diff_and_diff_b(tmp_path, model):
    base = tmp_path / "base.safetensors"
    write_wan_file(base, model, "fp32", prefix="model.diffusion_model.")
    d_w, d_b, d_norm, d_mod = dyadic((48, 32), 3), dyadic((48,), 4), dyadic((32,), 5), dyadic((1, 6, 32), 6)
    save_file({
        "diffusion_model.blocks.0.ffn.0.diff": d_w,
        "diffusion_model.blocks.0.ffn.0.diff_b": d_b,
        "lora_unet_blocks_1_norm3.diff": d_norm,
        "diffusion_model.blocks.0.modulation.diff": d_mod,
    }, str(tmp_path / "lora.safetensors"))
    w = load(base, tmp_path / "lora.safetensors", 0.25)
    src = model.state_dict()
    assert torch.equal(w.state_dict["blocks.0.ffn.net.0.proj.weight"], src["blocks.0.ffn.net.0.proj.weight"] + 0.25 * d_w)
    assert torch.equal(w.state_dict["blocks.0.ffn.net.0.proj.bias"], src["blocks.0.ffn.net.0.proj.bias"] + 0.25 * d_b)
    assert torch.equal(w.state_dict["blocks.1.norm2.weight"], src["blocks.1.norm2.weight"] + 0.25 * d_norm)
    # ComfyUI accepts a modulation diff but never applies it (its patcher walks leaf modules only): nor do we,
    # and the record says so
    assert torch.equal(w.state_dict["blocks.0.scale_shift_table"], src["blocks.0.scale_shift_table"])
    assert w.lora.accepted_unapplied == ["diffusion_model.blocks.0.modulation.diff"]
    assert w.lora.ignored_keys == []
    assert any("1 LoRA keys accepted and ignored, as ComfyUI does" in n for n in w.notes)


def test_diff_replaces_the_same_modules_lora_pair(tmp_path, model):
    """ComfyUI keeps one patch per weight and takes a module's .diff after its lora_up/lora_down: the diff alone
    is applied, the pair accepted (no 'not loaded' warning) and left out; a diff_b still adds to the bias."""
    import warnings

    base = tmp_path / "base.safetensors"
    write_wan_file(base, model, "fp32")
    up, down, d_w, d_b = dyadic((32, 4), 1), dyadic((4, 32), 2), dyadic((32, 32), 3), dyadic((32,), 4)
    save_file({f"diffusion_model.{TARGET}.lora_up.weight": up, f"diffusion_model.{TARGET}.lora_down.weight": down,
               f"diffusion_model.{TARGET}.alpha": torch.tensor(8.0), f"diffusion_model.{TARGET}.diff": d_w,
               f"diffusion_model.{TARGET}.diff_b": d_b}, str(tmp_path / "l.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = load(base, tmp_path / "l.safetensors", 0.5)
    src = model.state_dict()
    assert torch.equal(w.state_dict[TARGET_D], src[TARGET_D] + 0.5 * d_w)
    assert torch.equal(w.state_dict["blocks.1.attn1.to_q.bias"], src["blocks.1.attn1.to_q.bias"] + 0.5 * d_b)
    assert w.lora.superseded == sorted(f"diffusion_model.{TARGET}.{r}" for r in
                                       ("lora_up.weight", "lora_down.weight", "alpha"))
    assert w.lora.ignored_keys == [] and w.lora.accepted_unapplied == []
    assert any("3 lora_up/lora_down keys accepted and ignored, as ComfyUI does" in n for n in w.notes)


def test_lora_on_bf16_rounds_like_comfyui(tmp_path, model):
    base = tmp_path / "base.safetensors"
    expected = write_wan_file(base, model, "bf16")
    up, down = dyadic((32, 4), 1) / 3, dyadic((4, 32), 2)
    save_file({"diffusion_model.blocks.1.self_attn.q.lora_up.weight": up,
               "diffusion_model.blocks.1.self_attn.q.lora_down.weight": down}, str(tmp_path / "l.safetensors"))
    want = expected["blocks.1.self_attn.q.weight"] + up @ down
    # ComfyUI stores the weight in its unet dtype (the compute dtype: float32 on a CPU, float16/bf16 on a GPU) and
    # rounds the float32 sum into it once
    w = load(base, tmp_path / "l.safetensors", 1.0)
    assert torch.equal(w.state_dict[TARGET_D], want)
    w16 = load(base, tmp_path / "l.safetensors", 1.0, compute_dtype=torch.bfloat16)
    assert torch.equal(w16.state_dict[TARGET_D], want.bfloat16())


@pytest.mark.parametrize("fmt", ["fp8_scaled", "fp8_quant_metadata", "fp8_e4m3fn"])
def test_lora_on_fp8_requantizes(tmp_path, model, fmt):
    base = tmp_path / "base.safetensors"
    expected = write_wan_file(base, model, fmt)
    up, down = dyadic((32, 4), 1) / 8, dyadic((4, 32), 2)  # a small delta, as real LoRAs give: no fp8 saturation
    delta = 0.5 * (up @ down)
    save_file({"lora_unet_blocks_1_self_attn_q.lora_B.weight": up,
               "lora_unet_blocks_1_self_attn_q.lora_A.weight": down}, str(tmp_path / "l.safetensors"))
    kept = load(base, tmp_path / "l.safetensors", 0.5, keep_fp8=True, lora_rounding="nearest")
    q = kept.state_dict[TARGET_D]
    assert q.dtype == torch.float8_e4m3fn
    scale = kept.fp8_scales[TARGET_D]
    want = expected["blocks.1.self_attn.q.weight"] + delta
    got = q.float() * scale
    assert (got - want).abs().le(2.0 ** -4 * want.abs() + 2.0 ** -9 * scale + 1e-7).all()
    assert not torch.equal(got, expected["blocks.1.self_attn.q.weight"])
    # round to nearest: no element of the fp8 grid lies closer to the wanted value
    assert torch.equal(q, (want / scale).clamp(-448, 448).to(torch.float8_e4m3fn))
    dequantized = load(base, tmp_path / "l.safetensors", 0.5, keep_fp8=False, lora_rounding="nearest")
    assert torch.equal(dequantized.state_dict[TARGET_D], got)
    # the default: ComfyUI's stochastic rounding seeded by the weight's name: each element one of the two fp8
    # neighbours of the wanted value, the same on every load, and not simply the nearest one everywhere
    from wan_pipeline.run.precision import key_seed, stochastic_round_fp8

    sr = load(base, tmp_path / "l.safetensors", 0.5, keep_fp8=True).state_dict[TARGET_D]
    assert torch.equal(sr, stochastic_round_fp8(want / scale, key_seed("diffusion_model.blocks.1.self_attn.q.weight")))
    assert torch.equal(sr, load(base, tmp_path / "l.safetensors", 0.5, keep_fp8=True).state_dict[TARGET_D])
    assert (sr.float() * scale - want).abs().le(2.0 ** -3 * want.abs() + 2.0 ** -8 * scale + 1e-7).all()
    assert not torch.equal(sr, q)


def test_lora_on_diffusers_folder(tmp_path, model):
    root = write_diffusers_folder(tmp_path / "wan", high=model)
    up, down = dyadic((32, 2), 1), dyadic((2, 32), 2)
    save_file({"lora_unet_blocks_1_self_attn_q.lora_up.weight": up,
               "lora_unet_blocks_1_self_attn_q.lora_down.weight": down,
               "diffusion_model.head.head.diff_b": dyadic((16,), 3)}, str(tmp_path / "l.safetensors"))
    w = load_expert_weights(root / "transformer", lora_path=tmp_path / "l.safetensors", lora_strength=1.0,
                            compute_dtype=torch.float32)
    src = model.state_dict()
    assert torch.equal(w.state_dict[TARGET_D], src[TARGET_D] + up @ down)
    assert torch.equal(w.state_dict["proj_out.bias"], src["proj_out.bias"] + dyadic((16,), 3))


def test_unknown_keys_warn_like_comfyui(tmp_path, model):
    base = tmp_path / "base.safetensors"
    write_wan_file(base, model, "fp32")
    save_file({"diffusion_model.blocks.0.ffn.0.diff": dyadic((48, 32), 1),
               "diffusion_model.blocks.7.ffn.0.diff": dyadic((48, 32), 1),
               "text_encoder.layer.0.lora_up.weight": torch.zeros(2, 2)}, str(tmp_path / "l.safetensors"))
    with pytest.warns(UserWarning, match=r"2 LoRA keys .*blocks\.7\.ffn\.0\.diff.*text_encoder"):
        w = load(base, tmp_path / "l.safetensors", 1.0)
    assert w.lora.ignored_keys == ["diffusion_model.blocks.7.ffn.0.diff", "text_encoder.layer.0.lora_up.weight"]


def test_lora_errors(tmp_path, model):
    base = tmp_path / "base.safetensors"
    write_wan_file(base, model, "fp32")
    save_file({"unet.foo.lora_up.weight": torch.zeros(2, 2)}, str(tmp_path / "none.safetensors"))
    with pytest.raises(LoraError, match="none.safetensors: none of its 1 keys"):
        load(base, tmp_path / "none.safetensors", 1.0)
    save_file({"diffusion_model.blocks.0.ffn.0.diff": torch.zeros(3, 3)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(LoraError, match=r"shape.safetensors: tensor diffusion_model\.blocks\.0\.ffn\.0\.diff .*\(3, 3\)"):
        load(base, tmp_path / "shape.safetensors", 1.0)
    save_file({"diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.zeros(48, 2)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(LoraError, match="half.safetensors: tensor .*lora_up.weight has no matching"):
        load(base, tmp_path / "half.safetensors", 1.0)


def test_strength_zero_skips_lora(tmp_path, model):
    base = tmp_path / "base.safetensors"
    write_wan_file(base, model, "fp32")
    save_file({"diffusion_model.blocks.0.ffn.0.diff": torch.ones(48, 32)}, str(tmp_path / "l.safetensors"))
    w = load(base, tmp_path / "l.safetensors", 0.0)
    assert w.lora is None and torch.equal(w.state_dict["blocks.0.ffn.net.0.proj.weight"],
                                          model.state_dict()["blocks.0.ffn.net.0.proj.weight"])

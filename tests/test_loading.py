"""Loading real weight files: layouts, fp8 formats, diffusers folders, VAE, text encoder, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoints import (tiny_spiece, tiny_transformer, tiny_umt5, tiny_vae, touch, wan_original_name,
                         wan_vae_original_name, write_diffusers_folder, write_umt5_file, write_vae_file, write_wan_file)
from safetensors.torch import save_file

from wan_pipeline.plan import config as cfg
from wan_pipeline.run.loading import (CheckpointError, LoadingError, MissingModelFiles, PickleCheckpointRefused,
                                      find_model_files, load_expert_weights, load_text_encoder,
                                      load_transformer, load_vae)
from wan_pipeline.run.model_files import auto_mode


@pytest.fixture(scope="module")
def model():
    return tiny_transformer(0)


def run_config(lora=True):
    return cfg.RunConfig(name="t", passes=cfg.two_pass(shift_high=5.0, shift_low=5.0, steps=4, split=2, cfg=1.0,
                                                        lora=lora))


def diffusers_name(original_keys):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return {v: k for k, v in convert_wan_transformer_to_diffusers({k: k for k in original_keys}).items()}


def test_test_helpers_invert_diffusers_converters(model):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    names = {wan_original_name(k): k for k in model.state_dict()}
    assert "blocks.1.self_attn.norm_q.weight" in names and "head.modulation" in names and "blocks.0.norm3.bias" in names
    assert diffusers_name(names) == names
    vae_names = {wan_vae_original_name(k): k for k in tiny_vae().state_dict()}
    assert "decoder.upsamples.4.shortcut.weight" in vae_names and "encoder.middle.1.to_qkv.weight" in vae_names
    assert {v: k for k, v in convert_wan_vae_to_diffusers({k: k for k in vae_names}).items()} == vae_names


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp16", "fp8_e4m3fn", "fp8_scaled", "fp8_quant_metadata"])
def test_single_file_reproduces_weights(tmp_path, model, fmt, prefix):
    path = tmp_path / "expert.safetensors"
    expected = write_wan_file(path, model, fmt, prefix=prefix, scale_input=True)
    w = load_expert_weights(path, compute_dtype=torch.float32, num_attention_heads=2)
    assert w.source_format == {"fp8_quant_metadata": "fp8_scaled"}.get(fmt, fmt)
    to_diffusers = diffusers_name(expected)
    assert set(w.state_dict) == set(model.state_dict())
    for orig, value in expected.items():
        assert torch.equal(w.state_dict[to_diffusers[orig]], value), orig
    if fmt.startswith("fp8"):  # within fp8 rounding of the source weights
        for k, v in model.state_dict().items():
            # fp8_scaled: Linear biases and non-fp8 Linear weights are fp8 with scale 1 (as ComfyUI loads them)
            tol = 2.0 ** -4 * v.abs() + 2.0 ** -9 * (v.abs().max() / 448 if fmt == "fp8_quant_metadata" else 1)
            assert (w.state_dict[k] - v).abs().le(tol + 1e-7).all(), k
    assert w.fp8_scales == {}
    if fmt == "fp8_scaled":
        assert torch.equal(w.input_scales["blocks.0.attn1.to_q.weight"], torch.tensor(0.5))
    cfg_ = w.config
    assert (cfg_["num_layers"], cfg_["ffn_dim"], cfg_["in_channels"], cfg_["out_channels"], cfg_["text_dim"],
            cfg_["freq_dim"], cfg_["attention_head_dim"]) == (2, 48, 8, 4, 12, 16, 16)


@pytest.mark.parametrize("fmt", ["fp8_scaled", "fp8_e4m3fn"])
def test_keep_fp8(tmp_path, model, fmt):
    path = tmp_path / "expert.safetensors"
    expected = write_wan_file(path, model, fmt)
    w = load_expert_weights(path, compute_dtype=torch.bfloat16, keep_fp8=True, num_attention_heads=2)
    to_diffusers = diffusers_name(expected)
    q = to_diffusers["blocks.1.ffn.0.weight"]
    assert w.state_dict[q].dtype == torch.float8_e4m3fn
    assert torch.equal(w.state_dict[q].float() * w.fp8_scales[q], expected["blocks.1.ffn.0.weight"])
    assert w.state_dict["blocks.0.scale_shift_table"].dtype == torch.float32  # diffusers keeps it in fp32
    module = load_transformer(w, dtype=torch.bfloat16)
    assert module.blocks[1].ffn.net[0].proj.weight.dtype == torch.float8_e4m3fn
    assert module.blocks[1].ffn.net[0].proj.bias.dtype == torch.bfloat16


def test_loaded_transformer_forward_matches_source(tmp_path, model):
    path = tmp_path / "expert.safetensors"
    write_wan_file(path, model, "fp32", prefix="model.diffusion_model.")
    loaded = load_transformer(load_expert_weights(path, compute_dtype=torch.float32, num_attention_heads=2),
                              dtype=torch.float32)
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    x, t, ctx = torch.randn(1, 8, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 5, 12)
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx).sample, loaded(x, t, ctx).sample)
        bf16 = load_transformer(load_expert_weights(path, num_attention_heads=2), dtype=torch.bfloat16)
        out = bf16(x.bfloat16(), t, ctx.bfloat16()).sample.float()
    assert torch.allclose(out, model(x, t, ctx).sample, atol=0.1)


def test_heads_from_inner_dim(tmp_path):
    m = tiny_transformer(0, num_attention_heads=2, attention_head_dim=128)
    write_wan_file(tmp_path / "a.safetensors", m, "bf16")
    assert load_expert_weights(tmp_path / "a.safetensors").config["num_attention_heads"] == 2
    write_wan_file(tmp_path / "b.safetensors", tiny_transformer(0), "bf16")
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        load_expert_weights(tmp_path / "b.safetensors")


def test_diffusers_folder(tmp_path, model):
    root = write_diffusers_folder(tmp_path / "wan", high=model, max_shard_size="20KB")
    assert (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    files = find_model_files(root, run_config(lora=False))
    assert files.layout == "diffusers" and files.experts["high"].model == root / "transformer"
    w = load_expert_weights(files.experts["high"].model, compute_dtype=torch.float32)
    assert w.source_format == "fp32" and w.config["num_attention_heads"] == 2
    for k, v in model.state_dict().items():
        assert torch.equal(w.state_dict[k], v), k
    vae = load_vae(files.vae)
    te, tok = load_text_encoder(files.text_encoder, dtype=torch.float32)
    assert torch.equal(te.shared.weight, tiny_umt5(4).shared.weight)
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=tiny_spiece())
    assert tok.tokenize("a woman").ids[:len(sp.encode("a woman")) + 2] == sp.encode("a woman") + [1, 0]
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), tiny_vae(3).state_dict().values()))
    # a missing shard is named
    next((root / "transformer").glob("*-00002-of-*.safetensors")).unlink()
    with pytest.raises(MissingModelFiles, match="00002-of"):
        load_expert_weights(root / "transformer")


def test_vae_single_file(tmp_path):
    vae = tiny_vae(0)
    write_vae_file(tmp_path / "wan_2.1_vae.safetensors", vae, dtype=torch.bfloat16)
    loaded = load_vae(tmp_path / "wan_2.1_vae.safetensors", dtype=torch.float32)
    for (k, a), (k2, b) in zip(sorted(loaded.state_dict().items()), sorted(vae.state_dict().items())):
        assert k == k2 and torch.equal(a, b.bfloat16().float()), k
    x = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded.encode(x).latent_dist.mean, vae.to(torch.bfloat16).float().encode(x).latent_dist.mean)


@pytest.mark.parametrize("fp8", [False, True])
def test_text_encoder_comfyui_file(tmp_path, fp8):
    import sentencepiece

    src = tiny_umt5(0)
    expected = write_umt5_file(tmp_path / "umt5.safetensors", src, fp8_scaled=fp8)
    te, tok = load_text_encoder(tmp_path / "umt5.safetensors", dtype=torch.float32)
    for k, v in expected.items():
        assert torch.equal(te.state_dict()[k], v), k
    assert te.config.num_heads == 4 and te.config.d_kv == 4 and te.config.d_ff == 24
    sp = sentencepiece.SentencePieceProcessor(model_proto=tiny_spiece())
    text = "a woman walks in the rain"
    t = tok.tokenize(text)
    n = len(sp.encode(text)) + 1
    assert t.ids[:n] == sp.encode(text) + [1] and t.ids[n:] == [0] * (512 - n) and len(t.ids) == 512
    assert t.attention_mask == [1] * n + [0] * (512 - n)
    long = tok.tokenize("rain " * 600)
    assert len(long.ids) > 512 and long.ids[-1] == 1
    if not fp8:
        ids, mask = torch.tensor([t.ids]), torch.tensor([t.attention_mask])
        with torch.no_grad():
            assert torch.equal(te(ids, attention_mask=mask).last_hidden_state,
                               src(ids, attention_mask=mask).last_hidden_state)
    else:  # ComfyUI keeps an fp8 file in fp8: the file's own values and scales come back exactly
        from wan_pipeline.run.precision import Fp8Linear, store_text_encoder_fp8

        store_text_encoder_fp8(te, torch.float32, te.fp8_file_scales)
        stored = {n: m for n, m in te.named_modules() if isinstance(m, Fp8Linear)}
        assert stored and not any(n.endswith(".wo") for n in stored)
        for name, module in stored.items():
            assert torch.equal(module.weight.float() * module.weight_scale, expected[f"{name}.weight"]), name


def test_text_encoder_without_tokenizer(tmp_path):
    write_umt5_file(tmp_path / "umt5.safetensors", tiny_umt5(0), spiece=False)
    with pytest.raises(CheckpointError, match="umt5.safetensors.*spiece_model"):
        load_text_encoder(tmp_path / "umt5.safetensors")


# ------------------------------------------------------------------------------------------------- finding files


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("given", ["root", "models"])
def test_find_comfyui_files(tmp_path, legacy, given):
    models = tmp_path / "ComfyUI" / "models"
    for name in (cfg.HIGH_NOISE_MODEL, cfg.LOW_NOISE_MODEL):
        touch(models / ("unet" if legacy else "diffusion_models") / name)
    for name in (cfg.HIGH_NOISE_LORA, cfg.LOW_NOISE_LORA):
        touch(models / "loras" / name)
    touch(models / ("clip" if legacy else "text_encoders") / cfg.TEXT_ENCODER)
    touch(models / "vae" / cfg.VAE)
    files = find_model_files(models.parent if given == "root" else models, run_config())
    assert files.layout == "comfyui"
    assert files.experts["low"].model.name == cfg.LOW_NOISE_MODEL
    assert files.experts["high"].lora.name == cfg.HIGH_NOISE_LORA and files.experts["high"].lora_strength == 1.0
    assert files.text_encoder.name == cfg.TEXT_ENCODER and files.vae.name == cfg.VAE
    assert auto_mode(models, [run_config()])[0] == "real"  # what auto does with a complete folder


def test_missing_files_listed(tmp_path):
    models = tmp_path / "models"
    touch(models / "diffusion_models" / cfg.HIGH_NOISE_MODEL)
    touch(models / "loras" / "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.ckpt")
    with pytest.raises(MissingModelFiles) as err:
        find_model_files(models, run_config())
    msg = str(err.value)
    for name in (cfg.LOW_NOISE_MODEL, cfg.HIGH_NOISE_LORA, cfg.LOW_NOISE_LORA, cfg.TEXT_ENCODER, cfg.VAE):
        assert name in msg
    assert cfg.HIGH_NOISE_MODEL not in msg
    for folder in ("diffusion_models", "unet", "loras", "text_encoders", "clip", "vae"):
        assert str(models / folder) in msg
    assert "pickle checkpoints are refused" in msg
    for folder in (models, tmp_path / "nothing"):  # auto never falls back from a folder it was given
        with pytest.raises(LoadingError, match="is not usable"):
            auto_mode(folder, [run_config()])
    with pytest.raises(MissingModelFiles, match="model_index.json"):
        find_model_files(tmp_path / "nothing", run_config())


# --------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"w": torch.zeros(2)}, path)
    for load in (load_expert_weights, load_vae, load_text_encoder):
        with pytest.raises(PickleCheckpointRefused, match=f"model\\{suffix}"):
            load(path)


def test_truncated_and_corrupt_files(tmp_path, model):
    path = tmp_path / "expert.safetensors"
    write_wan_file(path, model, "bf16")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    with pytest.raises(CheckpointError, match=f"cut.safetensors: tensor {last} .*truncated"):
        load_expert_weights(tmp_path / "cut.safetensors", num_attention_heads=2)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"0" * 64)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_vae(tmp_path / "junk.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="tiny.safetensors"):
        load_text_encoder(tmp_path / "tiny.safetensors")


def test_wrong_shape_named(tmp_path, model):
    def edit(sd):
        sd["blocks.1.ffn.0.weight"] = torch.zeros(40, 32)
        sd["blocks.1.ffn.0.bias"] = torch.zeros(40)
        sd["blocks.1.ffn.2.weight"] = torch.zeros(32, 40)

    path = tmp_path / "bad.safetensors"
    write_wan_file(path, model, "bf16", edit=edit)
    w = load_expert_weights(path, num_attention_heads=2)
    with pytest.raises(CheckpointError, match=r"bad.safetensors: tensor blocks\.1\.ffn\.0\.(weight|bias)"):
        load_transformer(w)


def test_unsupported_quant_format(tmp_path, model):
    path = tmp_path / "q.safetensors"
    write_wan_file(path, model, "bf16")
    from safetensors.torch import load_file

    meta = {"_quantization_metadata": json.dumps({"layers": {"blocks.0.self_attn.q": {"format": "nvfp4"}}})}
    save_file(load_file(path), str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="q.safetensors: layer blocks.0.self_attn.q .*nvfp4"):
        load_expert_weights(path, num_attention_heads=2)


def test_not_a_wan_file(tmp_path):
    save_file({"foo.weight": torch.zeros(2, 2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(LoadingError, match="x.safetensors: tensor patch_embedding.weight is missing"):
        load_expert_weights(tmp_path / "x.safetensors")

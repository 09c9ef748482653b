"""The random-weight model set in ComfyUI's layout (`wan_pipeline.run.comfy_files`), at tiny size: every file is
where ComfyUI looks for it under the template's name, in the format ComfyUI's loaders expect, and wan-bench's own
loaders read it back (the ComfyUI server reads the same files in tests/test_comfyui_server.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from wan_pipeline.plan.config import (HIGH_NOISE_LORA, HIGH_NOISE_MODEL, LOW_NOISE_LORA, LOW_NOISE_MODEL,
                                      TEXT_ENCODER)
from wan_pipeline.run.comfy_files import VAE_FILE, main, write_comfyui_models
from wan_pipeline.run.loading import load_expert_weights, load_text_encoder, load_transformer, load_vae

FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return root, write_comfyui_models(root, "tiny", seed=1)


def test_files_lie_where_comfyui_looks_for_them(models):
    root, written = models
    assert {p.relative_to(root).as_posix() for p in written.values()} == {
        f"diffusion_models/{HIGH_NOISE_MODEL}", f"diffusion_models/{LOW_NOISE_MODEL}", f"loras/{HIGH_NOISE_LORA}",
        f"loras/{LOW_NOISE_LORA}", f"text_encoders/{TEXT_ENCODER}", f"vae/{VAE_FILE}"}
    with safe_open(str(written[HIGH_NOISE_MODEL]), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.diffusion_model.blocks.0.self_attn.q.weight").dtype == FP8
        assert f.get_tensor("model.diffusion_model.blocks.0.self_attn.q.scale_weight").dtype == torch.float32
        assert f.get_tensor("model.diffusion_model.patch_embedding.weight").shape == (256, 36, 1, 2, 2)
    assert "model.diffusion_model.scaled_fp8" in keys and "model.diffusion_model.head.modulation" in keys
    with safe_open(str(written[VAE_FILE]), "pt") as f:
        assert f.get_tensor("decoder.middle.0.residual.0.gamma").shape[0] == 384  # the Wan 2.1 width ComfyUI builds


def test_wan_bench_loads_every_file(models):
    _, written = models
    weights = load_expert_weights(written[HIGH_NOISE_MODEL], lora_path=written[HIGH_NOISE_LORA], lora_strength=1.0,
                                  compute_dtype=torch.float32)
    assert weights.marker_elements == 2 and weights.lora is not None
    model = load_transformer(weights, dtype=torch.float32)
    assert (model.config.num_attention_heads, model.config.attention_head_dim, model.config.num_layers) == (2, 128, 2)
    load_vae(written[VAE_FILE])
    encoder, tokenizer = load_text_encoder(written[TEXT_ENCODER], dtype=torch.float32)
    ids = tokenizer.tokenize("a white dragon warrior").ids
    assert ids[: ids.index(1) + 1][-1] == 1 and max(ids) < encoder.config.vocab_size


def test_the_script_refuses_an_unknown_size(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--size", "huge"])


@pytest.mark.parametrize("device, says", [("gpu", "not a torch device"), ("mps", "expected cpu or a CUDA device")])
def test_the_script_refuses_a_device_it_cannot_draw_on(tmp_path, capsys, device, says):
    assert main([str(tmp_path), "--size", "tiny", "--device", device]) == 2
    assert says in capsys.readouterr().err
    assert not any(tmp_path.rglob("*.safetensors"))  # refused before any file was written


def test_without_a_gpu_the_cuda_device_is_refused_with_what_to_use(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    assert main([str(tmp_path), "--size", "tiny", "--device", "cuda"]) == 2
    assert "no CUDA device is visible here; use --device cpu" in capsys.readouterr().err

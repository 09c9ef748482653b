"""The random-weight ComfyUI file set drawn on a CUDA device (`comfy_files --device cuda`, how the full-size set
is written in seconds): the files are the same layout as a CPU draw, every value lands on the host, finite, and
wan-bench's loaders read the set back."""

import pytest
import torch
from safetensors import safe_open

from wan_pipeline.plan.config import HIGH_NOISE_MODEL, TEXT_ENCODER
from wan_pipeline.run.comfy_files import VAE_FILE, write_comfyui_models
from wan_pipeline.run.loading import load_expert_weights, load_text_encoder, load_transformer

pytestmark = pytest.mark.gpu


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_a_set_drawn_on_the_gpu_has_the_cpu_draws_layout_and_loads(cuda, tmp_path):
    on_gpu = write_comfyui_models(tmp_path / "gpu", "tiny", seed=1, device=str(cuda))
    on_cpu = write_comfyui_models(tmp_path / "cpu", "tiny", seed=1)
    for name in (HIGH_NOISE_MODEL, TEXT_ENCODER, VAE_FILE):
        a, b = _tensors(on_gpu[name]), _tensors(on_cpu[name])
        assert {k: (v.dtype, v.shape) for k, v in a.items()} == {k: (v.dtype, v.shape) for k, v in b.items()}, name
        for k, v in a.items():
            if v.is_floating_point() and v.numel():
                assert torch.isfinite(v.float()).all(), (name, k)
    q = "model.diffusion_model.blocks.0.self_attn.q.weight"
    assert not torch.equal(_tensors(on_gpu[HIGH_NOISE_MODEL])[q].view(torch.uint8),
                           _tensors(on_cpu[HIGH_NOISE_MODEL])[q].view(torch.uint8))  # drawn by the device's generator
    weights = load_expert_weights(on_gpu[HIGH_NOISE_MODEL], compute_dtype=torch.float32)
    assert load_transformer(weights, dtype=torch.float32).config.num_layers == 2
    load_text_encoder(on_gpu[TEXT_ENCODER], dtype=torch.float32)

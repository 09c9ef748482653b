"""Residency on a real device: an off-loaded component comes back bit-exact, and so does its output."""

import pytest
import torch

from gpu_helpers import tiny_models
from wan_pipeline.run.models import Residency

pytestmark = pytest.mark.gpu


def _state(module):
    return {k: t.detach().clone().cpu() for k, t in [*module.named_parameters(), *module.named_buffers()]}


def test_offload_and_back_is_bit_exact(cuda):
    _, plan, prepared = tiny_models(cuda)
    models = prepared.models
    assert models.device.type == "cuda" and sorted(models.experts) == ["high", "low"]
    residency = Residency(models, reserve_bytes=0, total_bytes=10**15, policy="offload-idle-expert")
    before = {name: _state(module) for name, module in [("text_encoder", models.text_encoder),
                                                        *[(f"expert:{k}", m) for k, m in models.experts.items()]]}
    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(1, 36, 2, 10, 6, generator=g).to(cuda, models.dtype)
    context = torch.randn(1, 512, 32, generator=g).to(cuda, models.dtype)
    timestep = torch.tensor([900.0], device=cuda)

    @torch.no_grad()
    def forward(expert):
        return models.experts[expert](hidden_states=x, timestep=timestep, encoder_hidden_states=context,
                                      return_dict=False)[0]

    residency.need("expert:high")
    out_before = forward("high")
    residency.need("expert:low")  # one expert at a time: high and the text encoder leave
    assert all(p.device.type == "cpu" for p in models.experts["high"].parameters())
    assert all(p.device.type == "cpu" for p in models.text_encoder.parameters())
    assert all(p.is_cuda for p in models.experts["low"].parameters())
    host_copies = {k: dict(v) for k, v in models.host_copies.items()}
    residency.need("expert:high")  # and back
    assert all(p.is_cuda for p in models.experts["high"].parameters())
    residency.need("text_encoder")
    for name, state in before.items():
        module = residency._module(name)
        now = _state(module)
        assert now.keys() == state.keys()
        assert all(torch.equal(now[k], state[k]) for k in state), f"{name} changed on its way through the host"
    residency.need("expert:high")
    assert torch.equal(forward("high"), out_before)
    residency.need("expert:low")  # a second off-load reuses the host copies made at the first: no new copy
    assert all(models.host_copies["expert:high"][k] is t for k, t in host_copies["expert:high"].items())

"""The two-pass sampler against a direct step-by-step computation, on the tiny expert."""

import math

import pytest
import torch

from wan_pipeline.plan.plan import make_plan
from wan_pipeline.plan.presets import get_preset
from wan_pipeline.run import sampler
from wan_pipeline.run.models import TINY_TRANSFORMER, random_transformer


def test_latent_normalisation_round_trip():
    x = torch.randn(1, 16, 3, 4, 5)
    assert torch.allclose(sampler.process_latent_out(sampler.process_latent_in(x)), x, atol=1e-5)
    mean = torch.tensor(sampler.WAN21_LATENTS_MEAN).reshape(1, 16, 1, 1, 1)
    assert torch.allclose(sampler.process_latent_in(mean.expand(1, 16, 3, 4, 5)), torch.zeros(1, 16, 3, 4, 5))


def test_noise_is_comfyui_cpu_float32_manual_seed():
    torch.manual_seed(0)
    a = sampler.comfy_noise((1, 16, 2, 3, 4), seed=42)
    expected = torch.randn((1, 16, 2, 3, 4), generator=torch.manual_seed(42), dtype=torch.float32)
    assert a.dtype == torch.float32 and torch.equal(a, expected)


@pytest.fixture(scope="module")
def tiny_expert():
    return random_transformer(TINY_TRANSFORMER, torch.device("cpu"), torch.float32, seed=3), \
        random_transformer(TINY_TRANSFORMER, torch.device("cpu"), torch.float32, seed=4)


def _forward(model):
    def f(x, t, ctx):
        return model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
    return f


def test_two_pass_sampler_matches_direct_computation(tiny_expert):
    high, low = tiny_expert
    plan = make_plan(get_preset("seed-832x1216-49f"), "tiny")
    shape = plan.latent_shape
    g = torch.Generator().manual_seed(7)
    concat = torch.randn((shape[0], 20) + shape[2:], generator=g)
    ctx = torch.randn(1, 512, TINY_TRANSFORMER["text_dim"], generator=g)
    p1, p2 = plan.passes

    latent = torch.zeros(shape)
    out1 = sampler.run_pass(sampler.flow_denoiser(_forward(high), concat, ctx, None, 1.0, torch.float32),
                            latent, p1, seed=11)
    out2 = sampler.run_pass(sampler.flow_denoiser(_forward(low), concat, ctx, None, 1.0, torch.float32),
                            out1, p2, seed=11)

    # Direct computation: for a flow model, euler's d is the model output itself.
    def velocity(model, x, sigma):
        t = torch.full((1,), sigma * 1000.0)
        return _forward(model)(torch.cat([x, concat], 1), t, ctx)

    noise = torch.randn(shape, generator=torch.manual_seed(11))
    s = p1.sigmas
    x = s[0] * noise  # the empty latent stays zero (no process_latent_in)
    for a, b in zip(s, s[1:]):
        x = x + velocity(high, x, a) * (b - a)
    x_end1 = x
    z1 = x / (1 - s[-1])  # pass 1's output (inverse noise scaling), normalised space
    s = p2.sigmas
    x = plan.handover_scale * x_end1  # (1 - sigma0_pass2) / (1 - sigma_last_pass1) on the sampler's last x
    for a, b in zip(s, s[1:]):
        x = x + velocity(low, x, a) * (b - a)
    expected = sampler.process_latent_out(x)

    assert torch.allclose(sampler.process_latent_in(out1), z1, atol=1e-4, rtol=1e-4)
    assert torch.allclose(out2, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out2, sampler.process_latent_out(z1), atol=1e-2)  # pass 2 really moved the latent


class CountingModel:
    def __init__(self):
        self.contexts = []

    def __call__(self, x, t, ctx):
        self.contexts.append(float(ctx.flatten()[0]))
        return torch.full_like(x[:, :16], float(ctx.flatten()[0]))


def test_cfg_one_never_runs_the_negative_prompt():
    model = CountingModel()
    pos, neg = torch.ones(1, 4, 8), torch.full((1, 4, 8), -1.0)
    denoise = sampler.flow_denoiser(model, torch.zeros(1, 20, 1, 2, 2), pos, neg, 1.0, torch.float32)
    denoise(torch.zeros(1, 16, 1, 2, 2), 0.5)
    assert model.contexts == [1.0]


def test_cfg_combines_denoised_values():
    model = CountingModel()
    pos, neg = torch.full((1, 4, 8), 2.0), torch.full((1, 4, 8), -1.0)
    x = torch.full((1, 16, 1, 2, 2), 0.3)
    denoise = sampler.flow_denoiser(model, torch.zeros(1, 20, 1, 2, 2), pos, neg, 3.5, torch.float32)
    out = denoise(x, 0.5)
    cond, uncond = 0.3 - 2.0 * 0.5, 0.3 + 1.0 * 0.5
    assert model.contexts == [2.0, -1.0]
    assert torch.allclose(out, torch.full_like(x, uncond + 3.5 * (cond - uncond)))


def test_pass_that_starts_past_the_end_returns_its_input():
    import dataclasses

    cfg = get_preset("seed-832x1216-49f")
    late = dataclasses.replace(cfg.passes[1], start_at_step=4)
    plan = make_plan(cfg.replace(passes=(cfg.passes[0], late)), "tiny")
    assert plan.passes[1].forwards == 0
    x = torch.randn(plan.latent_shape)
    assert sampler.run_pass(lambda *_: pytest.fail("model called"), x, plan.passes[1], 0) is x
    assert math.isclose(plan.handover_scale, 1.0)

"""Plans of the presets: shapes, tokens, forwards, hand-over; and the configuration rules."""

import dataclasses
import json
import subprocess
import sys

import pytest

from wan_pipeline.plan.config import ConfigError
from wan_pipeline.plan.plan import make_plan, tiny_geometry, token_count, warmup_plan
from wan_pipeline.plan.presets import DEFAULT_MATRIX, PRESETS, get_preset


def test_seed_preset_plan_matches_reference():
    plan = make_plan(get_preset("seed-832x1216-49f"), "synthetic")
    assert (plan.width, plan.height, plan.frames, plan.latent_frames) == (832, 1216, 49, 13)
    assert plan.latent_shape == (1, 16, 13, 152, 104)
    assert plan.tokens == 51376
    p1, p2 = plan.passes
    assert list(p1.sigmas) == pytest.approx([1.0, 0.9375, 0.8333333], abs=1e-7)
    assert list(p2.sigmas) == pytest.approx([0.85714287, 0.6666667, 0.0], abs=1e-7)
    assert list(p1.timesteps) == pytest.approx([1000.0, 937.5], abs=1e-4)
    assert list(p2.timesteps) == pytest.approx([857.14287, 666.6667], abs=1e-3)
    assert (p1.forwards, p2.forwards, plan.forwards) == (2, 2, 4)
    assert plan.handover_scale == pytest.approx(0.857143, abs=1e-6)


def test_the_warmup_plan_is_the_first_step_of_every_pass_at_the_same_shapes():
    plan = make_plan(get_preset("seed-832x1216-49f-cfg3.5"), "synthetic")
    warm = warmup_plan(plan)
    assert (warm.latent_shape, warm.tokens, warm.config) == (plan.latent_shape, plan.tokens, plan.config)
    for full, cut in zip(plan.passes, warm.passes):
        assert cut.config == full.config and cut.steps_run == 1
        assert cut.sigmas == full.sigmas[:2] and cut.timesteps == full.timesteps[:1]
        assert cut.forwards == 2  # CFG: positive and negative at the one step
    assert warm.forwards == 4 and plan.forwards == 8
    idle = make_plan(get_preset("seed-832x1216-49f").replace(passes=(
        get_preset("seed-832x1216-49f").passes[0],
        dataclasses.replace(get_preset("seed-832x1216-49f").passes[1], start_at_step=4))), "synthetic")
    assert warmup_plan(idle).passes[1] == idle.passes[1]  # a pass that makes no step stays as it is
    with pytest.raises(ValueError, match="at least one step"):
        warmup_plan(plan, steps_per_pass=0)


@pytest.mark.parametrize("name, frames, tokens", [
    ("seed-832x1216-81f", 81, 82992),
    ("seed-832x1216-161f", 161, 162032),
    ("template-640x640-81f-4step", 81, 33600),
])
def test_token_counts(name, frames, tokens):
    plan = make_plan(get_preset(name), "synthetic")
    assert plan.frames == frames and plan.tokens == tokens


@pytest.mark.parametrize("name, forwards", [
    ("seed-832x1216-49f-cfg3.5", 8),
    ("seed-832x1216-49f-cfg7.0", 8),
    ("template-640x640-81f-20step", 40),
    ("template-640x640-81f-4step", 4),
])
def test_cfg_doubles_forwards(name, forwards):
    assert make_plan(get_preset(name), "synthetic").forwards == forwards


def test_equal_shifts_hand_over_unchanged():
    assert make_plan(get_preset("template-640x640-81f-4step"), "synthetic").handover_scale == 1.0
    plan20 = make_plan(get_preset("template-640x640-81f-20step"), "synthetic")
    assert plan20.handover_scale == 1.0 and len(plan20.passes[0].sigmas) == 11


def test_every_preset_plans_and_default_matrix_is_known():
    for name in PRESETS:
        make_plan(PRESETS[name], "synthetic")
    assert set(DEFAULT_MATRIX) <= set(PRESETS)


def test_tiny_mode_reduces_geometry_and_says_so():
    plan = make_plan(get_preset("seed-832x1216-49f"), "tiny")
    assert plan.scaled_from == (832, 1216, 49)
    assert (plan.width, plan.height, plan.frames) == tiny_geometry(832, 1216, 49)
    assert plan.width % 16 == 0 and plan.height % 16 == 0 and (plan.frames - 1) % 4 == 0
    assert plan.tokens == token_count(plan.width, plan.height, plan.frames) < 1000


def test_geometry_snaps_like_comfyui_with_a_warning():
    cfg = get_preset("seed-832x1216-49f").replace(width=840, height=1210, length=50)
    with pytest.warns(UserWarning, match="832x1200x49 is used"):
        plan = make_plan(cfg, "synthetic")
    assert (plan.width, plan.height, plan.frames) == (832, 1200, 49)


@pytest.mark.parametrize("change, message", [
    (dict(width=8), "at least 16"),
    (dict(length=0), "length must be a positive integer"),
    (dict(attention="xformers"), "attention 'xformers'"),
    (dict(precision="int4"), "precision 'int4'"),
    (dict(residency="swap"), "residency 'swap' is not one of"),
    (dict(vae_bands=0), "vae_bands must be a positive integer"),
    (dict(sequence_parallel=2, vae_bands=4), "with sequence parallelism the VAE bands are the 2 ranks"),
])
def test_bad_configuration_names_the_value(change, message):
    with pytest.raises(ConfigError, match=message):
        make_plan(get_preset("seed-832x1216-49f").replace(**change), "synthetic")


def test_unsupported_sampler_is_an_error():
    import dataclasses

    cfg = get_preset("seed-832x1216-49f")
    bad = cfg.replace(passes=(dataclasses.replace(cfg.passes[0], sampler="dpmpp_2m"), cfg.passes[1]))
    with pytest.raises(ConfigError, match="sampler 'dpmpp_2m' is not supported"):
        make_plan(bad, "synthetic")


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="seed-832x1216-49f"):
        get_preset("nope")


def test_cli_plan_json_has_stable_keys():
    out = subprocess.run([sys.executable, "-m", "wan_pipeline", "plan", "--preset", "seed-832x1216-49f",
                          "--mode", "synthetic", "--json"], capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    for key in ("width", "height", "frames", "latent_frames", "tokens", "fps", "seed", "mode", "handover_scale",
                "passes"):
        assert key in data
    assert set(data["passes"][0]) >= {"expert", "model_file", "lora_file", "lora_strength", "shift", "steps",
                                      "start_step", "end_step", "add_noise", "return_leftover_noise", "cfg",
                                      "sampler", "scheduler", "sigmas", "timesteps", "forwards"}
    assert data["tokens"] == 51376 and data["mode"] == "synthetic"


def test_cli_unknown_preset_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "wan_pipeline", "plan", "--preset", "nope", "--mode", "tiny"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown preset 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_forward_flops_at_the_users_size():
    from wan_pipeline.run.case import forward_flops

    # 832x1216x49 (51,376 tokens), A14B (40 blocks, 5120 wide): linear layers 1.23 PFLOP + self-attention
    # 2.16 PFLOP (64 %) per expert forward
    total = forward_flops(51376)
    self_attention = 40 * 4 * 51376 ** 2 * 5120
    assert self_attention / 1e15 == pytest.approx(2.16, abs=0.005)
    assert (total - self_attention - 40 * 4 * 51376 * 512 * 5120) / 1e15 == pytest.approx(1.23, abs=0.005)


def test_case_ids_name_every_setting_that_is_not_the_default():
    from wan_pipeline.run.case import WanCase

    base = get_preset("seed-832x1216-49f").replace(precision="fp8-scaled-mm")
    assert WanCase(base, "synthetic").id == "seed-832x1216-49f-sdpa-fp8-scaled-mm-compile0"  # ids of old histories
    changed = base.replace(attention="cudnn-fp8", compile=True, residency="offload-text-encoder", vae_bands=2)
    assert WanCase(changed, "synthetic").id == ("seed-832x1216-49f-cudnn-fp8-fp8-scaled-mm-compile1"
                                                "-offload-text-encoder-vae2bands")


def test_torch_compile_is_read_one_way_everywhere():
    from wan_pipeline.plan.config import compile_values

    assert compile_values(None) == (False,) and compile_values(" On ") == (True,) and compile_values("0") == (False,)
    assert compile_values("both") == (False, True)
    with pytest.raises(ConfigError, match="TORCH_COMPILE must be 0, 1 or both, got 'yse'"):
        compile_values("yse")


@pytest.mark.parametrize("value, message", [
    ("yse", "TORCH_COMPILE must be 0, 1 or both, got 'yse'"),  # was silently "off" in the CLI
    ("both", "TORCH_COMPILE=both crosses the suite's matrix; one run takes 0 or 1"),
])
def test_the_cli_refuses_a_torch_compile_it_cannot_honour(value, message):
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "wan_pipeline", "plan"], capture_output=True, text=True,
                          env={**os.environ, "TORCH_COMPILE": value}, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_lora_at_strength_zero_is_no_lora_for_every_consumer():
    import dataclasses

    from wan_pipeline.plan.config import ModelSetKey

    cfg = get_preset("seed-832x1216-49f")
    off = cfg.replace(passes=tuple(dataclasses.replace(p, lora_strength=0.0) for p in cfg.passes))
    none = cfg.replace(passes=tuple(dataclasses.replace(p, lora_file=None) for p in cfg.passes))
    assert all(p.lora_file is None and p.lora_strength == 0.0 for p in off.passes + none.passes)
    assert ModelSetKey.for_run(off, "real", "/m") == ModelSetKey.for_run(none, "real", "/m")  # no needless reload


def test_the_compile_estimate_subtracts_what_a_compiled_warmup_takes():
    from wan_pipeline.run.case import CaseRun
    from wan_pipeline.run.pipeline import Generation

    plan = make_plan(get_preset("seed-832x1216-49f"), "synthetic")  # two steps per pass
    run = CaseRun(plan, prepared=None)
    stages = {"text_encode": 0.1, "image_encode": 1.2, "switch": 0.0, "pass1": 8.0, "pass2": 8.2, "decode": 1.9}
    run.rounds = [Generation(None, None, dict(stages), {}) for _ in range(3)]
    assert run.warmup_steady_seconds() == pytest.approx(0.1 + 1.2 + 4.0 + 4.1 + 1.9)
    assert CaseRun(plan, prepared=None).warmup_steady_seconds() is None

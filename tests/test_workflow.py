"""workflow.py on the project's own fixtures (fixtures/workflows, written by make_fixtures.py) and on small mutations."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from wan_pipeline.errors import WanBenchError, WorkflowError
from wan_pipeline.plan.comfy import (configs_from_workflow, load_workflow_chains, load_workflow_configs,
                                     workflow_chains, workflow_matrix)
from wan_pipeline.plan.comfy.chains import DEFAULT_WAN_SHIFT
from wan_pipeline.plan.config import HIGH_NOISE_LORA, HIGH_NOISE_MODEL, LOW_NOISE_LORA, LOW_NOISE_MODEL
from wan_pipeline.plan.plan import make_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures", "workflows")
USERS = os.path.join(FIX, "users_variant.json")
USERS_API = os.path.join(FIX, "users_variant_api.json")


def _load(name: str) -> dict:
    with open(os.path.join(FIX, name), encoding="utf-8") as f:
        return json.load(f)


def _node(wf: dict, nid: int) -> dict:
    return next(n for n in wf["nodes"] if n["id"] == nid)


def _one(wf: dict, source: str = "mutated.json"):
    configs = configs_from_workflow(wf, source)
    assert len(configs) == 1
    return configs[0]


# --- the users' variant --------------------------------------------------------------------------------------------


def test_users_variant_configuration():
    (config,) = load_workflow_configs(USERS)
    assert config.name == "wf-users_variant"
    assert (config.width, config.height, config.length, config.batch_size, config.fps) == (832, 1216, 49, 1, 16)
    assert config.seed == 42
    assert config.image == "portrait.png"
    assert config.prompt.startswith("A woman in a red coat")
    assert config.negative_prompt == "blurry, static, low quality"
    assert config.text_encoder_file == "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    assert config.vae_file == "wan_2.1_vae.safetensors"
    high, low = config.passes
    assert (high.expert, high.model_file, high.lora_file, high.lora_strength) == ("high", HIGH_NOISE_MODEL,
                                                                                 HIGH_NOISE_LORA, 1.0)
    assert (low.expert, low.model_file, low.lora_file, low.lora_strength) == ("low", LOW_NOISE_MODEL,
                                                                             LOW_NOISE_LORA, 1.0)
    assert (high.shift, low.shift) == (5.0, 6.0)
    assert (high.steps, high.start_at_step, high.end_at_step) == (4, 0, 2)
    assert (low.steps, low.start_at_step, low.end_at_step) == (4, 2, 10000)
    assert (high.add_noise, high.return_with_leftover_noise) == (True, True)
    assert (low.add_noise, low.return_with_leftover_noise) == (False, False)
    assert (high.cfg, low.cfg, high.sampler, high.scheduler) == (1.0, 1.0, "euler", "simple")


def test_users_variant_plan_sigmas():
    (config,) = load_workflow_configs(USERS)
    plan = make_plan(config, "synthetic")
    assert plan.passes[0].sigmas == pytest.approx([1.0, 0.9375, 0.8333333], abs=1e-7)
    assert plan.passes[1].sigmas == pytest.approx([0.85714287, 0.6666667, 0.0], abs=1e-7)
    assert plan.forwards == 4
    assert plan.latent_shape == (1, 16, 13, 152, 104)
    assert plan.handover_scale == pytest.approx(0.857143, abs=1e-5)


def test_users_variant_active_group_is_the_lora_group():
    (chain,) = load_workflow_chains(USERS)
    assert "fp8_scaled + 4steps LoRA" in chain.groups
    assert "fp8_scaled" not in chain.groups
    assert chain.sampler_ids == ("13", "14")


def test_api_export_gives_the_same_configuration():
    (ui,) = load_workflow_configs(USERS)
    (api,) = load_workflow_configs(USERS_API)
    assert api.name == "wf-users_variant_api"
    assert api.replace(name=ui.name) == ui


def test_api_prompt_request_body_is_accepted():
    body = {"prompt": _load("users_variant_api.json"), "client_id": "x"}
    (config,) = configs_from_workflow(body, "request.json")
    assert config.passes[1].shift == 6.0


# --- semantics: modes, bypass, LoRA, shift default, several chains ----------------------------------------------------


def test_bypassed_lora_means_no_lora():
    wf = _load("users_variant.json")
    _node(wf, 6)["mode"] = 4
    config = _one(wf)
    assert (config.passes[0].lora_file, config.passes[0].lora_strength) == (None, 0.0)
    assert config.passes[1].lora_file == LOW_NOISE_LORA


def test_zero_strength_lora_means_no_lora():
    wf = _load("users_variant.json")
    _node(wf, 7)["widgets_values"][1] = 0.0
    assert _one(wf).passes[1].lora_file is None


def test_bypassed_model_sampling_uses_wan_default_shift():
    wf = _load("users_variant.json")
    _node(wf, 9)["mode"] = 4
    config = _one(wf)
    assert DEFAULT_WAN_SHIFT == 8.0
    assert (config.passes[0].shift, config.passes[1].shift) == (5.0, 8.0)


def test_muted_node_kills_its_chain():
    wf = _load("users_variant.json")
    _node(wf, 4)["mode"] = 2  # the high-noise UNETLoader of the only active chain
    with pytest.raises(WorkflowError, match=r"no runnable .*muted"):
        configs_from_workflow(wf, "muted.json")


def test_muted_second_pass_is_not_silently_dropped():
    wf = _load("users_variant.json")
    _node(wf, 14)["mode"] = 2  # pass 1's latent then reaches no output node
    with pytest.raises(WorkflowError, match="reaches no output node"):
        configs_from_workflow(wf, "muted2.json")


def test_a_chain_comfyui_never_runs_is_dead_before_its_settings_are_checked():
    wf = _load("users_variant.json")
    sampler = _node(wf, 13)["widgets_values"].index("euler")
    _node(wf, 13)["widgets_values"][sampler] = "no_such_sampler"
    with pytest.raises(WorkflowError, match="no_such_sampler"):  # a chain that runs: its sampler is checked
        configs_from_workflow(copy.deepcopy(wf), "bad_sampler.json")
    _node(wf, 14)["mode"] = 2  # now its latent reaches no output node: dead, whatever its sampler
    with pytest.raises(WorkflowError, match="reaches no output node") as info:
        configs_from_workflow(wf, "dead.json")
    assert "no_such_sampler" not in str(info.value)


def test_bypassed_second_pass_leaves_a_one_pass_chain():
    wf = _load("users_variant.json")
    _node(wf, 14)["mode"] = 4  # the latent passes through to VAEDecode
    config = _one(wf)
    assert len(config.passes) == 1 and config.passes[0].end_at_step == 2


def test_two_active_groups_give_two_named_configurations():
    wf = _load("users_variant.json")
    for n in wf["nodes"]:
        n["mode"] = 0
    chains = workflow_chains(wf, "both.json")
    names = [c.config.name for c in chains]
    assert names == ["wf-both-fp8-scaled-4steps-lora", "wf-both-fp8-scaled"]
    plain = chains[1].config
    assert (plain.passes[0].steps, plain.passes[0].end_at_step, plain.passes[0].cfg) == (20, 10, 3.5)
    assert plain.passes[0].lora_file is None and plain.passes[0].shift == 8.0
    assert (plain.width, plain.height, plain.length) == (640, 640, 81)


def test_one_pass_feeding_two_passes_is_ambiguous():
    wf = _load("users_variant.json")
    for n in wf["nodes"]:
        n["mode"] = 0
    # Pass 2 of the plain group takes its latent from pass 1 of the LoRA group.
    lid = _node(wf, 114)["inputs"][3]["link"]
    link = next(x for x in wf["links"] if x[0] == lid)
    link[1] = 13
    with pytest.raises(WorkflowError, match=r"node #13 \(KSamplerAdvanced\).*ambiguous"):
        configs_from_workflow(wf, "ambiguous.json")


def test_expert_follows_model_file_name():
    wf = _load("users_variant.json")
    _node(wf, 4)["widgets_values"][0] = "my_low_noise_finetune.safetensors"
    assert _one(wf).passes[0].expert == "low"
    _node(wf, 4)["widgets_values"][0] = "custom.safetensors"
    assert _one(wf).passes[0].expert == "high"


def test_widget_values_without_control_after_generate():
    wf = _load("users_variant.json")
    for nid in (13, 14):
        del _node(wf, nid)["widgets_values"][2]
    assert _one(wf) == load_workflow_configs(USERS)[0].replace(name="wf-mutated")


def test_fps_from_the_video_node():
    wf = _load("users_variant.json")
    _node(wf, 16)["widgets_values"] = [24.0]
    assert _one(wf).fps == 24


# --- bad input ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, pattern",
    [
        ("broken_not_json.json", r"broken_not_json\.json: not a JSON workflow file"),
        ("broken_not_a_workflow.json", r"broken_not_a_workflow\.json: not a ComfyUI workflow"),
        ("broken_not_wan.json", r"node #12 \(EmptyLatentImage\): feeds node #13 \(KSamplerAdvanced\) input "
                                r"'latent_image'; expected WanImageToVideo"),
        ("broken_missing_link.json", r"node #9 \(ModelSamplingSD3\) input 'model' uses link 999, which does not exist"),
        ("broken_cycle.json", r"node #\d+ \(ModelSamplingSD3\).*cycle"),
        ("broken_unknown_node.json", r"node #8 \(PathchSageAttentionKJ\).*expected ModelSamplingSD3 or "
                                     r"LoraLoaderModelOnly or UNETLoader"),
        ("broken_sampler.json", r"node #13 \(KSamplerAdvanced\): sampler_name 'dpmpp_2m' is not supported; "
                                r"expected one of euler"),
        ("broken_scheduler.json", r"node #14 \(KSamplerAdvanced\): scheduler 'karras' is not supported"),
    ],
)
def test_broken_files(name, pattern):
    with pytest.raises(WorkflowError, match=pattern) as info:
        load_workflow_configs(os.path.join(FIX, name))
    assert name in str(info.value)
    assert isinstance(info.value, WanBenchError)


def test_missing_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(WorkflowError, match="nope.json: cannot read"):
        load_workflow_configs(missing)


def test_no_sampler_at_all():
    with pytest.raises(WorkflowError, match="no active KSamplerAdvanced"):
        configs_from_workflow({"nodes": [{"id": 1, "type": "Note", "mode": 0}], "links": []}, "empty.json")


def test_literal_where_a_link_is_expected_in_api_format():
    api = _load("users_variant_api.json")
    api["13"]["inputs"]["model"] = "not a link"
    with pytest.raises(WorkflowError, match=r"node #13 \(KSamplerAdvanced\) input 'model'.*expected a link"):
        configs_from_workflow(api, "api.json")


def test_bad_widget_value_names_the_node():
    wf = _load("users_variant.json")
    _node(wf, 12)["widgets_values"][0] = "wide"
    with pytest.raises(WorkflowError, match=r"node #12 \(WanImageToVideo\): width is 'wide'; expected an integer"):
        configs_from_workflow(wf, "bad.json")


def test_second_lora_in_one_chain_is_an_error():
    wf = _load("users_variant.json")
    lid = _node(wf, 6)["inputs"][0]["link"]
    link = next(x for x in wf["links"] if x[0] == lid)
    link[1] = 7  # LoRA #6 now sits on top of LoRA #7 (the low-noise one)
    with pytest.raises(WorkflowError, match=r"node #7 \(LoraLoaderModelOnly\).*at most one"):
        configs_from_workflow(wf, "two_loras.json")


# --- matrix and CLI ------------------------------------------------------------------------------------------------------


def test_workflow_matrix_names_and_values():
    (config,) = load_workflow_configs(USERS)
    matrix = workflow_matrix(config)
    names = [c.name for c in matrix]
    assert names == ["wf-users_variant", "wf-users_variant-81f", "wf-users_variant-161f",
                     "wf-users_variant-cfg3.5", "wf-users_variant-cfg7.0"]
    assert matrix[0] is config
    byname = {c.name: c for c in matrix}
    assert byname["wf-users_variant-161f"].length == 161
    assert [p.cfg for p in byname["wf-users_variant-cfg7.0"].passes] == [7.0, 7.0]
    assert byname["wf-users_variant-cfg7.0"].length == 49
    assert make_plan(byname["wf-users_variant-cfg3.5"], "synthetic").forwards == 8


def test_workflow_matrix_keeps_an_odd_length_and_adds_cfg1():
    (config,) = load_workflow_configs(USERS)
    odd = config.replace(name="x", length=33, passes=tuple(p.__class__(**{**p.__dict__, "cfg": 5.0})
                                                           for p in config.passes))
    names = [c.name for c in workflow_matrix(odd)]
    assert names == ["x", "x-49f", "x-81f", "x-161f", "x-cfg1.0", "x-cfg3.5", "x-cfg7.0"]


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "wan_pipeline", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def test_cli_plan_json_from_workflow():
    out = _cli("plan", "--workflow", USERS, "--mode", "synthetic", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["preset"] == "wf-users_variant"
    assert (plan["width"], plan["height"], plan["frames"]) == (832, 1216, 49)
    assert [p["shift"] for p in plan["passes"]] == [5.0, 6.0]


def test_cli_plan_error_is_one_line_and_exit_2():
    out = _cli("plan", "--workflow", os.path.join(FIX, "broken_sampler.json"), "--mode", "synthetic")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "node #13 (KSamplerAdvanced)" in out.stderr


def test_fixtures_are_up_to_date(tmp_path):
    """The committed fixtures are what make_fixtures.py writes."""
    sys.path.insert(0, FIX)
    try:
        import make_fixtures
    finally:
        sys.path.remove(FIX)
    assert copy.deepcopy(make_fixtures.users_variant()) == _load("users_variant.json")
    assert make_fixtures.to_api(make_fixtures.users_variant()) == _load("users_variant_api.json")


def test_load_image_is_found_next_to_the_workflow_or_in_comfyui_input(tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    from wan_pipeline.errors import WorkflowError
    from wan_pipeline.plan.comfy import load_workflow_configs, locate_input_image

    source = Path(__file__).parent.parent / "fixtures" / "workflows" / "users_variant.json"
    workflow = tmp_path / "wf" / "users_variant.json"
    workflow.parent.mkdir()
    shutil.copy(source, workflow)
    config = load_workflow_configs(workflow)[0]
    assert config.image == "portrait.png"

    with pytest.raises(WorkflowError, match="LoadImage file 'portrait.png' was not found"):
        locate_input_image(config, workflow, None, "real")
    with pytest.warns(UserWarning, match="uses the built-in test card"):
        assert locate_input_image(config, workflow, None, "synthetic").image is None

    comfy = tmp_path / "ComfyUI"
    (comfy / "input").mkdir(parents=True)
    (comfy / "models").mkdir()
    (comfy / "input" / "portrait.png").write_bytes(b"png")
    assert locate_input_image(config, workflow, str(comfy / "models"), "real").image == str(
        comfy / "input" / "portrait.png")
    (workflow.parent / "portrait.png").write_bytes(b"png")
    assert locate_input_image(config, workflow, str(comfy / "models"), "real").image == str(
        workflow.parent / "portrait.png")

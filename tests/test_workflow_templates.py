"""workflow.py on the real ComfyUI templates (optional test dependencies; skipped with the reason where missing).

- current subgraph template: package ``comfyui-workflow-templates-json`` (tested with 0.1.123),
  ``comfyui_workflow_templates_json/templates/video_wan2_2_14B_i2v.json``;
- older flat two-group template: package ``comfyui-workflow-templates==0.1.95``,
  ``comfyui_workflow_templates/templates/video_wan2_2_14B_i2v.json``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os

import pytest

from wan_pipeline.errors import WorkflowError
from wan_pipeline.plan.comfy import configs_from_workflow, load_workflow_chains, workflow_chains, workflow_matrix
from wan_pipeline.plan.config import HIGH_NOISE_LORA, HIGH_NOISE_MODEL, LOW_NOISE_LORA, LOW_NOISE_MODEL
from wan_pipeline.plan.plan import make_plan

TEMPLATE = "video_wan2_2_14B_i2v.json"


def template_path(package: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"optional test dependency {package} is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "templates", TEMPLATE)
    if not os.path.exists(path):
        pytest.skip(f"{package} has no templates/{TEMPLATE}")
    return path


@pytest.fixture(scope="module")
def current_path():
    return template_path("comfyui_workflow_templates_json")


@pytest.fixture(scope="module")
def flat_path():
    path = template_path("comfyui_workflow_templates")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if "definitions" in data or len(data.get("groups", [])) < 2:
        pytest.skip("installed comfyui-workflow-templates is not the flat two-group layout (pin 0.1.95)")
    return path


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def subgraph(data):
    return data["definitions"]["subgraphs"][0]


def inner(data, nid):
    return next(n for n in subgraph(data)["nodes"] if n["id"] == nid)


# --- current subgraph template -------------------------------------------------------------------------------------


def test_current_template_default_is_20_steps_without_lora(current_path):
    (chain,) = load_workflow_chains(current_path)
    c = chain.config
    assert c.name == "wf-video_wan2_2_14B_i2v"
    assert (c.width, c.height, c.length, c.batch_size, c.fps) == (640, 640, 81, 1, 16)  # floor(5 s * 16 + 1) = 81
    assert c.image == "video_wan2_2_14B_i2v_input_image.jpg"
    assert c.seed == 264244520398999
    assert c.prompt.startswith("The white dragon warrior")
    high, low = c.passes
    assert (high.model_file, low.model_file) == (HIGH_NOISE_MODEL, LOW_NOISE_MODEL)
    assert (high.lora_file, low.lora_file) == (None, None)
    assert (high.steps, high.start_at_step, high.end_at_step) == (20, 0, 10)
    assert (low.steps, low.start_at_step, low.end_at_step) == (20, 10, 20)
    assert (high.cfg, low.cfg) == (3.5, 3.5)
    assert (high.shift, low.shift) == pytest.approx((5.0, 5.0))
    assert (high.add_noise, high.return_with_leftover_noise, low.add_noise, low.return_with_leftover_noise) == (
        True, True, False, False)
    assert chain.sampler_ids == ("129:86", "129:85")
    # The switches pick the "Original Settings" primitives; the LoRA group is not used.
    assert "Original Settings" in chain.groups and "4steps Light LoRA" not in chain.groups
    plan = make_plan(c, "synthetic")
    assert [p.steps_run for p in plan.passes] == [10, 10] and plan.forwards == 40


def test_current_template_with_lora_enabled(current_path):
    data = load(current_path)
    instance = next(n for n in data["nodes"] if n["type"] == subgraph(data)["id"])
    instance["widgets_values"][-1] = True  # "enable_turbo_mode" -> the "Enable 4steps LoRA?" PrimitiveBoolean
    (chain,) = workflow_chains(data, "turbo.json")
    high, low = chain.config.passes
    assert (high.lora_file, low.lora_file) == (HIGH_NOISE_LORA, LOW_NOISE_LORA)
    assert high.lora_strength == pytest.approx(1.0)
    assert (high.steps, high.end_at_step, low.start_at_step, low.end_at_step) == (4, 2, 2, 4)
    assert (high.cfg, low.cfg) == (1.0, 1.0)
    assert "4steps Light LoRA" in chain.groups and "Original Settings" not in chain.groups
    plan = make_plan(chain.config, "synthetic")
    assert plan.passes[0].sigmas == pytest.approx([1.0, 0.9375, 0.8333333], abs=1e-7)
    assert plan.passes[1].sigmas == pytest.approx([0.8333333, 0.625, 0.0], abs=1e-7)


def test_current_template_instance_values_reach_the_subgraph(current_path):
    data = load(current_path)
    instance = next(n for n in data["nodes"] if n["type"] == subgraph(data)["id"])
    values = instance["widgets_values"]
    values[1], values[2], values[3] = 832, 1216, 3  # width, height, duration (s)
    inner(data, 162)["widgets_values"] = [16]  # fps
    inner(data, 104)["widgets_values"] = [5.0]
    inner(data, 103)["widgets_values"] = [6.0]
    (c,) = configs_from_workflow(data, "mine.json")
    assert (c.width, c.height, c.length, c.fps) == (832, 1216, 49, 16)
    assert (c.passes[0].shift, c.passes[1].shift) == (5.0, 6.0)


def test_current_template_muted_instance_is_not_runnable(current_path):
    data = load(current_path)
    next(n for n in data["nodes"] if n["type"] == subgraph(data)["id"])["mode"] = 2
    with pytest.raises(WorkflowError, match="no active KSamplerAdvanced|no runnable"):
        configs_from_workflow(data, "muted.json")


# --- older flat two-group template -----------------------------------------------------------------------------------


def test_flat_template_lora_group_is_active(flat_path):
    (chain,) = load_workflow_chains(flat_path)
    c = chain.config
    assert (c.width, c.height, c.length, c.fps) == (640, 640, 81, 16)
    assert c.image == "input-18.jpg"
    high, low = c.passes
    assert (high.lora_file, low.lora_file) == (HIGH_NOISE_LORA, LOW_NOISE_LORA)
    assert (high.steps, high.start_at_step, high.end_at_step) == (4, 0, 2)
    assert (low.steps, low.start_at_step, low.end_at_step) == (4, 2, 4)
    assert (high.cfg, low.cfg) == (1.0, 1.0)
    assert (high.shift, low.shift) == pytest.approx((5.0, 5.0))
    assert chain.sampler_ids == ("86", "85")
    assert "fp8_scaled +  4steps LoRA" in chain.groups and "fp8_scaled" not in chain.groups


def test_flat_template_other_group_when_switched(flat_path):
    data = load(flat_path)
    bypassed = {n["id"] for n in data["nodes"] if n.get("mode") == 4}
    for n in data["nodes"]:
        if n["id"] in bypassed:
            n["mode"] = 0
        elif n["type"] not in ("Note", "MarkdownNote"):
            n["mode"] = 4
    (chain,) = workflow_chains(data, "plain.json")
    high, low = chain.config.passes
    assert (high.lora_file, low.lora_file) == (None, None)
    assert (high.steps, high.end_at_step, low.start_at_step, low.end_at_step) == (20, 10, 10, 10000)
    assert (high.cfg, low.cfg) == (3.5, 3.5)
    assert (high.shift, low.shift) == pytest.approx((8.0, 8.0))  # older template: shift 8.0
    assert "fp8_scaled" in chain.groups and "fp8_scaled +  4steps LoRA" not in chain.groups


def test_flat_template_both_groups_active_gives_two_configs(flat_path):
    data = load(flat_path)
    for n in data["nodes"]:
        n["mode"] = 0
    chains = workflow_chains(data, "both.json")
    assert [c.config.name for c in chains] == ["wf-both-fp8-scaled", "wf-both-fp8-scaled-4steps-lora"]
    assert [c.config.passes[0].steps for c in chains] == [20, 4]


def test_flat_template_matrix(flat_path):
    (chain,) = load_workflow_chains(flat_path)
    names = [c.name for c in workflow_matrix(chain.config)]
    base = chain.config.name
    assert names == [base, f"{base}-49f", f"{base}-161f", f"{base}-cfg3.5", f"{base}-cfg7.0"]


def test_flat_template_muted_lora_means_no_runnable_chain(flat_path):
    data = copy.deepcopy(load(flat_path))
    next(n for n in data["nodes"] if n["id"] == 101)["mode"] = 2
    with pytest.raises(WorkflowError, match=r"no runnable.*node #101 \(LoraLoaderModelOnly\) is muted"):
        configs_from_workflow(data, "muted.json")

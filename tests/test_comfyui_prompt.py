"""The ComfyUI-server backend's pure parts, without a server: the UI-to-API conversion on a small graph with
declared node classes, variants, the node-to-stage map, the prompt's own matrix, event timelines and the server
changes compare names."""

from __future__ import annotations

import pytest

from wan_pipeline.errors import WorkflowError
from wan_pipeline.history.comfyui import comfyui_changes
from wan_pipeline.plan.comfy.api import (node_stages, prompt_matrix, prompt_variant, sampler_steps, to_api_prompt,
                                         with_saved_latent)
from wan_pipeline.run.comfyui.client import timeline

INFO = {  # what /object_info declares for these classes (inputs, their order, the seed control)
    "Loader": {"input": {"required": {"name": [["a.safetensors", "b.safetensors"], {}]}},
               "input_order": {"required": ["name"]}},
    "Sampler": {"input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}],
                                       "steps": ["INT", {}], "cfg": ["FLOAT", {}]},
                          "optional": {"latent": ["LATENT", {}]}},
                "input_order": {"required": ["model", "seed", "steps", "cfg"], "optional": ["latent"]}},
    "Patch": {"input": {"required": {"model": ["MODEL", {}], "shift": ["FLOAT", {}]}},
              "input_order": {"required": ["model", "shift"]}},
}


def ui_graph(patch_mode=0, sampler2_mode=0):
    return {"nodes": [
        {"id": 1, "type": "Loader", "mode": 0, "outputs": [{"type": "MODEL"}], "widgets_values": ["a.safetensors"]},
        {"id": 2, "type": "Patch", "mode": patch_mode, "inputs": [{"name": "model", "type": "MODEL", "link": 1}],
         "outputs": [{"type": "MODEL"}], "widgets_values": [5.0]},
        {"id": 3, "type": "Sampler", "mode": 0, "inputs": [{"name": "model", "type": "MODEL", "link": 2}],
         "outputs": [{"type": "LATENT"}], "widgets_values": [42, "randomize", 4, 1.0]},
        {"id": 4, "type": "Sampler", "mode": sampler2_mode,
         "inputs": [{"name": "model", "type": "MODEL", "link": 2}, {"name": "latent", "type": "LATENT", "link": 3},
                    {"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": 4}],
         "outputs": [{"type": "LATENT"}], "widgets_values": [7, "fixed", 4, 3.0]},
        {"id": 5, "type": "PrimitiveNode", "mode": 0, "outputs": [{"type": "INT"}], "widgets_values": [6, "fixed"]},
        {"id": 6, "type": "Note", "mode": 0, "widgets_values": ["hello"]},
    ], "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"], [3, 3, 0, 4, 1, "LATENT"],
                 [4, 5, 0, 4, 2, "INT"]]}


def test_widgets_map_in_the_servers_order_without_the_seed_control():
    prompt = to_api_prompt(ui_graph(), INFO, "w.json")
    assert set(prompt) == {"1", "2", "3", "4"}  # the primitive and the note live in the front end only
    assert prompt["3"]["inputs"] == {"model": ["2", 0], "seed": 42, "steps": 4, "cfg": 1.0}
    assert prompt["4"]["inputs"] == {"model": ["2", 0], "seed": 7, "steps": 6, "cfg": 3.0, "latent": ["3", 0]}
    assert prompt["1"]["inputs"] == {"name": "a.safetensors"}


def test_bypassed_nodes_pass_through_and_muted_nodes_drop_their_links():
    bypassed = to_api_prompt(ui_graph(patch_mode=4), INFO, "w.json")
    assert "2" not in bypassed and bypassed["3"]["inputs"]["model"] == ["1", 0]
    muted = to_api_prompt(ui_graph(patch_mode=2), INFO, "w.json")
    assert "2" not in muted and "model" not in muted["3"]["inputs"]
    with pytest.raises(WorkflowError, match=r"w\.json: node #2 \(Patch\): mode 3"):
        to_api_prompt(ui_graph(patch_mode=3), INFO, "w.json")


def test_api_files_are_posted_as_they_are():
    api = {"9": {"class_type": "Anything", "inputs": {"x": 1}}}
    assert to_api_prompt(api, {}, "a.json") == api and to_api_prompt({"prompt": api}, {}, "a.json") == api


WAN = {
    "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "h"}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["9", 0]}},
    "9": {"class_type": "CLIPLoader", "inputs": {}},
    "3": {"class_type": "WanImageToVideo", "inputs": {"positive": ["2", 0], "negative": ["2", 0], "length": 81,
                                                      "width": 64, "height": 64}},
    "4": {"class_type": "KSamplerAdvanced", "inputs": {"model": ["1", 0], "positive": ["3", 0], "add_noise": "enable",
                                                       "noise_seed": 1, "cfg": 1.0, "steps": 4, "start_at_step": 0,
                                                       "end_at_step": 2, "latent_image": ["3", 2]}},
    "5": {"class_type": "KSamplerAdvanced", "inputs": {"model": ["1", 0], "positive": ["3", 0], "add_noise": "disable",
                                                       "noise_seed": 1, "cfg": 1.0, "steps": 4, "start_at_step": 2,
                                                       "end_at_step": 10000, "latent_image": ["4", 0]}},
    "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0]}},
    "7": {"class_type": "SaveVideo", "inputs": {"video": ["6", 0]}},
}


def test_stages_follow_class_and_position():
    assert node_stages(WAN) == {"1": "load", "9": "load", "2": "text_encode", "3": "image_encode", "4": "pass1",
                                "5": "pass2", "6": "decode", "7": "save"}
    assert sampler_steps(WAN) == 4


def test_the_final_latent_is_saved_from_what_the_decode_receives():
    saved, node = with_saved_latent(WAN, "wf.json")
    assert node == "10" and node not in WAN  # the prompt given is left as it was
    assert saved[node]["class_type"] == "SaveLatent" and saved[node]["inputs"]["samples"] == ["5", 0]
    assert node_stages(saved)[node] == "other" and {k: v for k, v in saved.items() if k != node} == WAN
    with pytest.raises(WorkflowError, match="wf.json: no VAEDecode node"):
        with_saved_latent({k: v for k, v in WAN.items() if k not in ("6", "7")}, "wf.json")
    two = dict(WAN, **{"8": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0]}}})
    with pytest.raises(WorkflowError, match="decode nodes 6, 8 take different latents"):
        with_saved_latent(two, "wf.json")


def test_variants_edit_length_cfg_and_the_seed_of_the_noisy_pass():
    v = prompt_variant(WAN, length=49, cfg=3.5, seed=9)
    assert v["3"]["inputs"]["length"] == 49 and v["4"]["inputs"]["cfg"] == v["5"]["inputs"]["cfg"] == 3.5
    assert v["4"]["inputs"]["noise_seed"] == 9 and v["5"]["inputs"]["noise_seed"] == 1
    assert WAN["3"]["inputs"]["length"] == 81
    with pytest.raises(WorkflowError, match="no WanImageToVideo"):
        prompt_variant({"1": {"class_type": "KSampler", "inputs": {}}}, length=49)


def test_the_prompts_own_matrix_has_workflow_matrix_names():
    names = [n for n, _, _ in prompt_matrix(WAN, "wf-x")]
    assert names == ["wf-x", "wf-x-49f", "wf-x-161f", "wf-x-cfg3.5", "wf-x-cfg7.0"]


def test_timeline_gives_each_node_the_time_to_the_next_event():
    events = [(0.1, "execution_start", {}), (0.1, "execution_cached", {"nodes": ["1"]}),
              (0.2, "executing", {"node": "4"}), (0.3, "progress", {"node": "4"}), (1.2, "executing", {"node": "5"}),
              (2.0, "executed", {"node": "5"}), (2.5, "execution_success", {})]
    ex = timeline("p", events)
    assert ex.node_seconds == pytest.approx({"4": 1.0, "5": 1.3}) and ex.cached == ["1"]
    assert ex.total_seconds == 2.5 and ex.queued_seconds == 0.1


def test_compare_names_server_changes_in_a_users_words():
    before = {"url": "u", "version": "0.3.64", "torch": "2.8.0", "launch_flags": ["--fast fp16_accumulation"],
              "custom_nodes": ["ComfyUI-GGUF"], "devices": [{"name": "cuda:0 H200"}]}
    after = dict(before, version="0.3.66", launch_flags=["--fast fp8_matrix_mult", "--use-sage-attention"],
                 custom_nodes=["ComfyUI-KJNodes"])
    assert [c.describe() for c in comfyui_changes(before, after)] == [
        "ComfyUI 0.3.64 -> 0.3.66", "--fast fp16_accumulation -> --fast fp8_matrix_mult",
        "--use-sage-attention added", "ComfyUI-KJNodes appeared", "ComfyUI-GGUF went away"]
    assert comfyui_changes(before, before) == [] and comfyui_changes(None, None) == []
    assert comfyui_changes(None, before)[0].describe() == "ComfyUI server appeared (u)"

"""The ComfyUI-server backend against a real ComfyUI 0.3.64 server on the CPU (started from the source snapshot,
tiny Wan 2.2 files in ComfyUI's layout; skipped, naming what is missing, without them): workflow conversion on the
real templates, event timing and stages, warm and cold rounds, the suite and the CLI on the server, environment
attribution in compare, and every bad-input case failing with the server's own reason."""

from __future__ import annotations

import copy
import http.server
import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from comfyui_server import INPUT_IMAGE, TINY_TEXT_ENCODER, free_port, precompute_conditioning, start_server

from wan_pipeline.errors import WorkflowError
from wan_pipeline.plan.comfy import load_workflow_chains
from wan_pipeline.plan.comfy.api import node_stages, prompt_variant, to_api_prompt
from wan_pipeline.run.comfyui.case import ComfyCase, ComfyCaseRun, ServerSession, comfy_cases, launch_flags
from wan_pipeline.run.comfyui.client import ComfyClient, ComfyServerError

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = "video_wan2_2_14B_i2v.json"
pytestmark = pytest.mark.slow


def template(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"optional test dependency {package} is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "templates" / TEMPLATE
    if not path.is_file():
        pytest.skip(f"{package} has no templates/{TEMPLATE}")
    return path


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    srv, base = start_server(tmp_path_factory)
    try:
        yield srv, base
    finally:
        srv.stop()
    assert srv.process.poll() is not None  # no server left behind


@pytest.fixture(scope="module")
def server(started):
    return started[0]


@pytest.fixture(scope="module")
def client(server):
    return ComfyClient(server.url, timeout=300)


@pytest.fixture(scope="module")
def object_info(client):
    return client.object_info()


def check_prompt(prompt: dict, object_info: dict) -> None:
    """What the server expects of a prompt: known classes, known input names, links to posted nodes."""
    for nid, entry in prompt.items():
        info = object_info[entry["class_type"]]
        names = set(info["input"].get("required", {})) | set(info["input"].get("optional", {}))
        assert set(entry["inputs"]) <= names, (nid, entry["class_type"], set(entry["inputs"]) - names)
        for value in entry["inputs"].values():
            if isinstance(value, list):
                assert value[0] in prompt, (nid, value)
            assert value not in ("fixed", "randomize", "increment", "decrement", "image")  # frontend-only values


def test_flat_template_converts_as_the_frontend_does(object_info, client):
    path = template("comfyui_workflow_templates")
    prompt = to_api_prompt(json.loads(path.read_text()), object_info, str(path))
    check_prompt(prompt, object_info)
    (chain,) = load_workflow_chains(path)
    assert [prompt[s]["class_type"] for s in chain.sampler_ids] == ["KSamplerAdvanced"] * 2
    for sid, p in zip(chain.sampler_ids, chain.config.passes):
        inputs = prompt[sid]["inputs"]
        assert (inputs["steps"], inputs["start_at_step"], inputs["end_at_step"]) == (p.steps, p.start_at_step,
                                                                                     p.end_at_step)
        assert inputs["cfg"] == p.cfg and isinstance(inputs["noise_seed"], int)
        assert inputs["sampler_name"] == "euler" and inputs["scheduler"] == "simple"
    classes = sorted(e["class_type"] for e in prompt.values())
    assert "Note" not in classes and "MarkdownNote" not in classes
    assert classes.count("KSamplerAdvanced") == 2  # the bypassed 20-step group is not posted
    assert prompt["97"]["inputs"] == {"image": "input-18.jpg"}  # the upload widget's value dropped
    stages = node_stages(prompt)
    assert [stages[s] for s in chain.sampler_ids] == ["pass1", "pass2"]
    assert {stages[n] for n, e in prompt.items() if e["class_type"] == "CLIPTextEncode"} == {"text_encode"}
    # the server lacks the template's text encoder file and input image: rejected, naming each node, class and file
    with pytest.raises(ComfyServerError) as err:
        client.submit(prompt)
    text = str(err.value)
    assert "node #84 (CLIPLoader)" in text and "umt5_xxl_fp8_e4m3fn_scaled.safetensors" in text
    assert "node #97 (LoadImage)" in text and "input-18.jpg" in text
    assert "UNETLoader" not in text  # the experts are there


def test_subgraph_template_is_flattened(object_info):
    path = template("comfyui_workflow_templates_json")
    data = json.loads(path.read_text())
    # the current template needs nodes newer than 0.3.64: the error names the first one
    with pytest.raises(WorkflowError, match=r"node #129:\d+ \((ComfySwitchNode|ComfyMathExpression)\): the server "
                                            r"has no node of this class"):
        to_api_prompt(data, object_info, str(path))
    newer = dict(object_info)  # what a newer server declares for them (its input names and order)
    newer["ComfySwitchNode"] = {"input": {"required": {"switch": ["BOOLEAN", {}], "on_false": ["*", {"lazy": True}],
                                                       "on_true": ["*", {"lazy": True}]}},
                                "input_order": {"required": ["switch", "on_false", "on_true"]}}
    newer["ComfyMathExpression"] = {"input": {"required": {"expression": ["STRING", {}]},
                                              "optional": {f"values.{k}": ["*", {}] for k in "abc"}},
                                    "input_order": {"required": ["expression"],
                                                    "optional": [f"values.{k}" for k in "abc"]}}
    prompt = to_api_prompt(data, newer, str(path))
    check_prompt(prompt, newer)
    assert prompt["129:116"]["inputs"] == {"switch": ["129:131", 0], "on_false": ["129:95", 0],
                                           "on_true": ["129:101", 0]}
    assert prompt["129:163"]["inputs"]["expression"] == "floor (a * b + 1)"
    for chain in load_workflow_chains(path):
        for sid in chain.sampler_ids:
            assert ":" in sid and prompt[sid]["class_type"] == "KSamplerAdvanced"  # ComfyUI's inner-node ids
            assert prompt[sid]["inputs"]["steps"][0] in prompt  # from the switch between 4 and 20 steps
    assert not any(e["class_type"] in ("MarkdownNote", "Note") or e["class_type"].count("-") == 4
                   for e in prompt.values())  # no notes, no subgraph instance posted


def test_bypassed_and_muted_nodes(object_info):
    path = template("comfyui_workflow_templates")
    data = json.loads(path.read_text())
    for node in data["nodes"]:
        if node["id"] == 101:  # the high-noise LoRA: bypassed, its model input passes through
            node["mode"] = 4
        if node["id"] == 102:  # the low-noise LoRA: muted, the link from it is dropped
            node["mode"] = 2
    prompt = to_api_prompt(data, object_info, str(path))
    assert "101" not in prompt and "102" not in prompt
    assert prompt["104"]["inputs"]["model"] == ["95", 0]
    assert "model" not in prompt["103"]["inputs"]


def test_conversion_errors_name_the_node(object_info):
    data = {"nodes": [{"id": 7, "type": "NoSuchNodeAnywhere", "mode": 0, "inputs": [], "widgets_values": []}],
            "links": []}
    with pytest.raises(WorkflowError, match=r"w\.json: node #7 \(NoSuchNodeAnywhere\): the server has no node"):
        to_api_prompt(data, object_info, "w.json")


# ---------------------------------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def workflow(object_info, tmp_path_factory) -> Path:
    """The flat template as the server runs it on the tiny files: its prompts from the test conditioning node (no
    XXL encoder), 32x32, 5 frames as it is."""
    path = template("comfyui_workflow_templates")
    prompt = to_api_prompt(json.loads(path.read_text()), object_info, str(path))
    for seed, nid in enumerate(("93", "89")):
        prompt[nid] = {"class_type": "WanBenchTestConditioning", "inputs": {"seed": seed, "tokens": 8}}
    del prompt["84"]
    prompt["97"]["inputs"]["image"] = INPUT_IMAGE  # the template's model file names: comfy_files wrote them
    prompt["98"]["inputs"].update(width=32, height=32, length=5)
    out = Path(tmp_path_factory.mktemp("workflow")) / "wan-tiny-api.json"
    out.write_text(json.dumps(prompt))
    return out


def test_rounds_time_every_stage_from_the_server_events(client, workflow):
    session = ServerSession(client)
    case = comfy_cases(str(workflow))[0]
    steps = []
    run = ComfyCaseRun(session, case, "warm", on_progress=lambda node, value, total: steps.append((node, value)))
    run.warm_up(1)
    run.generate_once()
    run.generate_once()
    run.finish()
    assert [n for n, _ in steps].count("86") == 3 * 2 and [n for n, _ in steps].count("85") == 3 * 2
    first, second = run.rounds
    assert second.cached and "95" in second.cached  # warm: the loaders stay cached, the samplers run again
    assert "86" not in second.cached and "86" in second.node_seconds
    stages = run.stage_medians
    assert list(stages) == ["text_encode", "image_encode", "pass1", "pass2", "decode", "other", "save"]
    assert stages["text_encode"] == stages["image_encode"] == 0.0  # cached in warm rounds, as for a user
    assert stages["pass1"] > 0 and stages["pass2"] > 0 and stages["decode"] > 0
    assert run.stage_seconds(first)["pass1"] > 0 and "load" not in stages
    assert sum(second.node_seconds.values()) <= second.total_seconds + 1e-6
    info = run.extra_info(metrics=None, video=None, mode="tiny")
    assert info["backend"] == "comfyui" and info["sampler_steps"] == 4
    assert info["server"]["version"] == "0.3.64" and "--cpu" in info["server"]["launch_flags"]
    rss = info["server_memory"]["rss_bytes"]
    assert len(rss) == 3 and all(isinstance(v, int) and v > 0 for v in rss)  # local: psutil sees the process
    clip = run.fetch_clip(workflow.parent)
    assert clip is not None and clip.stat().st_size > 0


def test_cold_rounds_free_the_server_first(client, workflow):
    run = ComfyCaseRun(ServerSession(client), comfy_cases(str(workflow))[0], "cold")
    run.generate_once()
    run.generate_once()
    assert [len(r.cached) for r in run.rounds] == [0, 0]  # /free dropped the cache: every node ran again
    assert all(r.node_seconds.get("95", 0) > 0 for r in run.rounds)


def test_variants_edit_the_graph(workflow):
    prompt = json.loads(workflow.read_text())
    cases = {c.name: c for c in comfy_cases(str(workflow))}
    assert {n.split("-")[-1] for n in cases} >= {"49f", "81f", "161f", "cfg3.5", "cfg7.0"}
    v = prompt_variant(prompt, length=cases[next(n for n in cases if n.endswith("-49f"))].length, cfg=7.0, seed=9)
    assert v["98"]["inputs"]["length"] == 49 and v["86"]["inputs"]["cfg"] == v["85"]["inputs"]["cfg"] == 7.0
    assert v["86"]["inputs"]["noise_seed"] == 9 and v["85"]["inputs"]["noise_seed"] == prompt["85"]["inputs"]["noise_seed"]
    assert prompt["98"]["inputs"]["length"] == 5  # the original is untouched


# ---------------------------------------------------------------------------------------------------- bad input


def test_unreachable_and_not_comfyui(tmp_path):
    with pytest.raises(ComfyServerError, match="unreachable"):
        ComfyClient(f"http://127.0.0.1:{free_port()}").system_stats()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(ComfyServerError, match="is this a ComfyUI server"):
            ComfyClient(f"http://127.0.0.1:{httpd.server_address[1]}").system_stats()
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_rejected_failing_and_hung_prompts_name_the_node(client, workflow):
    bad = json.loads(workflow.read_text())
    del bad["86"]["inputs"]["model"]
    with pytest.raises(ComfyServerError, match=r"node #86 \(KSamplerAdvanced\): Required input is missing"):
        client.run(bad)
    with pytest.raises(ComfyServerError, match=r"node #1 \(WanBenchTestFail\) failed: RuntimeError: on purpose"):
        client.run({"1": {"class_type": "WanBenchTestFail", "inputs": {"message": "on purpose"}}})
    impatient = ComfyClient(client.url, timeout=1.0)
    with pytest.raises(ComfyServerError, match=r"sent nothing for 1 s .*interrupted it"):
        impatient.run({"1": {"class_type": "WanBenchTestSleep", "inputs": {"seconds": 30.0}}})
    done = client.run({"1": {"class_type": "WanBenchTestSleep", "inputs": {"seconds": 0.1}}})  # the server goes on
    assert "1" in done.node_seconds


def test_a_server_that_dies_mid_round(started, tmp_path_factory):
    second, _ = start_server(tmp_path_factory, flags=("--use-pytorch-cross-attention",), base=started[1])
    try:
        fingerprint = ServerSession(ComfyClient(second.url)).fingerprint()
        assert "--use-pytorch-cross-attention" in fingerprint["launch_flags"]
        with pytest.raises(ComfyServerError, match=r"closed the connection while running prompt .*did it die"):
            ComfyClient(second.url).run({"1": {"class_type": "WanBenchTestExit", "inputs": {"code": 3}}})
        assert second.process.wait(timeout=30) == 3
    finally:
        second.stop()


def test_launch_flags_keep_what_changes_the_run():
    argv = ["main.py", "--cpu", "--listen", "0.0.0.0", "--port", "8188", "--use-sage-attention", "--fast",
            "fp16_accumulation", "--base-directory", "/x", "--disable-auto-launch"]
    assert launch_flags(argv) == ["--cpu", "--use-sage-attention", "--fast fp16_accumulation"]


# ---------------------------------------------------------------------------------------------------- suite, CLI


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAN_")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                                 os.environ.get("PYTHONPATH")])))
    return env


def test_suite_runs_the_matrix_on_the_server_and_compare_names_server_changes(server, workflow, tmp_path):
    name = comfy_cases(str(workflow))[0].name
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests/benchmarks/test_generation.py"),
         "--wan-comfyui", server.url, "--wan-workflow", str(workflow), "--wan-mode", "tiny", "--wan-warmup", "0",
         "--benchmark-min-rounds", "2", "--wan-out", str(tmp_path / "out"), "--benchmark-json", str(out),
         "-k", f"{name}-comfyui or cfg3.5", "--benchmark-storage", str(tmp_path / "storage")],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    data = json.loads(out.read_text())
    names = sorted(b["name"] for b in data["benchmarks"])
    assert names == sorted([f"test_generation[{name}-comfyui]", f"test_generation[{name}-cfg3.5-comfyui]"])
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        assert info["backend"] == "comfyui" and set(info["stages"]) >= {"pass1", "pass2", "decode"}
        assert len(bench["stats"]["data"]) == 2 and info["video"] and info["metrics"]["frames"] == 5
    cfg = next(b for b in data["benchmarks"] if "cfg3.5" in b["name"])
    assert cfg["extra_info"]["cfg"] == 3.5
    machine = data["machine_info"]["comfyui"]
    assert machine["version"] == "0.3.64" and "wan-bench-test-nodes" in machine["custom_nodes"]

    later = copy.deepcopy(data)
    later["machine_info"]["comfyui"].update(version="0.3.66",
                                            launch_flags=machine["launch_flags"] + ["--use-sage-attention"],
                                            custom_nodes=machine["custom_nodes"] + ["ComfyUI-KJNodes"])
    (tmp_path / "later.json").write_text(json.dumps(later))
    cmp = subprocess.run([sys.executable, "-m", "wan_pipeline", "compare", str(out), str(tmp_path / "later.json")],
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert "ComfyUI 0.3.64 -> 0.3.66" in cmp.stdout, cmp.stdout + cmp.stderr
    assert "--use-sage-attention added" in cmp.stdout and "ComfyUI-KJNodes appeared" in cmp.stdout


def test_an_unreachable_server_fails_each_case_and_the_session_goes_on(workflow, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests/benchmarks/test_generation.py"),
         "--wan-comfyui", f"http://127.0.0.1:{free_port()}", "--wan-workflow", str(workflow), "--wan-mode", "tiny",
         "--benchmark-min-rounds", "1", "--wan-out", str(tmp_path / "out"), "-k", "cfg"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout[-3000:]
    assert run.stdout.count("is unreachable") >= 2 and "2 failed" in run.stdout


def test_cli_runs_one_generation_on_the_server(server, workflow, tmp_path):
    run = subprocess.run([sys.executable, "-m", "wan_pipeline", "run", "--comfyui", server.url, "--workflow",
                          str(workflow), "--out", str(tmp_path)], env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pass1" in run.stdout and "(ComfyUI 0.3.64)" in run.stdout
    record = json.loads(next(tmp_path.glob("*-comfyui.json")).read_text())
    assert record["backend"] == "comfyui" and record["round_seconds"]
    bad = subprocess.run([sys.executable, "-m", "wan_pipeline", "run", "--comfyui", f"http://127.0.0.1:{free_port()}",
                          "--workflow", str(workflow)], env=_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unreachable" in bad.stderr and "Traceback" not in bad.stderr


def test_crosscheck_runs_the_workflow_on_both_sides_and_the_latents_agree(started, object_info, tmp_path):
    """The template as it is (CLIPLoader and CLIPTextEncode kept, on the tiny umt5 file, whose conditioning the
    server's stand-in loader returns as wan-bench computes it) on the server and in wan-bench's real mode over the same
    models folder: the final latents agree to float32 rounding (the server runs --cpu --force-fp32, wan-bench's CPU
    runs compute in float32), so the sampling, the image encode, the LoRA merge and the fp8 files match."""
    server, base = started
    path = template("comfyui_workflow_templates")
    prompt = to_api_prompt(json.loads(path.read_text()), object_info, str(path))
    prompt["84"]["inputs"]["clip_name"] = TINY_TEXT_ENCODER
    prompt["97"]["inputs"]["image"] = INPUT_IMAGE
    prompt["98"]["inputs"].update(width=32, height=32, length=5)
    precompute_conditioning(base / "models", [prompt[n]["inputs"]["text"] for n in ("93", "89")])
    workflow = tmp_path / "wan-tiny-text-api.json"
    workflow.write_text(json.dumps(prompt))
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "wan_pipeline", "crosscheck", "--comfyui", server.url, "--workflow",
                          str(workflow), "--models", str(base / "models"), "--seed", "7", "--out", str(out)],
                         env=dict(_env(), WAN_INPUT_DIR=str(base / "input")), capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    record = json.loads(next(out.glob("crosscheck-*.json")).read_text())
    assert record["seed"] == 7 and record["comfyui"]["version"] == "0.3.64"
    assert record["latent"]["shape"][-3:] == [2, 4, 4]  # 5 frames, 32x32: [.., 16, 2, 4, 4]
    assert record["latent"]["cosine"] > 0.9999, record["latent"]
    assert record["latent"]["relative_l2"] < 1e-2, record["latent"]
    for side in ("comfyui", "wan_bench"):
        assert record[side]["stages"]["pass1"] > 0 and record[side]["stages"]["pass2"] > 0
        assert Path(record[side]["latent_file"]).stat().st_size > 0
    assert record["comfyui"]["stages"].get("text_encode", 0.0) == 0.0  # the unchanged prompt: cached by the warm-up
    assert record["ratio_comfyui_over_wan_bench"] > 0 and "pass1" in record["common_stages"]
    assert "cosine" in run.stdout and "ComfyUI / wan-bench" in run.stdout

    # the measure discriminates: the server's warm-up latent (seed 8, saved first) is far from wan-bench's seed 7
    from safetensors.numpy import load_file

    from wan_pipeline.measure.agreement import latent_agreement

    saved = sorted((base / "output" / "wan-bench").glob("final_*_.latent"))
    warmup = load_file(saved[-2])["latent_tensor"]
    ours = load_file(record["wan_bench"]["latent_file"])["latent_tensor"]
    assert latent_agreement(warmup, ours)["cosine"] < 0.99

    # bad input: one line naming what is wrong, no traceback, nothing loaded
    for extra, message in ((["--comfyui", f"http://127.0.0.1:{free_port()}", "--models", str(base / "models")],
                            "is unreachable"),
                           (["--comfyui", server.url], "--models DIR"),
                           (["--comfyui", server.url, "--models", str(base / "models"), "--attention", "nope"],
                            "invalid choice: 'nope'")):
        bad = subprocess.run([sys.executable, "-m", "wan_pipeline", "crosscheck", "--workflow", str(workflow), *extra],
                             env={k: v for k, v in _env().items() if k != "WAN_MODELS_DIR"}, capture_output=True,
                             text=True, timeout=300)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]

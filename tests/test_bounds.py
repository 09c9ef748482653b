"""Inputs bounded as ComfyUI bounds them, where they enter (workflow import, the command line, the suite's options),
option files checked at start-up, and auto mode never falling back from a models folder it was given."""

import copy
import json
import shutil
from pathlib import Path

import pytest
from inner_sessions import cpu_only, plugin_args

from wan_pipeline.cli.main import main
from wan_pipeline.errors import WorkflowError
from wan_pipeline.plan.comfy import load_workflow_configs
from wan_pipeline.plan.config import MAX_RESOLUTION, MAX_SEED, ConfigError
from wan_pipeline.plan.plan import make_plan
from wan_pipeline.plan.presets import get_preset

pytest_plugins = ["pytester"]

WORKFLOW = Path(__file__).parent.parent / "fixtures" / "workflows" / "users_variant.json"
BENCHMARK_TEST = Path(__file__).parent / "benchmarks" / "test_generation.py"
PLAIN = ["-p", "no:cacheprovider", *plugin_args()]


def _edited_workflow(tmp_path, node_id, index, value):
    data = json.loads(WORKFLOW.read_text())
    data = copy.deepcopy(data)
    data["nodes"] = [n for n in data["nodes"] if n["id"] < 100]  # the first graph only
    (node,) = [n for n in data["nodes"] if n["id"] == node_id]
    node["widgets_values"][index] = value
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("node_id, index, value, message", [
    (13, 3, 10**12, "steps must be in [1, 10000]"),  # KSamplerAdvanced steps
    (13, 1, 2**64, "seed must be in [0, 18446744073709551615]"),  # noise_seed
    (13, 1, -1, "seed must be in [0, 18446744073709551615]"),
    (13, 7, 3, "start_at_step 3 is after end_at_step 2"),
    (12, 0, 100000, f"width must be in [1, {MAX_RESOLUTION}]"),  # WanImageToVideo
    (13, 4, 1000.0, "cfg must be in [0.0, 100.0]"),
])
def test_workflow_values_comfyui_refuses_are_refused_at_import(tmp_path, node_id, index, value, message):
    path = _edited_workflow(tmp_path, node_id, index, value)
    with pytest.raises(WorkflowError, match="edited.json") as info:
        load_workflow_configs(path)
    assert message in str(info.value)


def test_config_bounds_are_comfyuis():
    base = get_preset("seed-832x1216-49f")
    make_plan(base.replace(seed=MAX_SEED), "tiny")  # the largest seed ComfyUI takes is fine
    for change, message in (({"seed": MAX_SEED + 1}, "seed must be in"), ({"seed": -1}, "seed must be in"),
                            ({"width": 100000, "height": 100000}, "width must be in [1, 16384]"),
                            ({"length": 20000}, "length must be in [1, 16384]"),
                            ({"vae_bands": 100}, "vae_bands 100 leaves bands under 64 rows")):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            make_plan(base.replace(**change), "tiny")


@pytest.mark.parametrize("argv, message", [
    (["plan", "--seed", str(2**64)], "argument --seed: seed must be in [0, 18446744073709551615]"),
    (["plan", "--seed", "-1"], "argument --seed: seed must be in [0, 18446744073709551615]"),
    (["run", "--seed", "1e3"], "argument --seed: must be an integer, got '1e3'"),
    (["run", "--vae-bands", "1000"], "argument --vae-bands: vae bands must be in [1, 256]"),
])
def test_cli_bounds_are_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_vae_bands_too_many_for_the_frame_is_one_line_before_any_model(capsys):
    assert main(["run", "--mode", "tiny", "--vae-bands", "100"]) == 2
    err = capsys.readouterr().err
    assert "wan-bench run: error: seed-832x1216-49f: vae_bands 100 leaves bands under 64 rows" in err
    assert "Traceback" not in err


def test_auto_with_an_incomplete_models_folder_is_an_error_naming_the_file(tmp_path, capsys, monkeypatch):
    models = tmp_path / "models"
    for sub in ("diffusion_models", "loras", "text_encoders", "vae"):
        (models / sub).mkdir(parents=True)
    monkeypatch.delenv("WAN_MODELS_DIR", raising=False)
    assert main(["plan", "--models", str(models)]) == 2
    err = capsys.readouterr().err
    assert "is not usable, so auto cannot run real weights" in err
    assert "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors" in err
    monkeypatch.setenv("WAN_MODELS_DIR", str(models))  # the environment variable is the same folder
    assert main(["plan"]) == 2
    assert "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors" in capsys.readouterr().err
    monkeypatch.delenv("WAN_MODELS_DIR")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert main(["plan"]) == 0  # no folder: the mode and its reason head the output
    captured = capsys.readouterr()
    assert "wan-bench: " in captured.err and "models (auto: " in captured.err and "mode " in captured.out


@pytest.fixture
def inner(pytester, monkeypatch):
    cpu_only(monkeypatch)
    shutil.copy(BENCHMARK_TEST, pytester.path / "test_generation.py")
    pytester.makepyfile(test_first="def test_other(benchmark):\n    benchmark(sum, [1])\n")
    return pytester


def _usage_error(result, text):
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()[-2000:]
    err = result.stderr.str()
    assert text in err and "Traceback" not in err and err.count(text) == 1, err
    assert "passed" not in result.stdout.str()  # nothing ran first


def test_option_files_are_checked_at_start_up_as_usage_errors(inner, tmp_path):
    result = inner.runpytest_subprocess(*PLAIN, "--benchmark-only", "--wan-budgets", "/nonexistent.toml")
    _usage_error(result, "--wan-budgets / WAN_BUDGETS: budgets file /nonexistent.toml does not exist")
    broken = Path(__file__).parent.parent / "fixtures" / "workflows" / "broken_not_json.json"
    result = inner.runpytest_subprocess(*PLAIN, "--benchmark-only", "--wan-workflow", str(broken))
    _usage_error(result, "--wan-workflow / WAN_WORKFLOW: ")
    assert "broken_not_json.json" in result.stderr.str()
    result = inner.runpytest_subprocess(*PLAIN, "--benchmark-only", "--wan-models", str(tmp_path))
    _usage_error(result, "--wan-models / WAN_MODELS_DIR: models folder")
    result = inner.runpytest_subprocess(*PLAIN, "--benchmark-only", "--wan-preset", "seed-832x1216-49f",
                                        "--wan-vae-bands", "100")
    _usage_error(result, "vae_bands 100 leaves bands under 64 rows")

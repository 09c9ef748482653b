"""The pytest plugin end to end, in inner pytest sessions: the tiny matrix, the model cache, OOM isolation,
the machine-info hook and per-GPU storage. The inner sessions see no GPU (inner_sessions.cpu_only), so they
show the CPU behaviour on a GPU box too."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from inner_sessions import cpu_only, plugin_args
from pytest_benchmark.utils import get_machine_id

from wan_pipeline.plan.presets import get_preset
from wan_pipeline.run.cache import ModelCache

pytest_plugins = ["pytester"]

BENCHMARK_TEST = Path(__file__).parent / "benchmarks" / "test_generation.py"
PLAIN = ["-p", "no:cacheprovider", *plugin_args()]
TINY = [*PLAIN, "--wan-mode", "tiny", "--benchmark-min-rounds", "2", "--wan-warmup", "0"]
HAS_FFMPEG = importlib.util.find_spec("imageio_ffmpeg") is not None


@pytest.fixture
def plain(pytester, monkeypatch):
    cpu_only(monkeypatch)
    return pytester


@pytest.fixture
def inner(plain):
    shutil.copy(BENCHMARK_TEST, plain.path / "test_generation.py")
    return plain


def test_tiny_benchmark_writes_pytest_benchmark_json_with_extra_info(inner):
    # the default clip is mp4 (imageio-ffmpeg); without that package the clip is webp and mp4 is tested in test_video
    video = [] if HAS_FFMPEG else ["--wan-video", "webp"]
    result = inner.runpytest_subprocess(*TINY, "--wan-preset", "seed-832x1216-49f,seed-832x1216-49f-cfg3.5",
                                        "--benchmark-only", "--benchmark-json", "out.json",
                                        "--wan-out", str(inner.path / "out"), *video)
    result.assert_outcomes(passed=2)
    data = json.loads((inner.path / "out.json").read_text())
    assert data["machine_info"]["gpu"] is None  # CPU: no NVML
    assert data["machine_info"]["wan_env"]["version.torch"]
    ids = [b["name"] for b in data["benchmarks"]]
    assert ids == ["test_generation[seed-832x1216-49f-sdpa-bf16-compile0]",
                   "test_generation[seed-832x1216-49f-cfg3.5-sdpa-bf16-compile0]"]
    info = data["benchmarks"][1]["extra_info"]
    for key in ("mode", "preset", "tokens", "frames", "width", "height", "stages", "peak_memory",
                "attention_kernel", "compile", "gpu", "env", "metrics"):
        assert key in info, key
    assert info["mode"] == "tiny" and info["preset"] == "seed-832x1216-49f-cfg3.5"
    assert set(info["stages"]) == {"text_encode", "image_encode", "pass1", "switch", "pass2", "decode"}
    assert info["forwards"] == 8 and info["gpu"] is None and info["compile"]["enabled"] is False
    assert info["attention_kernel"].startswith("sdpa")
    assert info["peak_memory"]["torch_peak_bytes_by_stage"] == {}  # the CPU has no allocator statistics
    assert 0.0 <= info["metrics"]["flicker_score"] <= 1.0
    assert data["benchmarks"][1]["stats"]["rounds"] == 2
    clip = "mp4" if HAS_FFMPEG else "webp"
    assert (inner.path / "out" / f"seed-832x1216-49f-sdpa-bf16-compile0.{clip}").stat().st_size > 0
    assert info["video"].endswith(f"seed-832x1216-49f-cfg3.5-sdpa-bf16-compile0.{clip}")
    result.stdout.fnmatch_lines(["*quality thresholds not checked: tiny weights are random*",
                                 "*no budget for this card and preset, none checked*"])


def test_model_set_loads_once_for_cases_that_share_it():
    loads = []

    def loader(key, **kwargs):
        from wan_pipeline.run.models import load_model_set

        loads.append(key)
        return load_model_set(key, **kwargs)

    cache = ModelCache(loader=loader)
    cfg = get_preset("seed-832x1216-49f")
    cache.prepare(cfg, "tiny")
    cache.prepare(get_preset("seed-832x1216-49f-cfg7.0"), "tiny")  # same weights, other CFG
    cache.prepare(cfg.replace(attention="sdpa-math"), "tiny")  # attention is re-installed, not reloaded
    assert len(loads) == 1
    cache.prepare(get_preset("template-640x640-81f-20step"), "tiny")  # no LoRA: other weights
    assert len(loads) == 2 and len(cache.loads) == 2


def test_warm_up_runs_once_per_shape_kernel_and_vae_split():
    cache = ModelCache()
    cfg = get_preset("seed-832x1216-49f")
    assert cache.warm_up_needed(*cache.prepare(cfg, "tiny"))
    assert not cache.warm_up_needed(*cache.prepare(get_preset("seed-832x1216-49f-cfg3.5"), "tiny"))  # same shapes
    assert cache.warm_up_needed(*cache.prepare(cfg.replace(vae_bands=2), "tiny"))  # the VAE sees new shapes
    assert cache.warm_up_needed(*cache.prepare(get_preset("seed-832x1216-81f"), "tiny"))
    plan, prepared = cache.prepare(get_preset("seed-832x1216-81f"), "tiny")
    prepared.residency.policy = "offload-text-encoder"  # what a GPU too small for everything would choose
    assert cache.warm_up_needed(plan, prepared)


def test_matrix_is_ordered_to_minimise_reloads(inner):
    result = inner.runpytest_subprocess(*TINY, "--collect-only", "-q", "--wan-preset",
                                        "seed-832x1216-49f,template-640x640-81f-20step,seed-832x1216-81f")
    lines = [l for l in result.stdout.lines if "test_generation[" in l]
    assert [l.split("[")[1].split("-sdpa")[0] for l in lines] == [
        "seed-832x1216-49f", "seed-832x1216-81f", "template-640x640-81f-20step"]


def test_out_of_memory_fails_one_case_clearly_and_the_session_goes_on(inner):
    inner.makeconftest("""
import torch
import wan_pipeline.run.case as case

real = case.generate
def generate(prepared, plan, progress=False):
    if plan.config.name.endswith("cfg7.0"):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    return real(prepared, plan, progress)
case.generate = generate
""")
    result = inner.runpytest_subprocess(*TINY, "--benchmark-only", "--wan-video", "webp", "--wan-preset",
                                        "seed-832x1216-49f-cfg7.0,seed-832x1216-49f")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*seed-832x1216-49f-cfg7.0-sdpa-bf16-compile0: out of GPU memory at * tokens*"
                                 "Tried to allocate 20.00 GiB*evicted; the session goes on*"])
    assert "Traceback" not in result.stdout.str()


def test_machine_info_hook_applies_to_any_benchmark(plain):
    plain.makepyfile("def test_plain(benchmark):\n    benchmark(sum, [1, 2, 3])\n")
    result = plain.runpytest_subprocess(*PLAIN, "--benchmark-json", "plain.json")
    result.assert_outcomes(passed=1)
    info = json.loads((plain.path / "plain.json").read_text())["machine_info"]
    assert "gpu" in info and info["gpu"] is None  # no GPU visible to the session
    assert info["wan_env"]["version.torch"] and "env.TORCH_COMPILE" in info["wan_env"]


def test_autosave_goes_to_a_folder_per_gpu_model(plain):
    plain.makepyfile("def test_plain(benchmark):\n    benchmark(sum, [1, 2, 3])\n")
    result = plain.runpytest_subprocess(*PLAIN, "--benchmark-autosave", "--benchmark-storage",
                                        str(plain.path / "store"))
    result.assert_outcomes(passed=1)
    # <storage>/<gpu slug>/<pytest-benchmark's machine id>/NNNN_*.json: --benchmark-compare loads from the same folder
    saved = list((plain.path / "store").rglob("*.json"))
    assert len(saved) == 1 and saved[0].parent.parent == plain.path / "store" / "cpu"
    assert saved[0].parent.name == get_machine_id() and saved[0].name.startswith("0001_")
    assert "data" in json.loads(saved[0].read_text())["benchmarks"][0]["stats"]  # rounds kept for compare


def test_bad_option_values_are_usage_errors(inner, monkeypatch):
    result = inner.runpytest_subprocess(*TINY, "--wan-preset", "no-such-preset", "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*error: argument --wan-preset: unknown preset 'no-such-preset'*"])
    result = inner.runpytest_subprocess(*TINY, "--wan-attention", "xformers", "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "error: argument --wan-attention: unknown value(s) ['xformers']" in result.stderr.str()
    result = inner.runpytest_subprocess(*TINY, "--wan-residency", "swap", "--collect-only")
    assert "error: argument --wan-residency: unknown value 'swap'; choose from ('auto', 'resident'" \
        in result.stderr.str()
    result = inner.runpytest_subprocess(*TINY, "--wan-video", "gif", "--collect-only")
    assert "error: argument --wan-video: unknown value 'gif'; choose from ('auto', 'mp4', 'webp', 'none')" \
        in result.stderr.str()
    # an environment variable is the option's default: a bad value is the same usage error, before anything runs
    monkeypatch.setenv("WAN_VAE_BANDS", "0")
    result = inner.runpytest_subprocess(*TINY, "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "error: argument --wan-vae-bands: vae bands must be in [1, 256]" in result.stderr.str()
    assert "Traceback" not in result.stderr.str()


def test_rounds_are_pytest_benchmarks_min_rounds_and_wan_rounds_sets_them(plain, monkeypatch):
    plain.makepyfile("def test_x(wan_options, pytestconfig):\n"
                        "    print('ROUNDS', wan_options.rounds, pytestconfig.getoption('benchmark_min_rounds'))\n")
    monkeypatch.delenv("WAN_ROUNDS", raising=False)
    plain.runpytest_subprocess(*PLAIN, "-s").stdout.fnmatch_lines(["*ROUNDS 5 5"])
    monkeypatch.setenv("WAN_ROUNDS", "3")
    plain.runpytest_subprocess(*PLAIN, "-s").stdout.fnmatch_lines(["*ROUNDS 3 3"])
    result = plain.runpytest_subprocess(*PLAIN, "-s", "--benchmark-min-rounds", "4")
    result.stdout.fnmatch_lines(["*ROUNDS 4 4"])  # the command line wins over the environment
    monkeypatch.setenv("WAN_ROUNDS", "many")
    result = plain.runpytest_subprocess(*PLAIN)
    assert result.ret == pytest.ExitCode.USAGE_ERROR and "--benchmark-min-rounds" in result.stderr.str()


def test_two_autosaves_in_one_folder_get_their_own_numbers(plain):
    plain.makepyfile("def test_plain(benchmark):\n    benchmark(sum, [1, 2, 3])\n")
    store = plain.path / "store"
    for _ in range(2):
        plain.runpytest_subprocess(*PLAIN, "--benchmark-autosave",
                                   "--benchmark-storage", str(store)).assert_outcomes(passed=1)
    # --benchmark-compare loads from the same per-GPU folder, through pytest-benchmark's own loading
    result = plain.runpytest_subprocess(*PLAIN, "--benchmark-compare", "--benchmark-storage", str(store))
    result.assert_outcomes(passed=1)
    text = result.stdout.str() + result.stderr.str()
    assert "Comparing against benchmarks from: " + f"{get_machine_id()}/0002_" in text, text
    names = sorted(p.name[:5] for p in store.glob("cpu/*/*.json"))
    assert names == ["0001_", "0002_"]
    assert not list(store.rglob(".*.tmp"))


def test_workflow_option_benchmarks_the_workflow_and_its_variants(inner):
    workflow = Path(__file__).parent.parent / "fixtures" / "workflows" / "users_variant.json"
    result = inner.runpytest_subprocess(*TINY, "--collect-only", "-q", "--wan-workflow", str(workflow))
    ids = [l.split("[", 1)[1].rstrip("]") for l in result.stdout.lines if "test_generation[" in l]
    assert ids[0].startswith("wf-users_variant-sdpa-bf16")
    assert any("-81f-" in i for i in ids) and any("-161f-" in i for i in ids)
    assert any("-cfg3.5-" in i for i in ids) and any("-cfg7.0-" in i for i in ids)


def test_synthetic_runs_write_no_clip_and_no_metrics_unless_asked():
    from wan_pipeline.suite.options import clip_format, quality_metrics_wanted

    assert clip_format("auto", "synthetic") is None  # full-size noise: seconds of encoding, nothing to see
    from wan_pipeline.measure.media import mp4_writable

    clip = "mp4" if mp4_writable() else "webp"  # webp where imageio-ffmpeg is missing
    assert clip_format("auto", "real") == clip and clip_format("auto", "tiny") == clip
    assert clip_format("webp", "synthetic") == "webp" and clip_format("none", "real") is None
    assert not quality_metrics_wanted("synthetic")
    assert quality_metrics_wanted("real") and quality_metrics_wanted("tiny")


def test_generations_are_linked_to_their_stock_reference_by_key_not_by_name():
    from types import SimpleNamespace

    from wan_pipeline.suite.cases import References, add_stock_speedups, build_cases, stock_cases
    from wan_pipeline.suite.options import WanOptions

    options = WanOptions(mode="tiny", models_dir=None, presets=("seed-832x1216-49f", "template-640x640-81f-20step"),
                         budgets=None, out=Path("out"), attention=("sdpa",), precision=("bf16", "fp16"),
                         compile=(False,), rounds=5, warmup=1, workflow=None)
    cases = build_cases(options)
    stock = stock_cases(cases)
    assert sorted(c.reference for c in stock) == sorted({c.reference for c in cases})  # one reference per key
    assert all(c.reference for c in cases)

    def item(test, param, case, **marker):
        return SimpleNamespace(nodeid=f"t.py::{test}[{case.id}]", callspec=SimpleNamespace(params={param: case}),
                               get_closest_marker=lambda name: SimpleNamespace(kwargs=marker))

    seed = [c for c in cases if c.config.name == "seed-832x1216-49f"]
    seed_stock = [c for c in stock if c.reference == seed[0].reference][0]
    refs = References()
    items = [item("test_generation", "wan_case", c, measured_against_reference=True) for c in seed]
    items += [item("renamed_forward_test", "wan_case", seed[0]),  # measured, but not against the stock pipeline
              item("any_name_at_all", "wan_stock_case", seed_stock, reference=True)]
    for it in items:
        refs.add(it)

    def bench(it, median):
        return {"name": it.nodeid.split("::")[1], "fullname": it.nodeid, "stats": {"median": median},
                "extra_info": {}}

    benchmarks = [bench(items[0], 2.0), bench(items[1], 4.0), bench(items[2], 1.0), bench(items[3], 8.0)]
    lines = add_stock_speedups(benchmarks, refs)
    assert benchmarks[0]["extra_info"] == {"stock_diffusers_seconds": 8.0, "speedup_vs_stock_diffusers": 4.0}
    assert benchmarks[1]["extra_info"] == {"stock_diffusers_seconds": 8.0, "speedup_vs_stock_diffusers": 2.0}
    assert benchmarks[2]["extra_info"] == {} and benchmarks[3]["extra_info"] == {}
    assert lines[0] == "test_generation[seed-832x1216-49f-sdpa-bf16-compile0]: 4.0x the stock diffusers pipeline (8.00 s)"
    assert add_stock_speedups(benchmarks[:2], refs) == []  # no reference ran: nothing added


def test_auto_is_tiny_in_a_test_run_and_every_session_says_what_it_chose(inner):
    """The README's test command must stay a test run on a GPU box: without --benchmark-only, auto means tiny."""
    result = inner.runpytest_subprocess(*PLAIN, "--collect-only")
    result.stdout.fnmatch_lines(["wan-bench: tiny models (auto in a test run; --benchmark-only times synthetic or "
                                 "real models)", "*test_generation[[]seed-832x1216-49f-sdpa-bf16-compile0[]]*"])
    result = inner.runpytest_subprocess(*PLAIN, "--collect-only", "--benchmark-only")
    result.stdout.fnmatch_lines(["wan-bench: tiny models (auto: no GPU is visible and no models folder "
                                 "(--wan-models / WAN_MODELS_DIR))"])
    result = inner.runpytest_subprocess(*PLAIN, "--collect-only", "--wan-mode", "tiny")
    result.stdout.fnmatch_lines(["wan-bench: tiny models (--wan-mode / WAN_MODE)"])


def test_a_benchmark_run_with_a_gpu_and_no_models_is_synthetic_and_says_why(monkeypatch, tmp_path):
    import dataclasses

    import wan_pipeline.run.model_files as model_files
    from wan_pipeline.suite.cases import mode_and_reason
    from wan_pipeline.suite.options import WanOptions

    import wan_pipeline.measure.telemetry as telemetry

    monkeypatch.setattr(telemetry, "cuda_available", lambda: True)
    options = WanOptions(mode="auto", models_dir=None, presets=(), budgets=None, out=Path("out"),
                         attention=("sdpa",), precision=("auto",), compile=(False,), rounds=5, warmup=1,
                         workflow=None, benchmark_only=True)
    assert mode_and_reason(options) == ("synthetic", "auto: a GPU is visible and no models folder "
                                                     "(--wan-models / WAN_MODELS_DIR)")
    folder = dataclasses.replace(options, models_dir=str(tmp_path))
    with pytest.raises(model_files.LoadingError, match="is not usable, so auto cannot run real weights"):
        mode_and_reason(folder)  # a models folder given: never a quiet fall-back to random weights
    assert mode_and_reason(dataclasses.replace(options, benchmark_only=False))[0] == "tiny"  # a test run

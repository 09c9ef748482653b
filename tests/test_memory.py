"""The memory cap: sizes, what each residency policy needs, the choice under a cap, host-memory builds and loads,
streamed experts, and the cap's bookkeeping (options, history folders, compare, report)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from inner_sessions import cpu_only, plugin_args
from wan_pipeline.plan.config import ModelSetKey, PassConfig
from wan_pipeline.plan.memory import (GB, GiB, MemoryCapError, a14b_component_bytes, cap_label, choose_memory,
                                      format_bytes, needs_for, parse_memory_size, plan_memory, policy_needs,
                                      stage_needs, working_memory)
from wan_pipeline.plan.plan import make_plan
from wan_pipeline.plan.presets import get_preset

pytest_plugins = ["pytester"]

# ---------------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("text, expected", [("24GB", 24 * 10**9), ("16GiB", 16 * 2**30), ("16gib", 16 * 2**30),
                                            ("1.5 GB", 1_500_000_000), (" 512MiB ", 512 * 2**20), ("80GB", 80 * GB)])
def test_memory_sizes_read_decimal_and_binary_units(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["24", "GB", "24XB", "-3GB", "0GB", "24 G B", ""])
def test_an_unreadable_memory_size_names_the_value_and_the_units(text):
    with pytest.raises(MemoryCapError, match=r"24GB \(10\^9 bytes\) or 16GiB \(2\^30 bytes\)|more than 0"):
        parse_memory_size(text)


def test_cap_labels_are_exact_and_short():
    assert (cap_label(24 * GB), cap_label(16 * GiB), cap_label(None)) == ("24gb", "16gib", "")
    assert cap_label(123) == "123b"
    assert format_bytes(24 * GB) == "24.00 GB (22.35 GiB)"


def test_a14b_element_counts_match_the_diffusers_and_transformers_classes():
    """The planner's constants are the classes' own: built on the meta device (no memory), counted."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from wan_pipeline.plan import memory
    from wan_pipeline.run.models import A14B_TRANSFORMER, UMT5_XXL

    with init_empty_weights():
        expert = WanTransformer3DModel(**A14B_TRANSFORMER)
        vae = AutoencoderKLWan()
        encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL))

    def count(m):
        return sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())

    def linear(m, keep):
        return sum(x.weight.numel() for n, x in m.named_modules() if isinstance(x, torch.nn.Linear) and keep(n))

    fp32 = expert._keep_in_fp32_modules
    assert count(expert) == memory.A14B_EXPERT_ELEMENTS
    assert linear(expert, lambda n: n.startswith("blocks.")) == memory.A14B_EXPERT_FP8_ELEMENTS
    assert sum(p.numel() for n, p in expert.named_parameters()
               if any(k in n.split(".") for k in fp32)) == memory.A14B_EXPERT_FP32_ELEMENTS
    assert len(expert.blocks) == memory.A14B_BLOCKS and count(expert.blocks[0]) == memory.A14B_BLOCK_ELEMENTS
    assert linear(expert.blocks[0], lambda n: True) == memory.A14B_BLOCK_FP8_ELEMENTS
    assert sum(p.numel() for n, p in expert.blocks[0].named_parameters()
               if any(k in n.split(".") for k in fp32)) == memory.A14B_BLOCK_FP32_ELEMENTS
    assert count(encoder) == memory.UMT5_XXL_ELEMENTS
    assert linear(encoder, lambda n: ".block." in f".{n}" and not n.endswith(".wo")) == memory.UMT5_XXL_FP8_ELEMENTS
    assert count(vae) == memory.WAN21_VAE_ELEMENTS


# ---------------------------------------------------------------------------------------------------- policies


def _plan(preset, cap=None, **changes):
    return make_plan(get_preset(preset).replace(precision="fp8-scaled-mm-fast", memory_cap=cap, **changes),
                     "synthetic")


def test_what_each_policy_needs_for_a14b_fp8_at_832x1216():
    """Hand-checkable: an fp8 expert 14.59 GB, the fp8 encoder 9.84 GB, the VAE 0.25 GB; at 49 frames (51376
    tokens) a forward's working memory 6.31 GB and the whole-frame VAE's 12.88 GB, each with the 3.22 GB margin."""
    sizes = a14b_component_bytes(fp8=True)
    assert round(sizes.experts[0] / GB, 2) == 14.59 and round(sizes.text_encoder / GB, 2) == 9.84
    assert round(sizes.vae / GB, 2) == 0.25 and round(sizes.expert_block / GB, 3) == 0.352
    gb = {}
    for frames, preset in ((49, "seed-832x1216-49f"), (81, "seed-832x1216-81f")):
        plan = _plan(preset)
        gb[frames] = {k: round(v / GB, 2) for k, v in
                      policy_needs(sizes, working_memory(plan.tokens, plan.width, plan.height)).items()}
    assert gb[49] == {"resident": 55.37, "offload-text-encoder": 45.53, "offload-idle-expert": 30.95,
                      "stream-expert": 16.36}
    assert gb[81]["stream-expert"] == 16.36  # the whole-frame VAE still peaks; the 81-frame forward needs 13.41 GB
    stages = stage_needs(sizes, working_memory(82992, 832, 1216, vae_bands=2))["stream-expert"]
    assert {k: round(v / GB, 2) for k, v in stages.items()} == {"load": 14.79, "text_encode": 13.31, "vae": 9.92,
                                                                 "pass": 14.9}
    # the load stage: the text encoder at 16 bits (before its fp8 storage) beside the VAE, plus a GiB of slack
    assert stages["load"] == sizes.text_encoder_load + sizes.vae + GiB and sizes.text_encoder_load == 6_731_059_200 * 2


def test_the_measured_sizes_keep_the_load_stage_of_an_encoder_already_stored_as_fp8():
    """A loaded model set's sizes come from its tensors; its text encoder, in fp8 by then, was built or loaded at 16
    bits, and the smallest cap a run records must include that load (it once read the post-load figure only)."""
    from wan_pipeline.run.memory import component_bytes
    from wan_pipeline.run.models import TINY_TRANSFORMER, TINY_UMT5, random_text_encoder, random_transformer

    cpu = torch.device("cpu")
    encoder = random_text_encoder(TINY_UMT5, cpu, torch.bfloat16, seed=1)
    elements = sum(p.numel() for p in encoder.parameters())
    expert = random_transformer(TINY_TRANSFORMER, cpu, torch.bfloat16, seed=2)
    vae = torch.nn.Linear(4, 4)
    assert component_bytes({"high": expert}, encoder, vae).text_encoder_load == 2 * elements
    for p in encoder.parameters():  # now stored as fp8: half the bytes, the same 16-bit load
        p.data = p.data.to(torch.float8_e4m3fn)
    sizes = component_bytes({"high": expert}, encoder, vae)
    assert sizes.text_encoder == elements and sizes.text_encoder_load == 2 * elements
    load = stage_needs(sizes, working_memory(30, 48, 80))["stream-expert"]["load"]
    assert load == 2 * elements + sizes.vae + GiB


@pytest.mark.parametrize("preset, cap, policy, bands", [
    ("seed-832x1216-49f", None, "resident", 1),  # an H200, uncapped
    ("seed-832x1216-49f", 24 * GB, "stream-expert", 1),  # one expert + VAE + working memory: 24.37 GB at 4 bands
    ("seed-832x1216-49f", 16 * GB, "stream-expert", 2),  # the whole-frame VAE no longer fits beside its margin
    ("seed-832x1216-81f", 24 * GB, "stream-expert", 1),
    ("seed-832x1216-81f", 16 * GB, "stream-expert", 2),
    ("seed-832x1216-49f", 48 * GB, "offload-text-encoder", 1),
    ("seed-832x1216-49f", 34 * GB, "offload-idle-expert", 1),
    ("seed-832x1216-49f", 26 * GB, "offload-idle-expert", 2),  # bands let the faster swap fit before streaming
])
def test_auto_picks_the_fastest_policy_that_fits_and_the_bands_it_needs(preset, cap, policy, bands):
    choice = plan_memory(_plan(preset, cap), cap or 141 * GB)
    assert (choice.policy, choice.vae_bands) == (policy, bands)
    assert choice.needs[policy] <= (cap or 141 * GB)


def test_uncapped_runs_keep_their_configured_bands():
    plan = _plan("seed-832x1216-49f")  # no cap: the card's memory (a 26 GB card), bands as configured
    assert plan_memory(plan, 26 * GB).policy == "stream-expert" and plan_memory(plan, 26 * GB).vae_bands == 1


def test_a_cap_too_small_for_any_policy_names_the_smallest_cap_the_preset_needs():
    with pytest.raises(MemoryCapError, match=r"seed-832x1216-49f \(832x1216x49\) does not fit 12.00 GB .* any "
                                             r"residency policy: it needs at least 14.79 GB"):
        plan_memory(_plan("seed-832x1216-49f", 12 * GB), 12 * GB)


def test_a_forced_policy_that_does_not_fit_suggests_auto_with_the_smallest_cap():
    plan = _plan("seed-832x1216-49f", 24 * GB, residency="offload-idle-expert")
    with pytest.raises(MemoryCapError, match=r"residency 'offload-idle-expert': it needs at least 30.95 GB .*try "
                                             r"residency auto; the smallest cap it runs in is 14.79 GB"):
        plan_memory(plan, 24 * GB)
    assert plan_memory(_plan("seed-832x1216-49f", residency="offload-idle-expert"), 40 * GB).policy == \
        "offload-idle-expert"


def test_choose_memory_tries_bands_only_when_asked():
    sizes = a14b_component_bytes(fp8=True)
    needs_at = needs_for(sizes, 51376, 832, 1216)
    assert choose_memory(needs_at, 16 * GB, auto_bands=True).vae_bands == 2
    with pytest.raises(MemoryCapError):
        choose_memory(needs_at, 16 * GB, auto_bands=False)


# ---------------------------------------------------------------------------------------------------- CLI


def _cli(*args):
    from wan_pipeline.cli.main import main

    return main(list(args))


def test_plan_with_a_cap_prints_the_policy_and_memory_per_stage(capsys):
    assert _cli("plan", "--mode", "synthetic", "--precision", "fp8-scaled-mm-fast", "--memory-cap", "24GB") == 0
    out = capsys.readouterr().out
    assert "memory cap 24.00 GB (22.35 GiB): fits with residency stream-expert, VAE in 1 band(s)" in out
    assert "per stage: load 14.79 GB" in out and "smallest cap for this preset 14.79 GB" in out


def test_plan_refuses_a_cap_too_small_in_one_line(capsys):
    assert _cli("plan", "--mode", "synthetic", "--memory-cap", "12GB") == 2
    err = capsys.readouterr().err
    assert "needs at least 14.79 GB" in err and "Traceback" not in err


def test_plan_json_carries_the_memory_choice(capsys):
    assert _cli("plan", "--mode", "synthetic", "--memory-cap", "16GiB", "--json") == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    assert memory["policy"] == "stream-expert" and memory["budget_bytes"] == 16 * GiB


# ---------------------------------------------------------------------------------------------------- pytest options


@pytest.fixture
def inner(pytester, monkeypatch):
    cpu_only(monkeypatch)
    shutil.copy(Path(__file__).parent / "benchmarks" / "test_generation.py", pytester.path / "test_generation.py")
    return pytester


PLAIN = ["-p", "no:cacheprovider", *plugin_args()]


def test_an_unparsable_cap_is_a_usage_error(inner):
    result = inner.runpytest_subprocess(*PLAIN, "--wan-mode", "tiny", "--collect-only", "--wan-memory-cap", "lots")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--wan-memory-cap*'lots' is not a number with a unit such as 24GB*"])


def test_a_cap_no_preset_fits_is_a_usage_error_naming_the_smallest_cap(inner):
    result = inner.runpytest_subprocess(*PLAIN, "--wan-mode", "synthetic", "--collect-only", "--wan-memory-cap",
                                        "12GB", "--wan-preset", "seed-832x1216-49f", "--wan-precision",
                                        "fp8-scaled-mm-fast")
    assert result.ret == pytest.ExitCode.INTERRUPTED  # raised at collection, as a bad workflow is
    result.stdout.fnmatch_lines(["*UsageError: --wan-memory-cap: seed-832x1216-49f*does not fit 12.00 GB*needs at "
                                 "least 14.79 GB*"])


def test_presets_that_cannot_fit_even_streamed_are_skipped_with_the_memory_they_need(inner):
    result = inner.runpytest_subprocess(*PLAIN, "--wan-mode", "synthetic", "-rs", "--wan-memory-cap", "24GB",
                                        "--wan-precision", "fp8-scaled-mm-fast", "--wan-preset",
                                        "seed-832x1216-49f,seed-832x1216-161f", "-k", "161f")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*seed-832x1216-161f*does not fit 24.00 GB*needs at least *GB*"])


def test_tiny_runs_record_the_cap_in_extra_info_and_machine_info(inner):
    result = inner.runpytest_subprocess(*PLAIN, "--wan-mode", "tiny", "--benchmark-only", "--benchmark-min-rounds",
                                        "1", "--wan-warmup", "0", "--wan-video", "none", "--wan-memory-cap", "16GiB",
                                        "--wan-preset", "seed-832x1216-49f", "--benchmark-json", "out.json",
                                        "--wan-out", str(inner.path / "out"))
    result.assert_outcomes(passed=1)
    data = json.loads((inner.path / "out.json").read_text())
    assert data["machine_info"]["wan_memory_cap"] == {"cap_bytes": 16 * GiB, "applied": False,
                                                      "why": "no CUDA device is visible: the cap only plans"}
    info = data["benchmarks"][0]["extra_info"]
    assert info["memory_cap_bytes"] == 16 * GiB and info["memory"]["cap_bytes"] == 16 * GiB


# ---------------------------------------------------------------------------------------------------- history


def test_capped_runs_save_to_their_own_history_folder():
    from wan_pipeline.suite.saving import storage_slug

    assert storage_slug("nvidia-h200", None) == "nvidia-h200"
    assert storage_slug("nvidia-h200", 24 * GB) == "nvidia-h200-cap24gb"
    assert storage_slug("nvidia-h200", 16 * GiB) == "nvidia-h200-cap16gib"


def _run_file(path: Path, cap, median=10.0):
    data = {"machine_info": {"gpu": {"name": "NVIDIA H200"},
                             "wan_memory_cap": None if cap is None else {"cap_bytes": cap, "applied": True}},
            "commit_info": {}, "datetime": "2026-12-02T10:00:00",
            "benchmarks": [{"name": "test_generation[x]", "fullname": "t.py::test_generation[x]",
                            "stats": {"median": median, "data": [median] * 5, "rounds": 5},
                            "extra_info": {"memory_cap_bytes": cap,
                                           "memory": {"policy": "stream-expert", "vae_bands": 1,
                                                      "streamed_bytes_per_generation": 58 * GB,
                                                      "host_to_device_bandwidth_bytes_per_s": 50 * GB},
                                           "peak_memory": {"torch_peak_bytes": 20 * GB}}}]}
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("base_cap, cur_cap", [(None, 24 * GB), (24 * GB, 16 * GB), (16 * GB, None)])
def test_compare_refuses_to_mix_capped_and_uncapped_or_two_caps_unless_forced(tmp_path, base_cap, cur_cap):
    from wan_pipeline.history.compare import compare
    from wan_pipeline.history.runs import GpuMismatchError

    base, cur = _run_file(tmp_path / "a.json", base_cap), _run_file(tmp_path / "b.json", cur_cap)
    with pytest.raises(GpuMismatchError, match="different memory caps.*use --force"):
        compare(base, cur)
    forced = compare(base, cur, force=True)
    assert any("different memory caps" in w for w in forced.warnings)
    assert compare(base, _run_file(tmp_path / "c.json", base_cap)).warnings == []


def test_history_groups_capped_runs_apart(tmp_path):
    from wan_pipeline.history.runs import load_history

    _run_file(tmp_path / "a.json", None)
    _run_file(tmp_path / "b.json", 24 * GB)
    assert sorted(load_history(tmp_path).by_gpu()) == ["nvidia-h200", "nvidia-h200-cap24gb"]


def test_the_report_says_a_capped_run_emulates_memory_not_speed(tmp_path):
    from wan_pipeline.history.report import memory_cap_lines
    from wan_pipeline.history.runs import load_run

    lines = "\n".join(memory_cap_lines(load_run(_run_file(tmp_path / "a.json", 24 * GB))))
    assert "emulate a smaller card's memory, not its speed" in lines
    assert "| `t.py::test_generation[x]` | stream-expert | 1 | 20 | 58 | 50 |" in lines
    assert memory_cap_lines(load_run(_run_file(tmp_path / "b.json", None))) == []


# ---------------------------------------------------------------------------------------------------- host memory


def test_a_host_build_moves_each_submodule_only_once_its_seeded_init_is_final(monkeypatch):
    """built_in_host moves a submodule when it is attached to its parent; nothing may draw or change its values
    after that (they would then be drawn on the host, unlike an on-device build). The values at each move are
    recorded and compared with the finished module's, and with an ordinary build of the same seed."""
    import wan_pipeline.run.memory as memory
    from wan_pipeline.run.models import TINY_TRANSFORMER, random_transformer

    seen = {}
    real_to_host = memory.to_host

    def recording(module, pin=True):
        for name, t in module.named_parameters():
            seen.setdefault(id(t), t.detach().clone())
        return real_to_host(module, pin)

    monkeypatch.setattr(memory, "to_host", recording)
    cpu = torch.device("cpu")
    hosted = random_transformer(TINY_TRANSFORMER, cpu, torch.float32, seed=7, in_host=True)
    plain = random_transformer(TINY_TRANSFORMER, cpu, torch.float32, seed=7)
    block_params = {id(p) for p in hosted.blocks.parameters()}
    assert block_params and block_params <= set(seen)  # every block tensor went through a move
    for name, p in hosted.named_parameters():
        if id(p) in seen:
            assert torch.equal(seen[id(p)], p), name  # unchanged since its move
    for (name, a), (_, b) in zip(hosted.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_host_build_moves_each_block_before_the_next_one_is_built(monkeypatch):
    """The device holds one block at a time: block i moves as soon as block i+1 begins, not when the block list is
    attached to the model (diffusers builds the whole list first, so that would keep every block on the device
    until the end: a 24 GB cap ran out of memory building one A14B expert that way)."""
    import wan_pipeline.run.memory as memory
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock
    from wan_pipeline.run.models import TINY_TRANSFORMER, random_transformer

    config = dict(TINY_TRANSFORMER, num_layers=4)
    built, moves = [], []  # blocks begun, and how many had begun at each block's move

    def note_block(parent, _name, submodule):
        if isinstance(parent, WanTransformerBlock) and parent not in built:
            built.append(parent)

    real_to_host = memory.to_host

    def recording(module, pin=True):
        if isinstance(module, WanTransformerBlock):
            moves.append((built.index(module), len(built)))
        return real_to_host(module, pin)

    monkeypatch.setattr(memory, "to_host", recording)
    handle = torch.nn.modules.module.register_module_module_registration_hook(note_block)
    try:
        random_transformer(config, torch.device("cpu"), torch.float32, seed=8, in_host=True)
    finally:
        handle.remove()
    assert [index for index, _ in moves] == [0, 1, 2, 3]  # each block once, in order
    assert all(begun <= index + 2 for index, begun in moves), moves  # at most the next block had begun


def test_a_host_build_swaps_each_block_to_fp8_before_it_moves_and_equals_an_on_device_quantization(monkeypatch):
    """With a block quantizer, each transformer block is swapped to fp8 while it is still where it was built and
    reaches host memory as fp8 only (no full-precision copy of the expert in host memory); the result is bitwise the
    ordinary build quantized afterwards, and apply_precision leaves the swapped blocks as they are and counts them."""
    import wan_pipeline.run.memory as memory
    from wan_pipeline.run.models import TINY_TRANSFORMER, random_transformer
    from wan_pipeline.run.precision import Fp8Linear, apply_precision, block_quantizer

    moved_dtypes = []
    real_to_host = memory.to_host

    def recording(module, pin=True):
        if type(module).__name__ == "WanTransformerBlock":
            moved_dtypes.append({t.dtype for n, t in module.named_parameters() if n.endswith("weight") and t.ndim == 2})
        return real_to_host(module, pin)

    monkeypatch.setattr(memory, "to_host", recording)
    cpu = torch.device("cpu")
    hosted = random_transformer(TINY_TRANSFORMER, cpu, torch.float32, seed=9, in_host=True,
                                quantize_block=block_quantizer("fp8-upcast", torch.float32, cpu))
    assert len(moved_dtypes) == TINY_TRANSFORMER["num_layers"]
    assert all(d == {torch.float8_e4m3fn} for d in moved_dtypes)  # every 2-D block weight moved as fp8
    plain = random_transformer(TINY_TRANSFORMER, cpu, torch.float32, seed=9)
    apply_precision(plain, "fp8-upcast", torch.float32, run_on=cpu)
    notes = apply_precision(hosted, "fp8-upcast", torch.float32, run_on=cpu)
    linears = sum(isinstance(m, Fp8Linear) for m in plain.blocks.modules())
    assert notes == [f"precision fp8-upcast: {linears} block Linear layers as fp8 storage upcast per layer"]
    a, b = hosted.state_dict(), plain.state_dict()
    assert a.keys() == b.keys()
    def bits(t):  # fp8 compared by its bytes (torch.equal has no fp8 kernel)
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t

    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(bits(a[k]), bits(b[k])), k
    assert block_quantizer("bf16", torch.float32, cpu) is None


# The loader reads the head count off a head dim of 128; the text width is the small encoder's.
TINY_REAL_WAN = dict(num_attention_heads=1, attention_head_dim=128, in_channels=36, out_channels=16, text_dim=16,
                     ffn_dim=64)


def _comfyui_folder(tmp_path):
    """A ComfyUI models folder of small files under the template's names (no LoRA)."""
    from checkpoints import tiny_transformer, tiny_umt5, tiny_vae, write_umt5_file, write_vae_file, write_wan_file

    from wan_pipeline.plan import config as cfg

    root = tmp_path / "models"
    for folder in ("diffusion_models", "text_encoders", "vae"):
        (root / folder).mkdir(parents=True)
    write_wan_file(root / "diffusion_models" / cfg.HIGH_NOISE_MODEL, tiny_transformer(1, **TINY_REAL_WAN),
                   "fp8_scaled")
    write_wan_file(root / "diffusion_models" / cfg.LOW_NOISE_MODEL, tiny_transformer(2, **TINY_REAL_WAN),
                   "fp8_scaled")
    write_umt5_file(root / "text_encoders" / cfg.TEXT_ENCODER, tiny_umt5(3), fp8_scaled=True)
    write_vae_file(root / "vae" / cfg.VAE, tiny_vae(4))
    return root


def _real_config():
    base = get_preset("seed-832x1216-49f")
    passes = tuple(PassConfig(**{**p.__dict__, "lora_file": None, "lora_strength": 0.0}) for p in base.passes)
    return base.replace(passes=passes, width=64, height=64, length=5, precision="bf16")


def test_real_files_loaded_into_host_memory_are_the_same_tensors(tmp_path, monkeypatch):
    import wan_pipeline.run.models as models

    root = _comfyui_folder(tmp_path)
    config = _real_config()
    key = ModelSetKey.for_run(config, "real", str(root))
    cpu = torch.device("cpu")
    monkeypatch.setattr(models, "experts_in_host", lambda *a: False)
    plain = models.load_model_set(key, device=cpu, models_dir=str(root), config=config)
    monkeypatch.setattr(models, "experts_in_host", lambda *a: True)
    hosted = models.load_model_set(key, device=cpu, models_dir=str(root), config=config)
    assert set(hosted.host_copies) == {"expert:high", "expert:low"} and not plain.host_copies
    assert any("pinned host memory" in n for n in hosted.notes)
    for name in ("high", "low"):
        a, b = plain.experts[name].state_dict(), hosted.experts[name].state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (name, k)
        host = hosted.host_copies[f"expert:{name}"]
        assert all(host[k] is t for k, t in hosted.experts[name].named_parameters())  # no second copy


def test_streamed_experts_from_real_files_generate_the_same_latent(tmp_path, monkeypatch):
    """The streaming path on a CPU: diffusers' block-level group offloading (no CUDA stream to prefetch on here)
    on experts loaded from a ComfyUI folder gives the latent of the resident experts, and counts every byte of the
    expert once per forward."""
    from wan_pipeline.run.memory import enable_streaming, tensor_bytes
    from wan_pipeline.run.pipeline import generate, prepare

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path, also on a GPU box
    root = _comfyui_folder(tmp_path)
    plan, prepared = prepare(_real_config(), "real", str(root))
    assert prepared.models.device.type == "cpu"
    resident = generate(prepared, plan)
    infos = {name: enable_streaming(expert, torch.device("cpu")) for name, expert in prepared.models.experts.items()}
    streamed = generate(prepared, plan)
    assert torch.equal(resident.latent, streamed.latent)
    for name, expert in prepared.models.experts.items():
        assert infos[name]["bytes_per_forward"] == tensor_bytes(expert) > 0
        assert infos[name]["groups"] == len(expert.blocks) + 1
        assert hasattr(expert.blocks[0], "_diffusers_hook")  # diffusers' hooks, not a hand-written one


def test_the_residency_streams_when_only_streaming_fits(monkeypatch):
    """Measured sizes drive the choice: with a budget below one expert plus its working memory, an A14B-sized
    set streams; streamed experts are never placed whole by need()."""
    import wan_pipeline.run.models as models
    from wan_pipeline.plan.memory import Working

    class Fake:
        device = torch.device("cuda")
        experts = {"high": int(14.6 * GB), "low": int(14.6 * GB)}
        text_encoder, vae = int(9.8 * GB), int(0.25 * GB)
        key = ModelSetKey.for_run(get_preset("seed-832x1216-49f"), "synthetic", None)
        host_copies: dict = {}
        streaming = None

    monkeypatch.setattr(models, "parameter_bytes", lambda m: m if isinstance(m, int) else 0)
    monkeypatch.setattr(models.Residency, "component_bytes", lambda self: a14b_component_bytes(fp8=True))
    residency = models.Residency(Fake(), Working(int(9.5 * GB), int(6.4 * GB)), total_bytes=24 * GB)
    assert residency.policy == "stream-expert"
    moves = []
    monkeypatch.setattr(residency, "_place", lambda n, device: moves.append((n, str(device))))
    residency.need("expert:high")
    assert moves == [("text_encoder", "cpu")]
    assert residency.describe()["budget_bytes"] == 24 * GB


@pytest.mark.parametrize("cap, in_host", [(None, False), (80 * GB, False), (24 * GB, True), (16 * GiB, True)])
def test_experts_are_built_in_host_memory_when_the_budget_cannot_hold_both(monkeypatch, cap, in_host):
    import wan_pipeline.run.models as models

    monkeypatch.setattr(models, "device_budget", lambda device, c: 141 * GB if c is None else c)  # an H200
    config = get_preset("seed-832x1216-49f").replace(precision="fp8-scaled-mm-fast", memory_cap=cap)
    key = ModelSetKey.for_run(config, "synthetic", None)
    assert models.experts_in_host(key, torch.device("cuda"), config) is in_host
    assert models.experts_in_host(key, torch.device("cpu"), config) is False  # tiny and CPU runs: no host build


def test_swapped_experts_count_their_bytes(monkeypatch):
    import wan_pipeline.run.models as models

    class Fake:
        device = torch.device("cuda")
        experts = {"high": torch.nn.Linear(4, 4), "low": torch.nn.Linear(4, 4)}
        text_encoder, vae = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        key = ModelSetKey.for_run(get_preset("seed-832x1216-49f"), "synthetic", None)
        host_copies: dict = {}
        streaming = None

    residency = models.Residency(Fake(), 0, total_bytes=10**12, policy="offload-idle-expert")
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)  # stands for the copy to the GPU
    monkeypatch.setattr(type(next(Fake.experts["high"].parameters())), "device",
                        property(lambda self: torch.device("cpu")), raising=False)
    residency.need("expert:high")
    assert residency.moved_bytes == residency.sizes["expert:high"] == (16 + 4) * 4


def test_a_memory_cap_with_several_gpus_is_refused_before_anything_runs(capsys):
    from wan_pipeline.cli.main import main

    assert main(["run", "--mode", "tiny", "--memory-cap", "24GB", "--gpus", "2"]) == 2
    err = capsys.readouterr().err
    assert "--memory-cap runs on one GPU; the --gpus ranks are not capped" in err and "Traceback" not in err


def test_pinned_allocations_round_up_to_powers_of_two_and_an_a14b_expert_in_host_memory():
    from wan_pipeline.plan.memory import (A14B_BLOCK_FP8_ELEMENTS, A14B_BLOCK_WEIGHT_ELEMENTS,
                                          a14b_pinned_expert_bytes, pinned_allocation_bytes)

    assert [pinned_allocation_bytes(n) for n in (0, 1, 2, 3, 4096, 4097)] == [0, 1, 2, 4, 4096, 8192]
    assert pinned_allocation_bytes(5120 * 5120) == 32 * 2**20 and pinned_allocation_bytes(5120 * 13824) == 2**27
    assert sum(A14B_BLOCK_WEIGHT_ELEMENTS) == A14B_BLOCK_FP8_ELEMENTS  # the block weights are the fp8 elements
    # fp8: 40 blocks x (8 x 32 MiB + 2 x 128 MiB) plus the unrounded rest; 16-bit: twice the rounded weights
    assert a14b_pinned_expert_bytes(True) == 22_009_694_336
    assert a14b_pinned_expert_bytes(False) == 43_484_530_816


def test_a_host_build_that_would_exhaust_the_host_is_refused_with_the_figures():
    from wan_pipeline.plan.memory import MemoryCapError
    from wan_pipeline.run.memory import check_host_room, host_available_bytes

    assert host_available_bytes() > 0
    check_host_room(10**9, "two experts", available=2 * 10**9)
    with pytest.raises(MemoryCapError, match=r"two experts need about 44.02 GB \(41.00 GiB\) of pinned host memory, "
                                             r"and this host has 30.00 GB"):
        check_host_room(44_019_388_672, "two experts", available=30 * 10**9)

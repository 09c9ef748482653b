"""Sequence-parallel launcher: degree checks, scaling arithmetic, the torchrun path on a CPU (gloo), and a rank
that dies."""

import json
import subprocess
import sys

import pytest
from inner_sessions import cpu_only, plugin_args

from wan_pipeline.errors import WanBenchError
from wan_pipeline.run.parallel import check_degree, check_sequence_parallel, scaling

pytest_plugins = ["pytester"]


def test_degree_must_divide_the_heads_and_fit_the_host():
    check_degree(2, heads=40, available=2)
    with pytest.raises(WanBenchError, match="more GPUs than this host has \\(1 visible\\)"):
        check_degree(2, heads=40, available=1)
    with pytest.raises(WanBenchError, match="does not divide the 40 attention heads; use one of \\[1, 2, 4"):
        check_degree(3, heads=40, available=8)
    with pytest.raises(WanBenchError, match="at least 1"):
        check_degree(0, heads=40, available=8)


def test_both_launchers_check_the_degree_against_the_experts_of_the_mode():
    check_sequence_parallel(2, "tiny", available=2)  # tiny: 2 heads
    with pytest.raises(WanBenchError, match="does not divide the 2 attention heads"):
        check_sequence_parallel(4, "tiny", available=8)
    check_sequence_parallel(4, "synthetic", available=8)  # A14B: 40 heads


def test_scaling_is_speedup_over_degree():
    assert scaling(60.0, 33.3, 2) == {"speedup": 1.802, "efficiency": 0.901}


def _run(tmp_path, gpus):
    return subprocess.run([sys.executable, "-m", "wan_pipeline", "run", "--mode", "tiny", "--gpus", str(gpus),
                           "--rounds", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)


def test_one_rank_through_torchrun_on_cpu(tmp_path):
    proc = _run(tmp_path, 1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "seed-832x1216-49f-tiny-sequence-parallel-1.json").read_text())
    assert summary["speedup"] == 1.0 and summary["latent_cosine_vs_single_gpu"] == pytest.approx(1.0)
    record = json.loads((tmp_path / "seed-832x1216-49f-tiny-gpus1.json").read_text())
    assert record["world_size"] == 1 and set(record["stages"]) >= {"pass1", "pass2", "decode"}


def test_a_rank_that_dies_is_a_clear_error_and_leaves_nothing_running(tmp_path):
    # diffusers' context parallelism needs an accelerator: on a CPU both ranks fail inside it
    proc = _run(tmp_path, 2)
    assert proc.returncode == 2
    assert "the 2-GPU run exited with" in proc.stderr and "all its processes were stopped" in proc.stderr
    assert "Traceback" not in proc.stderr.split("Last lines")[0]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "wan_pipeline.launch.rank" not in ps
    assert (tmp_path / "seed-832x1216-49f-tiny-gpus1.json").exists()  # the one-GPU result is kept


# ------------------------------------------------------------------------------------------------ pytest --wan-sp


def test_the_sp_matrix_runs_every_case_on_one_gpu_and_split_loading_each_set_once_in_order():
    from wan_pipeline.plan.config import ModelSetKey
    from wan_pipeline.suite.cases import build_cases
    from wan_pipeline.suite.options import WanOptions

    options = WanOptions(mode="tiny", models_dir=None, presets=("seed-832x1216-49f", "seed-832x1216-81f"),
                         budgets=None, out=None, attention=("sdpa",), precision=("bf16",), compile=(False,),
                         rounds=1, warmup=0, workflow=None, sequence_parallel=2)
    cases = build_cases(options)
    assert [c.id for c in cases] == ["seed-832x1216-49f-sdpa-bf16-compile0", "seed-832x1216-49f-sdpa-bf16-compile0-sp2",
                                     "seed-832x1216-81f-sdpa-bf16-compile0", "seed-832x1216-81f-sdpa-bf16-compile0-sp2"]
    weights = {c.id: ModelSetKey.for_run(c.config, c.mode, None).weights() for c in cases}
    # context parallelism cannot be undone on an expert: the split cases use their own model set
    assert weights[cases[0].id] == weights[cases[2].id] != weights[cases[1].id] == weights[cases[3].id]


def test_split_generations_get_speedup_and_efficiency_against_the_one_gpu_case():
    from wan_pipeline.run.parallel import add_scaling_to_json

    def bench(name, median, sp=None):
        return {"name": name, "stats": {"median": median}, "extra_info": {"sequence_parallel": sp}}

    p1, q1 = "p-sdpa-fp8-compile0", "q-sdpa-fp8-compile0"
    benchmarks = [bench(f"test_generation[{p1}]", 64.0),
                  bench("test_generation[p-sdpa-fp8-compile0-sp2]", 36.0, {"degree": 2, "single_gpu_case": p1}),
                  bench("test_generation[q-sdpa-fp8-compile0-sp2]", 30.0, {"degree": 2, "single_gpu_case": q1})]
    lines = add_scaling_to_json(benchmarks)  # q has no one-GPU case in this session
    assert benchmarks[1]["extra_info"]["sequence_parallel"] == {
        "degree": 2, "single_gpu_case": p1, "single_gpu_seconds": 64.0, "speedup": 1.778, "efficiency": 0.889}
    assert benchmarks[2]["extra_info"]["sequence_parallel"] == {"degree": 2, "single_gpu_case": q1}
    assert lines == ["test_generation[p-sdpa-fp8-compile0-sp2]: 1.778x one GPU (64.00 s -> 36.00 s), "
                     "scaling efficiency 0.889"]


def test_the_sp_session_is_the_users_pytest_command_under_torchrun(tmp_path):
    from wan_pipeline.launch.torchrun import torchrun_pytest_command

    command = torchrun_pytest_command(2, ["tests/benchmarks", "--wan-sp", "2", "--benchmark-json=o.json"], tmp_path)
    assert command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            f"--log-dir={tmp_path}"]
    assert "--local-ranks-filter=0" in command  # rank 0 on the console, every rank in its log file
    # the one rank entry point, as for `wan-bench run --gpus`, running the user's pytest arguments
    assert command[-7:] == ["-m", "wan_pipeline.launch.rank", "pytest", "tests/benchmarks", "--wan-sp", "2",
                            "--benchmark-json=o.json"]


def test_ranks_other_than_0_run_the_session_without_its_result_files():
    from wan_pipeline.launch.shards import worker_args

    args = ["tests/benchmarks", "--wan-sp", "2", "--benchmark-json=o.json", "--benchmark-autosave", "--junitxml",
            "r.xml", "-o", "addopts="]
    assert worker_args(args) == ["tests/benchmarks", "--wan-sp", "2", "-o", "addopts="]


def test_the_rank_entry_point_names_its_commands():
    from wan_pipeline.launch.rank import main

    assert main([]) == 2 and main(["train"]) == 2


def test_a_split_configuration_outside_torchrun_says_how_to_start_one():
    from wan_pipeline.run.parallel import enable_sequence_parallel

    with pytest.raises(WanBenchError, match="degree 2 needs 2 ranks started by torchrun, this process has 1: use "
                                            "`wan-bench run --gpus 2` or `pytest --wan-sp 2`"):
        enable_sequence_parallel(None, 2, "sdpa")


def test_a_rank_of_the_wrong_world_size_is_refused(monkeypatch):
    from wan_pipeline.launch.rank import check_world_size

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(WanBenchError, match="sequence parallel degree 2 runs 2 ranks, this torchrun started 3"):
        check_world_size(2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_world_size(2)


@pytest.mark.parametrize("extra, message", [
    ([], "ERROR: --wan-sp 2: --gpus 2 asks for more GPUs than this host has (0 visible)"),
    (["--wan-gpus", "2"], "ERROR: --wan-sp splits each generation over the GPUs and --wan-gpus spreads the cases over "
                          "them: choose one"),
    (["--wan-sp", "x"], "*error: argument --wan-sp: must be an integer, got 'x'"),
])
def test_sp_usage_errors_start_nothing(pytester, monkeypatch, extra, message):
    cpu_only(monkeypatch)  # no GPU visible: 0 GPUs on any machine
    pytester.makepyfile(test_x="def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *plugin_args(), "--wan-mode", "tiny", "--wan-sp",
                                           "2", *extra)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message.replace("[", "[[]")])
    assert "Traceback" not in result.stderr.str()


def test_a_split_generation_is_compared_with_the_one_gpu_generation_of_the_same_configuration():
    import numpy as np
    import torch

    from wan_pipeline.plan.presets import get_preset
    from wan_pipeline.run.case import WanCase
    from wan_pipeline.run.parallel import compare_with_single_gpu

    def case(name, degree):
        return WanCase(get_preset(name).replace(precision="fp8-scaled-mm", sequence_parallel=degree), "synthetic")

    class Gen:
        def __init__(self, latent, frames):
            self.latent, self.frames = latent, frames

    store = {}
    latent = torch.randn(1, 16, 3, 4, 4)
    frames = np.full((9, 8, 8, 3), 100, np.uint8)
    assert compare_with_single_gpu(case("seed-832x1216-49f", 1), Gen(latent, frames), store) is None
    kept = store["seed-832x1216-49f-sdpa-fp8-scaled-mm-compile0"][1]
    assert kept.base is None and len(kept) == 3  # every 4th frame, owned: the whole clip is not kept alive
    split = Gen(latent * 1.0001, frames + np.eye(8, dtype=np.uint8)[None, :, :, None])
    result = compare_with_single_gpu(case("seed-832x1216-49f", 2), split, store)
    assert result["single_gpu_case"] == "seed-832x1216-49f-sdpa-fp8-scaled-mm-compile0"
    assert result["latent_cosine_vs_single_gpu"] == pytest.approx(1.0)
    assert 40 < result["frames_psnr_vs_single_gpu_db"] < 60
    assert compare_with_single_gpu(case("seed-832x1216-81f", 2), split, store) == {
        "single_gpu_case": "seed-832x1216-81f-sdpa-fp8-scaled-mm-compile0", "latent_cosine_vs_single_gpu": None,
        "frames_psnr_vs_single_gpu_db": None}

"""The README's results table: rows from stored pytest-benchmark files, the marker block rewrite, bad files."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from wan_pipeline.cli.main import main
from wan_pipeline.history.results import (BEGIN, END, ResultsError, load_results, render_results, replace_block,
                                          update_results)

GIB = 2 ** 30


def _stats(data):
    """pytest-benchmark's stats block for one benchmark's rounds (the keys it writes)."""
    data = sorted(data)
    q1, _, q3 = statistics.quantiles(data, n=4)
    mean = statistics.fmean(data)
    return {"min": data[0], "max": data[-1], "mean": mean, "stddev": statistics.stdev(data), "rounds": len(data),
            "median": statistics.median(data), "iqr": q3 - q1, "q1": q1, "q3": q3, "iqr_outliers": 0,
            "stddev_outliers": 0, "outliers": "0;0", "ld15iqr": data[0], "hd15iqr": data[-1], "ops": 1 / mean,
            "total": sum(data), "data": data, "iterations": 1}


def _bench(name, extra_info, data):
    return {"group": None, "name": name, "fullname": f"tests/benchmarks/test_x.py::{name}", "params": None,
            "param": None, "extra_info": extra_info,
            "options": {"disable_gc": False, "timer": "perf_counter", "min_rounds": 5, "max_time": 1.0,
                        "min_time": 5e-06, "warmup": False},
            "stats": _stats(data)}


def _file(path, benchmarks, *, day=2, gpu="NVIDIA H200", driver="580.159.04", torch="2.11.0+cu130",
          diffusers="0.42.1", commit="0123456789abcdef0123", dirty=False):
    """A session file laid out as pytest-benchmark writes it, with what the wan-bench plugin adds to machine_info
    (the NVML snapshot under `gpu`, the environment fingerprint under `wan_env`)."""
    machine_info = {
        "node": "gpu-box", "processor": "x86_64", "machine": "x86_64", "python_compiler": "GCC 12.2.0",
        "python_implementation": "CPython", "python_implementation_version": "3.11.7", "python_version": "3.11.7",
        "python_build": ["main", "May  9 2026"], "release": "6.8.0", "system": "Linux",
        "cpu": {"arch": "X86_64", "bits": 64, "count": 16, "brand_raw": "AMD EPYC"},
        "gpu": None if gpu is None else {"index": 0, "name": gpu, "driver": driver, "compute_capability": "9.0",
                                         "memory_total_bytes": 150 * GIB},
        "wan_env": {"version.torch": torch, "version.diffusers": diffusers, "torch.cuda": "13.0",
                    "nvidia_driver": driver if gpu else None, "python": "3.11.7"},
    }
    data = {"machine_info": machine_info,
            "commit_info": {"id": commit, "time": "2026-12-01T10:00:00+00:00", "author_time": "2026-12-01T10:00:00+00:00",
                            "dirty": dirty, "project": "wan-bench", "branch": "main"},
            "benchmarks": benchmarks, "datetime": f"2026-12-{day:02d}T03:00:00.000000+00:00", "version": "5.2.3"}
    path.write_text(json.dumps(data, indent=4))
    return path


GENERATION = {
    "mode": "synthetic", "preset": "seed-832x1216-49f", "tokens": 51376, "frames": 49, "width": 832, "height": 1216,
    "stages": {"text_encode": 0.07, "pass1": 8.0, "pass2": 8.0, "decode": 2.0},
    "peak_memory": {"torch_peak_bytes": int(43.8 * GIB), "nvml_used_bytes": None, "torch_peak_bytes_by_stage": {}},
    "attention_kernel": "cudnn-fp8",
    "attention": {"requested": "cudnn-fp8", "backend": "cudnn-fp8", "kernel": "cudnn-fp8", "kernel_names": []},
    "precision": "fp8-scaled-mm-fast", "compile": {"enabled": True, "warmup_seconds": 30.0},
    "effective_tflops": 853.2, "throttled": False, "env": {},
}
FORWARD = {
    "mode": "synthetic", "preset": "seed-832x1216-49f", "precision": "bf16", "attention_kernel": "flash",
    "attention": {"requested": "sdpa", "kernel": "flash"}, "compile": {"enabled": False, "warmup_seconds": 1.0},
    "flops": 3.4e15, "effective_tflops": 504.4, "cosine_vs_bf16_sdpa": 0.999834,
}
STOCK = {"mode": "synthetic", "preset": "seed-832x1216-49f", "reference": "diffusers WanImageToVideoPipeline",
         "precision": "bf16", "attention_kernel": "diffusers default (native SDPA)"}

GEN_ROUNDS = [19.31, 19.25, 19.30, 19.36, 19.28]
FWD_ROUNDS = [6.78, 6.79, 6.77]
STOCK_ROUNDS = [32.9, 33.0, 32.98, 33.1, 32.8]


@pytest.fixture
def results_dir(tmp_path):
    folder = tmp_path / "docs" / "results"
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("what belongs here\n")
    _file(folder / "b-later.json", [_bench("test_expert_forward[synthetic-bf16-sdpa]", FORWARD, FWD_ROUNDS)],
          day=3, commit="fedcba9876543210", dirty=True)
    _file(folder / "a-earlier.json", [
        _bench("test_generation[synthetic-seed-832x1216-49f-fp8-scaled-mm-fast-cudnn-fp8-c1]", GENERATION, GEN_ROUNDS),
        _bench("test_stock_diffusers[synthetic-seed-832x1216-49f]", STOCK, STOCK_ROUNDS),
    ], day=2)
    return folder


def test_rows_carry_configuration_and_measurements(results_dir):
    results = load_results([results_dir])
    gen, stock, fwd = results.rows
    assert [r.run for r in results.rows] == [1, 1, 2]  # files oldest first, whatever their names
    assert gen.benchmark.startswith("test_generation[") and fwd.benchmark.startswith("test_expert_forward[")
    assert (gen.preset, gen.mode, gen.precision, gen.attention, gen.compile) == (
        "seed-832x1216-49f", "synthetic", "fp8-scaled-mm-fast", "cudnn-fp8", "on")
    assert gen.median_s == statistics.median(GEN_ROUNDS)
    assert gen.cv == pytest.approx(statistics.stdev(GEN_ROUNDS) / statistics.fmean(GEN_ROUNDS), rel=1e-12)
    assert gen.effective_tflops == 853.2 and gen.peak_memory_bytes == int(43.8 * GIB) and gen.cosine is None
    # the requested kernel and the one that ran, when they differ
    assert (fwd.attention, fwd.compile, fwd.cosine, fwd.peak_memory_bytes) == ("sdpa: flash", "off", 0.999834, None)
    assert (stock.attention, stock.compile, stock.effective_tflops) == ("diffusers default (native SDPA)", "", None)
    assert gen.memory_cap == stock.memory_cap == ""  # uncapped


@pytest.mark.parametrize("cap, memory, shown", [
    (24 * 10**9, {"policy": "stream-expert"}, "24GB: stream-expert"),
    (16 * 2**30, {"policy": "offload-idle-expert"}, "16GiB: offload-idle-expert"),
    (24 * 10**9, None, "24GB"),
    (None, {"policy": "resident", "cap_bytes": None}, ""),
])
def test_a_capped_run_shows_its_cap_and_residency(tmp_path, cap, memory, shown):
    info = {"mode": "synthetic", "memory_cap_bytes": cap, **({"memory": memory} if memory else {})}
    path = _file(tmp_path / "capped.json", [_bench("test_generation[x]", info, [2.0, 2.1, 1.9])])
    (row,) = load_results([path]).rows
    assert row.memory_cap == shown
    line = next(x for x in render_results(load_results([path])).splitlines() if "test_generation[x]" in x)
    assert f"| {shown} | 2.00 |" in line


def test_each_file_names_date_gpu_driver_versions_and_commit(results_dir, tmp_path):
    results = load_results([results_dir], relative_to=tmp_path)
    first, second = results.runs
    assert (first.index, first.path, first.date, first.gpu, first.driver, first.torch, first.diffusers,
            first.commit) == (1, "docs/results/a-earlier.json", "2026-12-02", "NVIDIA H200", "580.159.04",
                              "2.11.0+cu130", "0.42.1", "0123456789ab")
    assert second.commit == "fedcba987654 (uncommitted changes)"


def test_a_run_without_gpu_or_commit(tmp_path):
    path = _file(tmp_path / "cpu.json", [_bench("test_generation[tiny]", {"mode": "tiny"}, [1.0, 1.1, 0.9])],
                 gpu=None, commit="unversioned")
    (run,) = load_results([path]).runs
    assert (run.gpu, run.driver, run.commit) == ("no GPU", "", "")


def test_table_markdown(results_dir, tmp_path):
    text = render_results(load_results([results_dir], relative_to=tmp_path), "wan-bench results docs/results")
    lines = text.splitlines()
    header = lines[0]
    assert header.startswith("| benchmark | preset | mode | precision | attention | compile | memory cap | median s | "
                             "CV |")
    gen_line = next(line for line in lines if "test_generation[" in line)
    cv = statistics.stdev(GEN_ROUNDS) / statistics.fmean(GEN_ROUNDS) * 100
    assert f"| {statistics.median(GEN_ROUNDS):.2f} | {cv:.2f} % | 853 | 43.8 GiB |  | 1 |" in gen_line
    fwd_line = next(line for line in lines if "test_expert_forward[" in line)
    assert "| 0.99983 | 2 |" in fwd_line
    assert "| 1 | [`docs/results/a-earlier.json`](docs/results/a-earlier.json) | 2026-12-02 | NVIDIA H200 | " \
           "580.159.04 | 2.11.0+cu130 | 0.42.1 | `0123456789ab` |" in lines
    assert lines[-1] == "Regenerate with `wan-bench results docs/results`."
    # two tables, every row with as many cells as its header
    tables = [block.splitlines() for block in text.split("\n\n") if block.startswith("| ")]
    assert [len(table) for table in tables] == [2 + 3, 2 + 2]
    for table in tables:
        assert {row.count(" | ") for row in table} == {table[0].count(" | ")}, table


def test_no_stored_run_yet(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "README.md").write_text("x")
    text = render_results(load_results([folder]), "wan-bench results results")
    assert text == "No stored benchmark run yet. Regenerate with `wan-bench results results`.\n"


def test_markers_rewrite_only_the_block(results_dir, tmp_path):
    readme = tmp_path / "README.md"
    before, after = "# tool\n\nintro\n\n", "\n\n## Layout\n\nthe rest\n"
    readme.write_text(f"{before}{BEGIN}\nold table | stale\n{END}{after}")
    assert update_results(readme, [results_dir], "wan-bench results docs/results --out README.md") is True
    text = readme.read_text()
    assert text.startswith(before + BEGIN + "\n| benchmark |") and text.endswith(END + after)
    assert "old table" not in text and "[`docs/results/b-later.json`](docs/results/b-later.json)" in text
    assert update_results(readme, [results_dir], "wan-bench results docs/results --out README.md") is False
    assert readme.read_text() == text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".README.md.")]  # no temporary file left


@pytest.mark.parametrize("body, problem", [
    ("no markers at all\n", "found 0 and 0"),
    (f"{BEGIN}\n{END}\n{BEGIN}\n{END}\n", "found 2 and 2"),
    (f"{END}\n{BEGIN}\n", "comes before"),
])
def test_bad_markers(tmp_path, body, problem):
    with pytest.raises(ResultsError, match=problem) as info:
        replace_block(body, "rows\n", "README.md")
    assert "README.md" in str(info.value)


@pytest.mark.parametrize("content, problem", [
    ('{"benchmarks": [{"name": "t", "stats": {"median": 1.0', "truncated"),
    ('{"machine_info": {}}', "no 'benchmarks' list"),
    ('{"benchmarks": [{"name": "t", "stats": {}}]}', "no numeric stats.median"),
    ("", "empty file"),
])
def test_a_bad_file_is_an_error_naming_it_and_nothing_is_written(results_dir, tmp_path, content, problem):
    bad = results_dir / "broken.json"
    bad.write_text(content)
    readme = tmp_path / "README.md"
    readme.write_text(f"{BEGIN}\nkept\n{END}\n")
    with pytest.raises(ResultsError, match=problem) as info:
        update_results(readme, [results_dir])
    assert str(bad) in str(info.value)
    assert readme.read_text() == f"{BEGIN}\nkept\n{END}\n"


def test_missing_source_and_missing_markdown(results_dir, tmp_path):
    with pytest.raises(ResultsError, match="no such file or folder"):
        load_results([tmp_path / "nowhere"])
    with pytest.raises(ResultsError, match="no such file"):
        update_results(tmp_path / "absent.md", [results_dir])


def test_cli_rewrites_the_readme(results_dir, tmp_path, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{BEGIN}\n{END}\nbottom\n")
    monkeypatch.chdir(tmp_path)
    assert main(["results", "docs/results", "--out", "README.md"]) == 0
    text = readme.read_text()
    assert "test_generation[" in text and text.startswith("top\n") and text.endswith(f"{END}\nbottom\n")
    assert "Regenerate with `wan-bench results docs/results --out README.md`." in text
    assert "README.md" in capsys.readouterr().out
    (results_dir / "broken.json").write_text("{")
    assert main(["results", "docs/results", "--out", "README.md"]) == 2
    assert "docs/results/broken.json" in capsys.readouterr().err
    assert readme.read_text() == text


def test_cli_prints_the_block_with_out_dash(results_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["results", "docs/results", "--out", "-"]) == 0
    assert capsys.readouterr().out.startswith("| benchmark | preset |")


def test_results_never_imports_torch(results_dir, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"{BEGIN}\n{END}\n")
    code = ("import sys; from wan_pipeline.cli.main import main; "
            f"rc = main(['results', {str(results_dir)!r}, '--out', {str(readme)!r}]); "
            "print(rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert out[-2:] == ["0", "False"]

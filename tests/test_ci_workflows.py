"""The GitHub workflows: schema-valid, and doing what the project promises (CPU tests; nightly GPU benchmarks that
fail on a regression). The nightly compare step's shell script is run for real against a made-up history."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"


def load(name):
    return yaml.safe_load((WORKFLOWS / name).read_text())


def steps(workflow):
    return [s for job in workflow["jobs"].values() for s in job["steps"]]


def step(workflow, name_part):
    (found,) = [s for s in steps(workflow) if name_part in s.get("name", "")]
    return found


@pytest.mark.parametrize("name", ["ci.yml", "nightly-gpu.yml"])
def test_schema_valid(name):
    exe = shutil.which("check-jsonschema")
    if exe is None:
        pytest.skip("check-jsonschema is not installed (pip install check-jsonschema)")
    proc = subprocess.run([exe, "--builtin-schema", "vendor.github-workflows", str(WORKFLOWS / name)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ci_runs_the_readme_test_command_on_cpu():
    wf = load("ci.yml")
    (job,) = wf["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    assert [s["run"] for s in job["steps"] if "run" in s] == ["bash .ci/run"]
    script = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "python3 -m pytest -q -p no:cacheprovider" in script and "python3 -m pytest -q -p no:cacheprovider" in readme


def test_nightly_gpu_workflow_shape():
    wf = load("nightly-gpu.yml")
    triggers = wf.get(True, wf.get("on"))  # YAML 1.1 reads the key `on` as True
    assert "schedule" in triggers and "workflow_dispatch" in triggers
    (job,) = wf["jobs"].values()
    assert job["runs-on"] == ["self-hosted", "gpu"]
    assert job["env"]["WAN_MODELS_DIR"] == "${{ vars.WAN_MODELS_DIR }}"
    runs = [s for s in steps(wf) if "run" in s]
    assert "pip install" in runs[0]["run"]  # install, then the GPU tier first: a broken GPU path stops the night
    assert runs[1]["run"].strip() == "python3 -m pytest -q -m gpu tests" and runs[1] is step(wf, "GPU tests")
    assert runs[2] is step(wf, "Benchmarks")
    bench = step(wf, "Benchmarks")["run"]
    assert "pytest --benchmark-only --benchmark-autosave" in bench and "tests/benchmarks" in bench
    assert "wan-bench compare" in step(wf, "Compare")["run"]
    assert "wan-bench report" in step(wf, "Report")["run"]
    upload = step(wf, "Upload")
    assert upload["uses"].startswith("actions/upload-artifact@") and upload["if"] == "always()"
    fail = step(wf, "Fail on a regression")
    # any non-zero compare fails the night (a skipped or cancelled compare leaves rc empty: that fails too)
    assert fail["if"] == "always() && steps.compare.outputs.rc != '0'" and "exit 1" in fail["run"]


def test_the_gpu_tier_is_marked_and_skips_without_cuda_naming_why():
    """Every test under tests/gpu carries the `gpu` marker (what the nightly step selects); without CUDA each is
    skipped with the reason, not an error."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs",
                           "tests/gpu"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "skipped" in proc.stdout and " passed" not in proc.stdout and "error" not in proc.stdout.lower()
    assert "needs a CUDA device: torch.cuda.is_available() is False" in proc.stdout
    collected = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                                "-m", "not gpu", "tests/gpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "no tests collected" in collected.stdout or "deselected" in collected.stdout, collected.stdout[-2000:]


def _bench(factor, name="t"):
    data = [60.0 * factor * (1 + 0.01 * d) for d in (-1.2, -0.5, 0.0, 0.3, 0.9, 1.4)]
    return {"name": name, "fullname": f"tests/benchmarks/t.py::{name}", "extra_info": {},
            "stats": {"median": sorted(data)[3], "rounds": 6, "data": data}}


@pytest.mark.parametrize("factor, expected_rc, current", [
    (1.0, "0", "complete"), (1.15, "1", "complete"),
    (1.0, "1", "incomplete"),  # interrupted: marked by the plugin, the gate fails however fast it was
    (1.0, "1", "missing"),  # a benchmark of the baseline did not run
])
def test_nightly_compare_step_sets_rc(tmp_path, factor, expected_rc, current):
    """Run the workflow's own compare script with `wan-bench` on PATH against a per-GPU storage folder."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    folder = tmp_path / "storage" / "nvidia-h100-80gb-hbm3"
    folder.mkdir(parents=True)
    for n, f in ((1, 1.0), (2, factor)):
        benchmarks = [_bench(f), _bench(f, "u")]
        run = {"machine_info": {"gpu": {"name": "NVIDIA H100 80GB HBM3"}}, "commit_info": {}, "version": "5.2.3",
               "datetime": f"2026-11-0{n}T00:00:00+00:00", "benchmarks": benchmarks}
        if n == 2 and current == "incomplete":
            run["wan_incomplete"] = {"reasons": ["interrupted (KeyboardInterrupt)"]}
        if n == 2 and current == "missing":
            run["benchmarks"] = benchmarks[:1]
        (folder / f"000{n}_run.json").write_text(json.dumps(run))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "wan-bench"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m wan_pipeline \"$@\"\n")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    wf = load("nightly-gpu.yml")
    script = step(wf, "Compare")["run"].replace("${{ steps.files.outputs.latest }}", str(folder / "0002_run.json"))
    out = tmp_path / "github_output"
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "GITHUB_OUTPUT": str(out),
           "THRESHOLD": "5", "PYTHONPATH": str(ROOT)}
    (tmp_path / "wan-bench-artifacts").mkdir()  # made by the workflow's previous step
    proc = subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # the step itself passes; the last step fails the job
    assert out.read_text().strip() == f"rc={expected_rc}"
    verdict = json.loads((tmp_path / "wan-bench-artifacts" / "verdict.json").read_text())
    assert verdict["exit_code"] == int(expected_rc)

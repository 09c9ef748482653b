"""One torchrun command builder and its launchers: `run_sequence_parallel` (`wan-bench run --gpus N`) runs the same
preset on one GPU and then on N through `torch.distributed.run` and reports seconds, speed-up, scaling efficiency,
per-rank peak memory and the cosine similarity of the final latents; `relaunch_pytest` (`pytest --wan-sp N`) runs the
user's pytest session again as N ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from wan_pipeline.errors import WanBenchError
from wan_pipeline.launch.processes import start_group, stop_group
from wan_pipeline.run.parallel import check_sequence_parallel, cp_backend, match_single_gpu, scaling

LAUNCH_TIMEOUT_S = 3600
def torchrun_command(degree: int, module: str, args: list[str], *torchrun_options: str) -> list[str]:
    """`python -m torch.distributed.run` on this host with `degree` ranks, each running `python -m module args`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={degree}",
            *torchrun_options, "-m", module, *args]


def worker_command(degree: int, args: list[str]) -> list[str]:
    return torchrun_command(degree, "wan_pipeline.launch.rank", args)


def launch(degree: int, args: list[str], log: Path, timeout: float = LAUNCH_TIMEOUT_S) -> None:
    """Run the ranks; on failure or timeout, end the whole process group and say which rank failed and why."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = start_group(worker_command(degree, args), stdout=out, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            stop_group(proc)  # also whatever a finished torchrun left behind
    if rc != 0:
        lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()]
        failed = [l for l in lines if "Error" in l or "exitcode" in l or "rank" in l.lower()][-6:] or lines[-6:]
        what = f"timed out after {timeout:.0f} s" if rc is None else f"exited with {rc}"
        raise WanBenchError(f"the {degree}-GPU run {what}; all its processes were stopped. Last lines of {log}:\n  "
                            + "\n  ".join(failed))


def run_sequence_parallel(*, preset: str, mode: str, degree: int, precision: str, attention: str, rounds: int,
                          out_dir: str, timeout: float = LAUNCH_TIMEOUT_S) -> dict:
    """The one-GPU run, then the N-GPU run, of the same preset; their comparison, written atomically."""
    import numpy as np
    import torch

    from wan_pipeline.fsutil import atomic_write_json

    check_sequence_parallel(degree, mode, max(degree, 1) if mode == "tiny" else torch.cuda.device_count())
    cp_backend(attention)  # before any rank starts
    out = Path(out_dir)
    records = {}
    for n in sorted({1, degree}):
        tag = f"{preset}-{mode}-gpus{n}"
        common = ["--preset", preset, "--mode", mode, "--precision", precision, "--attention", attention,
                  "--rounds", str(rounds), "--out", str(out), "--tag", tag]
        launch(n, common, out / f"{tag}.log", timeout)
        records[n] = json.loads((out / f"{tag}.json").read_text())
    single, parallel = records[1], records[degree]
    latents = {n: torch.load(out / f"{preset}-{mode}-gpus{n}.latent.pt") for n in records}
    frames = {n: np.load(out / f"{preset}-{mode}-gpus{n}.frames.npy") for n in records}
    summary = {
        "preset": preset, "mode": mode, "degree": degree, "precision": precision, "attention": attention,
        "single_gpu_seconds": single["median_seconds"], "parallel_seconds": parallel["median_seconds"],
        **scaling(single["median_seconds"], parallel["median_seconds"], degree),
        "per_rank_peak_memory_bytes": parallel["per_rank_peak_memory_bytes"],
        "single_gpu_peak_memory_bytes": single["per_rank_peak_memory_bytes"],
        **match_single_gpu(latents[degree], frames[degree], latents[1], frames[1]),
        "stages_single": single["stages"], "stages_parallel": parallel["stages"],
    }
    atomic_write_json(out / f"{preset}-{mode}-sequence-parallel-{degree}.json", summary)
    return summary


# ------------------------------------------------------------------------------------------------ pytest --wan-sp
#
# `pytest --benchmark-only --wan-sp N` reruns the same pytest command under torchrun with N ranks, one per GPU. Every
# rank collects the same matrix, where each case appears at degree 1 and at degree N, and runs it in the same order
# with the same rounds (the collectives of a split generation need every rank). Rank 0 is the session the user
# sees: it alone writes the benchmark JSON, the history, the videos and the records; the other ranks' output goes
# to log files. Degree-1 cases run on every rank at once, each on its own GPU: rank 0's timing is the one-GPU
# figure that the N-GPU case's speed-up and scaling efficiency are computed against.


def torchrun_pytest_command(degree: int, args: list[str], log_dir: Path) -> list[str]:
    """The user's pytest command under torchrun: N ranks, rank 0 on the console, every rank's log in `log_dir`."""
    return torchrun_command(degree, "pytest", args, f"--log-dir={log_dir}", "--tee=3", "--local-ranks-filter=0")


def relaunch_pytest(config, degree: int, mode: str, out: Path) -> int:
    """Run this pytest session again as `degree` torchrun ranks and return rank 0's exit status. On an interrupt or
    a failure, the whole process group goes: no rank is left behind."""
    import torch

    check_sequence_parallel(degree, mode, torch.cuda.device_count())  # one GPU per rank

    out = Path(config.invocation_params.dir) / out
    log_dir = out / "sequence-parallel" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    command = torchrun_pytest_command(degree, [str(a) for a in config.invocation_params.args], log_dir)
    print(f"wan-bench: --wan-sp {degree}: running this session as {degree} torchrun ranks (logs in {log_dir})",
          flush=True)
    proc = start_group(command, cwd=config.invocation_params.dir)
    try:
        return proc.wait()
    finally:
        stop_group(proc)  # also whatever a finished torchrun left behind

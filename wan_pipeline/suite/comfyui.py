"""The ComfyUI-server backend in the suite: `--wan-comfyui URL` with `--wan-workflow FILE` parametrizes the same
generation benchmark over the workflow's matrix (cases `<variant>-comfyui`); the session's server, its fingerprint
for machine_info, and the body that runs one case there. A case the server fails (unreachable, rejected prompt,
execution error, hang) fails alone with the server's message; the session and its history go on.
"""

from __future__ import annotations

import pytest

from wan_pipeline.suite.options import WanOptions

SESSION_KEY = pytest.StashKey[object]()


def server_session(config):
    """The session's ServerSession (made on first use, kept in `config.stash`); None without --wan-comfyui."""
    options = _options(config)
    if not options.comfyui:
        return None
    if SESSION_KEY not in config.stash:
        from wan_pipeline.run.comfyui.case import ServerSession
        from wan_pipeline.run.comfyui.client import ComfyClient

        config.stash[SESSION_KEY] = ServerSession(ComfyClient(options.comfyui, options.comfyui_timeout))
    return config.stash[SESSION_KEY]


def _options(config) -> WanOptions:
    from wan_pipeline.suite.options import wan_options

    return wan_options(config)


def machine_info_entry(config) -> dict | None:
    """machine_info['comfyui']: the server's fingerprint, or the reason it could not be read."""
    session = server_session(config)
    if session is None:
        return None
    from wan_pipeline.errors import WanBenchError

    try:
        return session.fingerprint()
    except WanBenchError as exc:
        return {"url": session.client.url, "error": str(exc)}


def build_comfy_cases(options: WanOptions, config=None):
    from wan_pipeline.errors import WanBenchError
    from wan_pipeline.run.comfyui.case import comfy_cases

    if not options.workflow:
        raise WanBenchError("--wan-comfyui runs a workflow's matrix on the server: give --wan-workflow FILE")
    session = server_session(config) if config is not None else None
    return comfy_cases(options.workflow, session.object_info if session is not None else None)


@pytest.fixture(scope="session")
def wan_comfyui(pytestconfig):
    """The ComfyUI server of the session (a ServerSession), or a skip without --wan-comfyui."""
    session = server_session(pytestconfig)
    if session is None:
        pytest.skip("no ComfyUI server: --wan-comfyui URL (or WAN_COMFYUI_URL)")
    return session


def run_comfyui_case(benchmark, case, session, options: WanOptions, budgets, report: list) -> None:
    """One case on the server: warm-up, timed rounds through pytest-benchmark, the clip and its metrics, the
    record, the budget and quality checks of the in-process backend."""
    from wan_pipeline.errors import WanBenchError
    from wan_pipeline.fsutil import atomic_write_json
    from wan_pipeline.run.comfyui.case import ComfyCaseRun

    mode = "real" if options.mode in ("auto", "real") else options.mode  # the server's files are the user's own
    failure = None
    try:
        run = ComfyCaseRun(session, case, options.comfyui_rounds)
        run.warm_up(options.warmup)
        benchmark.pedantic(run.generate_once, rounds=options.rounds, iterations=1)
        run.finish()
        options.out.mkdir(parents=True, exist_ok=True)
        video = run.fetch_clip(options.out)
    except WanBenchError as exc:
        failure = f"{case.id}: {exc}"
    if failure is not None:  # this case fails alone, with the server's reason; the session goes on
        pytest.fail(failure, pytrace=False)
    metrics = None
    if video is not None:
        from wan_pipeline.measure.media import read_frames
        from wan_pipeline.measure.metrics import compute_metrics

        try:
            metrics = compute_metrics(read_frames(video), None, name=str(video))
        except WanBenchError as exc:
            report.append(f"{case.id}: metrics of {video} not computed: {exc}")
    info = run.extra_info(metrics=metrics, video=str(video) if video else None, mode=mode)
    benchmark.extra_info.update(info)
    atomic_write_json(options.out / f"{case.id}.json", run.record(info))
    median = run.median_seconds
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in info["stages"].items())
    growth = info["server_memory"]["rss_growth_bytes"]
    rss = f", server RSS {growth / 2**20:+.0f} MiB over the rounds" if growth is not None else ""
    gpu = next((d.get("name") for d in session.fingerprint().get("devices") or []), None)
    budget = budgets.budget_for(gpu, case.name, mode)
    if budget is None:
        report.append(f"{case.id}: median {median:.2f} s on the ComfyUI server ({stages}){rss}; no budget checked")
    else:
        report.append(f"{case.id}: median {median:.2f} s, budget {budget.seconds:g} s{rss}")
        assert median <= budget.seconds, f"{case.id}: median {median:.2f} s over {budget.describe()}; {stages}"
    quality = budgets.quality_for(case.name)
    if mode != "real":
        report.append(f"{case.id}: quality thresholds not checked: --wan-mode {mode} says the server's weights "
                      f"are random")
    elif quality is not None and metrics is not None:
        problems = quality.violations(metrics)
        assert not problems, f"{case.id}: temporal quality out of bounds: {'; '.join(problems)}"

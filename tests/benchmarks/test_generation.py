"""The benchmark: one whole two-pass generation per round, for every case of the matrix.

Loading happens in the model cache, outside the rounds; warm-up (and the compile) is measured apart; the
latency budget and the quality thresholds are checked after the rounds, with the stage breakdown in the message.
"""

import pytest

from wan_pipeline.fsutil import atomic_write_json
from wan_pipeline.measure.media import write_video
from wan_pipeline.measure.metrics import compute_metrics
from wan_pipeline.run.case import CaseRun
from wan_pipeline.run.parallel import compare_with_single_gpu, is_primary_rank
from wan_pipeline.suite.fixtures import out_of_memory_isolation
from wan_pipeline.suite.options import clip_format, quality_metrics_wanted


@pytest.mark.wan(measured_against_reference=True)
def test_generation(benchmark, wan_case, wan_model_cache, wan_options, wan_budgets, wan_report,
                    wan_single_gpu_outputs, wan_missing_budgets, wan_round_progress, request):
    if getattr(wan_case, "backend", None) == "comfyui":  # --wan-comfyui: the case runs on that server
        from wan_pipeline.suite.comfyui import run_comfyui_case

        run_comfyui_case(benchmark, wan_case, request.getfixturevalue("wan_comfyui"), wan_options, wan_budgets,
                         wan_report)
        return
    with out_of_memory_isolation(wan_case, wan_model_cache):
        loads_before = len(wan_model_cache.loads)
        plan, prepared = wan_model_cache.prepare(wan_case.config, wan_case.mode)
        load_seconds = wan_model_cache.last_load_seconds if len(wan_model_cache.loads) > loads_before else 0.0
        run = CaseRun(plan, prepared)
        run.warm_up(wan_options.warmup if wan_model_cache.warm_up_needed(plan, prepared) else 0)
        benchmark.pedantic(run.generate_once, rounds=wan_options.rounds, iterations=1,
                           teardown=wan_round_progress(wan_options.rounds, lambda: run.rounds[-1].total_seconds))
        run.finish()

    last = run.rounds[-1]
    metrics = compute_metrics(last.frames, prepared.image) if quality_metrics_wanted(plan.mode) else None
    primary = is_primary_rank()  # with --wan-sp, rank 0 writes the outputs
    container = clip_format(wan_options.video, plan.mode)
    video = wan_options.out / f"{wan_case.id}.{container}" if container else None
    if primary and video:
        video = write_video(last.frames, video, plan.config.fps)
    info = run.extra_info(load_seconds=load_seconds, metrics=metrics, video=str(video) if video else None)
    # only a --wan-sp session has split cases to compare; without one nothing is kept for the session
    matches = compare_with_single_gpu(wan_case, last, wan_single_gpu_outputs) if wan_options.sequence_parallel > 1 \
        else None
    if matches:
        info["sequence_parallel"].update(matches)
        wan_report.append(f"{wan_case.id}: final latents vs one GPU cosine {matches['latent_cosine_vs_single_gpu']}, "
                          f"frames PSNR {matches['frames_psnr_vs_single_gpu_db']} dB")
    benchmark.extra_info.update(info)
    if primary:
        atomic_write_json(wan_options.out / f"{wan_case.id}.json", run.record(info))

    gpu = prepared.models.device_name
    # a capped run emulates a small card's memory on this card's compute: this card's budgets do not apply to it
    capped = plan.config.memory_cap is not None
    budget = None if capped else wan_budgets.budget_for(gpu, plan.config.name, plan.mode, plan.config.attention,
                                                        plan.config.compile, plan.config.precision)
    median = run.median_seconds
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in info["stages"].items())
    if capped:
        wan_report.append(f"{wan_case.id}: median {median:.2f} s on {gpu or 'cpu'} ({plan.mode}) under a "
                          f"{plan.config.memory_cap / 1e9:.2f} GB memory cap, residency "
                          f"{info['memory'].get('policy')}; budgets are for uncapped cards, none checked")
    elif budget is None:
        wan_report.append(f"{wan_case.id}: median {median:.2f} s on {gpu or 'cpu'} ({plan.mode}); no budget for "
                          f"this card and preset, none checked")
        wan_missing_budgets.append(wan_case.id)
    else:
        wan_report.append(f"{wan_case.id}: median {median:.2f} s, budget {budget.seconds:g} s")
        assert median <= budget.seconds, (
            f"{wan_case.id}: median {median:.2f} s over the budget {budget.describe()}; stages: {stages}")

    quality = wan_budgets.quality_for(plan.config.name)
    if plan.mode != "real":
        recorded = "recorded for reference only" if metrics else "not computed"
        wan_report.append(f"{wan_case.id}: quality thresholds not checked: {plan.mode} weights are random, the "
                          f"video is noise (metrics {recorded})")
    elif quality is not None:
        problems = quality.violations(metrics)
        assert not problems, f"{wan_case.id}: temporal quality out of bounds: {'; '.join(problems)}"

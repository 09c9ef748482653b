"""One expert forward at the case's full token count: the unit the speed targets are stated in.

Its output is compared with the bf16 SDPA output on the same inputs (cosine similarity), so every faster mode
shows what it costs in numerics. A case that is not the reference computes that output itself when no earlier case
of the session did (kept by preset and mode), so the comparison never depends on the order the cases run in.
"""

import time

import pytest
import torch

from wan_pipeline.fsutil import atomic_write_json
from wan_pipeline.run.case import expert_forward_flops
from wan_pipeline.run.parallel import is_primary_rank
from wan_pipeline.run.reference import cosine, forward_inputs
from wan_pipeline.suite.fixtures import out_of_memory_isolation


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


REFERENCE = dict(precision="bf16", attention="sdpa", compile=False, sequence_parallel=1)


def _is_reference(config) -> bool:
    return all(getattr(config, k) == v for k, v in REFERENCE.items())


@torch.no_grad()
def _expert_output(cache, config, mode) -> torch.Tensor:
    """One forward of the first pass's expert of `config` on forward_inputs (deterministic), on the host."""
    plan, prepared = cache.prepare(config, mode)
    expert_name = plan.passes[0].config.expert
    prepared.residency.need(f"expert:{expert_name}")
    x, timestep, context = forward_inputs(plan, prepared.models)
    out = prepared.models.experts[expert_name](hidden_states=x, timestep=timestep, encoder_hidden_states=context,
                                               return_dict=False)[0]
    return out.float().cpu()


def bf16_sdpa_output(cache, references, case) -> torch.Tensor:
    """The bf16 SDPA (eager) output of `case`'s preset on the same inputs: this session's, or computed now, before
    the case's own model set is prepared (so the case is timed on a cache holding its own set)."""
    key = (case.config.name, case.mode)
    if key not in references:
        references[key] = _expert_output(cache, case.config.replace(**REFERENCE), case.mode)
    return references[key]


@pytest.mark.wan
def test_expert_forward(benchmark, wan_case, wan_model_cache, wan_options, wan_forward_references, wan_report):
    with out_of_memory_isolation(wan_case, wan_model_cache):
        is_reference = _is_reference(wan_case.config)
        reference = None if is_reference else bf16_sdpa_output(wan_model_cache, wan_forward_references, wan_case)
        plan, prepared = wan_model_cache.prepare(wan_case.config, wan_case.mode)
        models = prepared.models
        expert = models.experts[plan.passes[0].config.expert]
        prepared.residency.need(f"expert:{plan.passes[0].config.expert}")
        x, timestep, context = forward_inputs(plan, models)

        @torch.no_grad()
        def forward():
            out = expert(hidden_states=x, timestep=timestep, encoder_hidden_states=context, return_dict=False)[0]
            _synchronize(models.device)
            return out

        start = time.perf_counter()
        output = forward()  # warm-up: lazy init, autotuning, compile
        warmup_seconds = time.perf_counter() - start
        benchmark.pedantic(forward, rounds=wan_options.rounds, iterations=1)
        output = output.float().cpu()

    if is_reference:
        wan_forward_references[(plan.config.name, plan.mode)] = output
    similarity = 1.0 if is_reference else cosine(output, reference)
    median = benchmark.stats.stats.median if benchmark.stats else None
    flops = expert_forward_flops(plan.tokens, expert)
    benchmark.extra_info.update({
        "mode": plan.mode, "preset": plan.config.name, "tokens": plan.tokens, "frames": plan.frames,
        "width": plan.width, "height": plan.height, "precision": plan.config.precision,
        "attention_kernel": prepared.kernel.kernel, "attention": prepared.kernel.to_json(),
        "compile": {"enabled": prepared.compile_enabled, "warmup_seconds": warmup_seconds},
        "flops": flops, "effective_tflops": round(flops / median / 1e12, 1) if median else None,
        "cosine_vs_bf16_sdpa": similarity,
    })
    if is_primary_rank():  # with --wan-sp, rank 0 writes the outputs
        atomic_write_json(wan_options.out / f"forward-{wan_case.id}.json",
                          {**benchmark.extra_info, "median_seconds": median,
                           "round_seconds": list(benchmark.stats.stats.data) if benchmark.stats else None})
    wan_report.append(
        f"forward {wan_case.id}: {median if median is None else round(median, 3)} s, "
        f"{benchmark.extra_info['effective_tflops']} TFLOP/s, kernel {prepared.kernel.kernel}, cosine vs bf16 SDPA "
        f"{similarity:.5f}")
    if plan.mode != "tiny":
        assert similarity >= 0.99, f"{wan_case.id}: expert output cosine {similarity:.5f} vs bf16 SDPA is below 0.99"

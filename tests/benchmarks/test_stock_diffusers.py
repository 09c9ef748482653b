"""The stock diffusers WanImageToVideoPipeline on the same modules: the yardstick our pipeline is measured by.

bf16, diffusers' default attention, euler at the first pass's shift, expert switch at timestep 900 (Wan 2.2's
boundary). The speed-up of every generation case over it is added to the JSON at the end of the session.
"""

import pytest

from wan_pipeline.run.reference import run_stock, stock_pipeline
from wan_pipeline.suite.fixtures import out_of_memory_isolation


@pytest.mark.wan
def test_stock_diffusers(benchmark, wan_stock_case, wan_model_cache, wan_options, wan_report):
    with out_of_memory_isolation(wan_stock_case, wan_model_cache):
        plan, prepared = wan_model_cache.prepare(wan_stock_case.config, wan_stock_case.mode)
        prepared.residency.place_all()  # the stock pipeline keeps every module on the device
        pipe = stock_pipeline(prepared.models, plan)
        run_stock(pipe, plan, prepared.image)  # warm-up
        benchmark.pedantic(run_stock, args=(pipe, plan, prepared.image), rounds=wan_options.rounds, iterations=1)
    benchmark.extra_info.update({
        "mode": plan.mode, "preset": plan.config.name, "tokens": plan.tokens, "frames": plan.frames,
        "width": plan.width, "height": plan.height, "reference": "diffusers WanImageToVideoPipeline",
        "precision": "bf16", "attention_kernel": "diffusers default (native SDPA)",
    })
    if benchmark.stats:
        wan_report.append(f"stock diffusers {plan.config.name}: median {benchmark.stats.stats.median:.2f} s")

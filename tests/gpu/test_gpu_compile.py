"""Regional compile on a GPU: the graphs compiled in the warm-up are counted, steady rounds report no recompile,
and a recompile forced during the timed rounds is reported in extra_info (case.py)."""

import pytest
import torch

from gpu_helpers import tiny_models
from wan_pipeline.run.case import CaseRun
from wan_pipeline.plan.plan import make_plan
from wan_pipeline.plan.presets import get_preset

pytestmark = pytest.mark.gpu


def test_compile_counts_graphs_and_reports_a_recompile_during_the_rounds(cuda):
    torch._dynamo.reset()
    cache, plan, prepared = tiny_models(cuda, compile=True)
    assert prepared.compile_enabled
    run = CaseRun(plan, prepared)
    run.warm_up(1)
    assert run.graphs_in_warmup > 0  # the repeated blocks were compiled during the warm-up
    run.generate_once()
    run.generate_once()
    run.finish()
    steady = run.extra_info(load_seconds=None, metrics=None, video=None)["compile"]
    assert steady["enabled"] and steady["graphs_compiled_in_warmup"] == run.graphs_in_warmup
    assert steady["recompiles"] == 0 and steady["recompiled_during_rounds"] is False
    assert steady["warmup_seconds"] > 0 and steady["compile_seconds"] is not None

    # Same model set and compiled blocks; between two timed rounds the latent grows (81 frames instead of 49):
    # new shapes for the compiled blocks, so dynamo compiles again inside the rounds.
    forced = CaseRun(plan, prepared)
    forced.warm_up(0)
    forced.generate_once()
    longer = make_plan(plan.config.replace(length=get_preset("seed-832x1216-81f").length), "tiny")
    assert longer.latent_shape != plan.latent_shape
    forced.plan = longer
    forced.generate_once()
    forced.finish()
    info = forced.extra_info(load_seconds=None, metrics=None, video=None)["compile"]
    assert info["recompiles"] > 0 and info["recompiled_during_rounds"] is True

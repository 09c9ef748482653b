"""The benchmark matrix: the `WanCase`s a session parametrizes (presets or a workflow's variants, times precisions,
compile settings, attention backends and sequence-parallel degrees) and the stock-diffusers cases.
"""

from __future__ import annotations

from wan_pipeline.plan.presets import DEFAULT_MATRIX, get_preset
from wan_pipeline.suite.options import WanOptions

# ---------------------------------------------------------------------------------------------------- the matrix


def resolved_mode(options: WanOptions) -> str:
    from wan_pipeline.run.model_files import resolve_mode

    return resolve_mode(options.mode, options.models_dir)


def default_presets(mode: str) -> tuple[str, ...]:
    """The matrix that fits the hardware: every preset whose working set fits the card (all of them on a CPU)."""
    if mode == "tiny":
        return DEFAULT_MATRIX
    import torch

    from wan_pipeline.plan.plan import make_plan
    from wan_pipeline.run.models import working_memory_estimate

    total = torch.cuda.get_device_properties(0).total_memory
    expert_bytes = 14.3e9  # one A14B expert in fp8 storage: the least a run can keep resident
    fits = []
    for name in DEFAULT_MATRIX:
        plan = make_plan(get_preset(name), mode)
        if expert_bytes + working_memory_estimate(plan.tokens, plan.width, plan.height) <= total:
            fits.append(name)
    return tuple(fits)


def build_cases(options: WanOptions):
    from wan_pipeline.run.case import WanCase
    from wan_pipeline.run.models import resolve_run_precision

    mode = resolved_mode(options)
    if options.workflow:
        from wan_pipeline.plan.comfy import load_workflow_configs, locate_input_image, workflow_matrix

        configs = [v for c in load_workflow_configs(options.workflow)
                   for v in workflow_matrix(locate_input_image(c, options.workflow, options.models_dir, mode))]
    else:
        configs = [get_preset(n) for n in (options.presets or default_presets(mode))]
    degrees = (1, options.sequence_parallel) if options.sequence_parallel > 1 else (1,)
    cases = []
    for config in configs:
        for precision in options.precision:
            for compile_on in options.compile:
                for attention in options.attention:
                    for degree in degrees:
                        case_config = config.replace(attention=attention, precision=precision, compile=compile_on,
                                                     sequence_parallel=degree, residency=options.residency,
                                                     vae_bands=options.vae_bands,
                                                     lora_rounding=options.lora_rounding)
                        cases.append(WanCase(resolve_run_precision(case_config, mode, options.models_dir), mode))
    return cases


def stock_cases(cases):
    """One stock-diffusers case per two-pass preset of the matrix (bf16, default attention)."""
    seen, out = set(), []
    for case in cases:
        cfg = case.config
        if len(cfg.passes) == 2 and cfg.name not in seen:
            seen.add(cfg.name)
            out.append(type(case)(cfg.replace(attention="sdpa", precision="bf16", compile=False, sequence_parallel=1),
                                  case.mode))
    return out


def _case_of(item):
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    return callspec.params.get("wan_case") or callspec.params.get("wan_stock_case")

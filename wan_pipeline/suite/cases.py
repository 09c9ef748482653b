"""The benchmark matrix: the `WanCase`s a session parametrizes (presets or a workflow's variants, times precisions,
compile settings, attention backends and sequence-parallel degrees), the stock-diffusers cases, and the link from
each generation to its stock reference (by key, not by test name).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wan_pipeline.plan.presets import DEFAULT_MATRIX, get_preset
from wan_pipeline.suite.options import WanOptions

# ---------------------------------------------------------------------------------------------------- the matrix


def mode_and_reason(options: WanOptions) -> tuple[str, str]:
    """The session's model source and why it was chosen (printed at the top of every session).

    `auto` in a test run (no `--benchmark-only`) is tiny: the run checks that the suite works, and full-size models
    would turn the test command into hours of benchmarks on a GPU box. A benchmark run picks real when a models
    folder is given (and fails, naming the file, when it is incomplete), else synthetic on a GPU, else tiny.
    """
    from wan_pipeline.run.model_files import auto_mode

    if options.mode != "auto":
        return options.mode, "--wan-mode / WAN_MODE"
    if not options.benchmark_only:
        return "tiny", "auto in a test run; --benchmark-only times synthetic or real models"
    configs = None
    if options.workflow and options.models_dir:  # the workflow's own file names, not the presets'
        from wan_pipeline.plan.comfy import load_workflow_configs

        configs = load_workflow_configs(options.workflow)
    return auto_mode(options.models_dir, configs)  # a models folder given and unusable: an error naming the file


def resolved_mode(options: WanOptions) -> str:
    return mode_and_reason(options)[0]


def default_presets(mode: str) -> tuple[str, ...]:
    """The default matrix. A preset the card (or the memory cap) cannot hold under any residency policy is still
    collected, and skipped with the memory it would need (memory_skips)."""
    return DEFAULT_MATRIX


def memory_budget(options: WanOptions, mode: str) -> int | None:
    """What the matrix plans for: the cap, else the card's memory; None for tiny runs (a CPU) or no card."""
    if mode == "tiny":
        return None
    import torch

    if not torch.cuda.is_available():
        return options.memory_cap
    total = torch.cuda.get_device_properties(0).total_memory
    return total if options.memory_cap is None else min(options.memory_cap, total)


def memory_skips(cases, options: WanOptions, stock: bool = False) -> dict[str, str]:
    """Case id -> why it is skipped, for cases that fit no residency policy in the memory budget (stock cases:
    the stock diffusers pipeline keeps every model resident). A cap that no case fits is bad input: MemoryCapError
    naming the smallest cap the first case needs."""
    from wan_pipeline.plan.memory import MemoryCapError, plan_memory
    from wan_pipeline.plan.plan import make_plan

    if not cases:
        return {}
    budget = memory_budget(options, cases[0].mode)
    if budget is None:
        return {}
    unfit, errors = {}, []
    for case in cases:
        config = case.config.replace(residency="resident") if stock else case.config
        try:
            plan_memory(make_plan(config, case.mode), budget)
        except MemoryCapError as exc:
            unfit[case.id] = f"does not fit the memory budget: {exc}"
            errors.append(exc)
    if options.memory_cap is not None and len(unfit) == len(cases) and not stock:
        raise MemoryCapError(f"--wan-memory-cap: {errors[0]}")
    return unfit


def build_cases(options: WanOptions, config=None):
    from wan_pipeline.run.case import WanCase
    from wan_pipeline.run.models import resolve_run_precision

    if options.comfyui:
        from wan_pipeline.suite.comfyui import build_comfy_cases

        return build_comfy_cases(options, config)
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
                                                     memory_cap=options.memory_cap,
                                                     lora_rounding=options.lora_rounding)
                        cases.append(WanCase(resolve_run_precision(case_config, mode, options.models_dir), mode,
                                             reference=stock_reference_key(config, mode)))
    return cases


def stock_reference_key(config, mode: str) -> str | None:
    """The key linking a two-pass configuration's cases to the stock diffusers case of the same preset and mode."""
    return f"stock-diffusers:{config.name}:{mode}" if len(config.passes) == 2 else None


def stock_cases(cases):
    """One stock-diffusers case per reference the matrix names (bf16, default attention), carrying that key."""
    seen, out = set(), []
    for case in cases:
        if case.reference is not None and case.reference not in seen:
            seen.add(case.reference)
            cfg = case.config.replace(attention="sdpa", precision="bf16", compile=False, sequence_parallel=1)
            out.append(type(case)(cfg, case.mode, reference=case.reference))
    return out


# ---------------------------------------------------------------------------------------------------- references


@dataclass
class References:
    """Which collected test is the reference for a key, and which tests are measured against which key: filled from
    the cases at collection (a test marked `wan(reference=True)` is the reference of its case's key; one marked
    `wan(measured_against_reference=True)` is measured against it)."""

    reference: dict[str, str] = field(default_factory=dict)  # key -> node id of the reference test
    measured: dict[str, str] = field(default_factory=dict)  # node id -> key

    def add(self, item) -> None:
        case, marker = case_of(item), item.get_closest_marker("wan")
        if case is None or case.reference is None or marker is None:
            return
        if marker.kwargs.get("reference"):
            self.reference.setdefault(case.reference, item.nodeid)
        elif marker.kwargs.get("measured_against_reference"):
            self.measured[item.nodeid] = case.reference


def add_stock_speedups(benchmarks: list[dict], references: References) -> list[str]:
    """Give each measured generation (pytest-benchmark JSON, in place) the stock reference's median and its speed-up
    over it, when both ran; returns summary lines."""
    by_name = {b.get("fullname"): b for b in benchmarks}
    lines = []
    for nodeid, key in references.measured.items():
        bench, stock = by_name.get(nodeid), by_name.get(references.reference.get(key))
        if bench is None or stock is None:
            continue
        ref = stock["stats"]["median"]
        info = bench.setdefault("extra_info", {})
        info["stock_diffusers_seconds"] = ref
        info["speedup_vs_stock_diffusers"] = round(ref / bench["stats"]["median"], 3)
        lines.append(f"{bench['name']}: {info['speedup_vs_stock_diffusers']}x the stock diffusers pipeline "
                     f"({ref:.2f} s)")
    return lines


def case_of(item):
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    return callspec.params.get("wan_case") or callspec.params.get("wan_stock_case")

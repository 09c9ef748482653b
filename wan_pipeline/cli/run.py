"""`wan-bench plan` and `wan-bench run`: from a preset (or workflow file) to a plan, and to one generation."""

from __future__ import annotations

import argparse
import json
import os

from wan_pipeline.errors import WanBenchError
from wan_pipeline.plan.config import (ATTENTION_BACKENDS, LORA_ROUNDINGS, MODES, PRECISIONS, RESIDENCIES, RunConfig,
                                      compile_values, seed_value, vae_bands_value)
from wan_pipeline.plan.plan import Plan, make_plan
from wan_pipeline.plan.presets import PRESETS, get_preset


def _add_source_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="seed-832x1216-49f", help=f"preset name ({', '.join(PRESETS)})")
    src.add_argument("--workflow", metavar="FILE", help="a ComfyUI workflow file (UI or API format)")
    p.add_argument("--mode", choices=("auto",) + MODES, default="auto", help="model source (default: auto)")
    p.add_argument("--models", metavar="DIR", default=os.environ.get("WAN_MODELS_DIR"),
                   help="ComfyUI models folder or diffusers folder (default: $WAN_MODELS_DIR)")
    p.add_argument("--attention", choices=ATTENTION_BACKENDS, help="attention backend (default: the preset's)")
    p.add_argument("--precision", choices=PRECISIONS, help="compute precision (default: the preset's)")
    p.add_argument("--lora-rounding", choices=LORA_ROUNDINGS,
                   help="LoRA merged into fp8 weights: comfyui (default: its stochastic rounding, seeded per weight) "
                        "or nearest")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="regional torch.compile of the transformer blocks (default: $TORCH_COMPILE)")
    p.add_argument("--seed", type=seed_value, help="noise seed, 0 to 2**64-1 as in ComfyUI (default: the preset's)")
    p.add_argument("--residency", choices=RESIDENCIES,
                   help="what stays on the GPU (default auto: everything that fits)")
    p.add_argument("--vae-bands", type=vae_bands_value, metavar="N",
                   help="VAE in N bands of rows one after another, as ComfyUI's tiled VAE nodes (default 1)")
    p.add_argument("--memory-cap", type=_memory_size, metavar="SIZE", default=os.environ.get("WAN_MEMORY_CAP") or None,
                   help="plan for (and, in run, cap the CUDA allocator at) SIZE, emulating a smaller card's memory: "
                        "24GB = 24 x 10^9 bytes, 16GiB = 16 x 2^30 bytes (default: $WAN_MEMORY_CAP, else the card)")


def _memory_size(text: str) -> int:
    from wan_pipeline.plan.memory import MemoryCapError, parse_memory_size

    try:
        return parse_memory_size(text)
    except MemoryCapError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def configs_from_args(args: argparse.Namespace) -> list[RunConfig]:
    if args.workflow:
        from wan_pipeline.plan.comfy import load_workflow_configs, locate_input_image

        mode = mode_and_reason(args.mode, args.models, args.workflow)[0]
        configs = [locate_input_image(c, args.workflow, args.models, mode)
                   for c in load_workflow_configs(args.workflow)]
    else:
        configs = [get_preset(args.preset)]
    overrides = {}
    if args.attention:
        overrides["attention"] = args.attention
    if args.precision:
        overrides["precision"] = args.precision
    if getattr(args, "lora_rounding", None):
        overrides["lora_rounding"] = args.lora_rounding
    compile_flag = args.compile
    if compile_flag is None and os.environ.get("TORCH_COMPILE") is not None:
        values = compile_values(os.environ["TORCH_COMPILE"])  # a typo is an error here too, never a silent "off"
        if len(values) != 1:
            raise WanBenchError("TORCH_COMPILE=both crosses the suite's matrix; one run takes 0 or 1")
        compile_flag = values[0]
    if compile_flag is not None:
        overrides["compile"] = compile_flag
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.residency:
        overrides["residency"] = args.residency
    if args.vae_bands is not None:
        overrides["vae_bands"] = args.vae_bands
    if getattr(args, "memory_cap", None) is not None:
        overrides["memory_cap"] = args.memory_cap
    configs = [c.replace(**overrides) for c in configs]
    import warnings

    for config in configs:  # bounds checked where the values enter; geometry snapping warns where it is planned
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config.validate()
    return configs


def configure_plan_parser(p: argparse.ArgumentParser) -> None:
    _add_source_arguments(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON (stable keys)")


def format_plan(plan: Plan) -> str:
    lines = [
        f"{plan.config.name}: {plan.width}x{plan.height}, {plan.frames} frames at {plan.config.fps} fps, "
        f"seed {plan.config.seed}, mode {plan.mode}",
        f"  latent {list(plan.latent_shape)}, {plan.tokens} tokens, {plan.forwards} model forwards",
    ]
    if plan.scaled_from:
        w, h, n = plan.scaled_from
        lines.append(f"  tiny mode: reduced from {w}x{h}x{n}")
    for i, p in enumerate(plan.passes, 1):
        c = p.config
        lora = f"{c.lora_file} @ {c.lora_strength}" if c.lora_file else "no LoRA"
        lines.append(
            f"  pass {i} [{c.expert}] {c.model_file} + {lora}, shift {c.shift}, steps {c.start_at_step}..{c.end_at_step}"
            f" of {c.steps}, cfg {c.cfg}, {c.sampler}/{c.scheduler}, add_noise {c.add_noise}, "
            f"leftover noise {c.return_with_leftover_noise}"
        )
        lines.append(f"    sigmas {[round(s, 7) for s in p.sigmas]}  timesteps {[round(t, 4) for t in p.timesteps]}"
                     f"  forwards {p.forwards}")
    for i, s in enumerate(plan.handover_scales, 1):
        lines.append(f"  hand-over {i}->{i + 1}: latent x {s:.7f}")
    return "\n".join(lines)


def format_memory(plan: Plan) -> str:
    """What each residency policy needs for this plan (A14B estimates) and, with a cap, the one the run would use
    and its memory per stage; a cap nothing fits raises MemoryCapError naming the smallest cap."""
    from wan_pipeline.plan import memory

    cap = plan.config.memory_cap
    if cap is None:
        sizes = memory.a14b_component_bytes(fp8=plan.config.precision == "auto" or "fp8" in plan.config.precision)
        needs = memory.needs_for(sizes, plan.tokens, plan.width, plan.height)(plan.config.vae_bands)
        lines = ["  memory (A14B estimate; pass --memory-cap SIZE to check a card): "
                 + ", ".join(f"{k} {memory.format_bytes(v)}" for k, v in needs.items())]
        return "\n".join(lines)
    choice = memory.plan_memory(plan, cap)
    sizes = memory.a14b_component_bytes(fp8=plan.config.precision == "auto" or "fp8" in plan.config.precision)
    stages = memory.stage_needs(sizes, memory.working_memory(plan.tokens, plan.width, plan.height,
                                                             vae_bands=choice.vae_bands))[choice.policy]
    lines = [f"  memory cap {memory.format_bytes(cap)}: fits with residency {choice.policy}, VAE in "
             f"{choice.vae_bands} band(s); smallest cap for this preset {memory.format_bytes(choice.smallest_cap)}",
             "    per stage: " + ", ".join(f"{k} {memory.format_bytes(v)}" for k, v in stages.items()),
             "    every policy: " + ", ".join(f"{k} {memory.format_bytes(v)}" for k, v in choice.needs.items())]
    return "\n".join(lines)


def mode_and_reason(requested: str, models_dir: str | None, workflow: str | None = None) -> tuple[str, str]:
    """The model source and why; a models folder given to auto must be complete for the preset or the workflow's
    files (an error names what is missing)."""
    if requested != "auto":
        return requested, "--mode"
    from wan_pipeline.run.model_files import auto_mode  # no torch: planning needs no model

    configs = None
    if workflow and models_dir:
        from wan_pipeline.plan.comfy import load_workflow_configs

        configs = load_workflow_configs(workflow)
    return auto_mode(models_dir, configs)


def announce_mode(requested: str, models_dir: str | None, workflow: str | None = None) -> str:
    """Resolve the mode and say it on stderr, at the top of the command's output (stdout stays the result)."""
    import sys

    mode, reason = mode_and_reason(requested, models_dir, workflow)
    print(f"wan-bench: {mode} models ({reason})", file=sys.stderr, flush=True)
    return mode


def run_plan(args: argparse.Namespace) -> int:
    mode = announce_mode(args.mode, args.models, args.workflow)
    plans = [make_plan(c, mode) for c in configs_from_args(args)]
    if args.json:
        out = [p.to_json() for p in plans]
        if plans and plans[0].config.memory_cap is not None and mode != "tiny":
            from wan_pipeline.plan.memory import plan_memory

            for js, p in zip(out, plans):
                js["memory"] = plan_memory(p, p.config.memory_cap).to_json()
        print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    else:
        print("\n\n".join(format_plan(p) + ("" if mode == "tiny" else "\n" + format_memory(p)) for p in plans))
    return 0


def configure_run_parser(p: argparse.ArgumentParser) -> None:
    _add_source_arguments(p)
    p.add_argument("--out", metavar="DIR", default="wan-bench-out", help="where the video and record go")
    p.add_argument("--format", choices=("mp4", "webp"), default="mp4", help="video container")
    p.add_argument("--gpus", type=int, default=None,
                   help="sequence-parallel (Ulysses) generation over N local GPUs via torchrun, compared with the "
                        "one-GPU run of the same preset")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per run with --gpus (default 3)")
    p.add_argument("--comfyui", metavar="URL", default=os.environ.get("WAN_COMFYUI_URL"),
                   help="run the --workflow on this ComfyUI server (one generation; default: $WAN_COMFYUI_URL)")


def run_run(args: argparse.Namespace) -> int:
    from wan_pipeline.plan.config import default_allocator_settings

    if getattr(args, "comfyui", None):
        from wan_pipeline.cli.comfyui import run_on_server

        return run_on_server(args)
    default_allocator_settings()
    mode = announce_mode(args.mode, args.models, args.workflow)
    configs = configs_from_args(args)  # bad values are refused before torch is imported
    from wan_pipeline.run.pipeline import run_and_save

    if args.memory_cap is not None and args.gpus is not None:
        raise WanBenchError("--memory-cap runs on one GPU; the --gpus ranks are not capped: choose one")
    if args.memory_cap is not None:
        from wan_pipeline.run.memory import apply_memory_cap  # before anything is allocated on the card

        apply_memory_cap(args.memory_cap)
    if args.gpus is not None:
        return run_sequence_parallel_cli(args, configs, mode)
    kept: list[str] = []
    try:
        for config in configs:
            record = run_and_save(config, mode=mode, models_dir=args.models, out_dir=args.out,
                                  video_format=args.format, progress=True)
            kept += [str(record["video"]), str(record["record"])] if record.get("video") else [str(record["record"])]
            print(f"{config.name}: {record['total_seconds']:.2f} s ({mode}); video {record['video']}; "
                  f"record {record['record']}")
    except KeyboardInterrupt:
        from wan_pipeline.cli.main import Interrupted

        raise Interrupted(interrupt_message(kept, args.out)) from None
    return 0


def interrupt_message(kept: list[str], out: str) -> str:
    """The one line Ctrl-C leaves: what was kept (files are written atomically, so none is half-written)."""
    if kept:
        return (f"interrupted; kept {len(kept)} file(s) of the finished generation(s) in {out}: {', '.join(kept)}; "
                "the interrupted generation wrote nothing")
    return f"interrupted before any generation finished; nothing was written to {out}"


def run_sequence_parallel_cli(args: argparse.Namespace, configs: list[RunConfig], mode: str) -> int:
    from wan_pipeline.launch.torchrun import run_sequence_parallel

    if args.workflow or mode == "real":
        raise WanBenchError("--gpus runs presets in synthetic (or tiny) mode; workflows and real weights run on one GPU")
    config = configs[0]
    summary = run_sequence_parallel(preset=config.name, mode=mode, degree=args.gpus, precision=config.precision,
                                    attention=config.attention, rounds=args.rounds, out_dir=args.out)
    mem = ", ".join(f"{b / 2**30:.1f}" for b in summary["per_rank_peak_memory_bytes"])
    print(f"{config.name} ({mode}): 1 GPU {summary['single_gpu_seconds']:.2f} s, {args.gpus} GPUs "
          f"{summary['parallel_seconds']:.2f} s: {summary['speedup']}x, efficiency {summary['efficiency']}; "
          f"per-rank peak {mem} GiB; latent cosine vs 1 GPU {summary['latent_cosine_vs_single_gpu']:.5f}")
    return 0


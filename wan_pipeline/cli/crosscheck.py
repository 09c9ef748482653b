"""`wan-bench crosscheck --comfyui URL --workflow FILE --models DIR`: the same workflow, files and seed on a ComfyUI
server and in wan-bench's own pipeline, one warm-up and one timed generation each.

It answers two questions a user has before trusting the suite's numbers for their install: does wan-bench compute
what their ComfyUI computes (the cosine of the two final latents, read before the VAE: the server's through its own
SaveLatent node), and how do the two compare in time, stage by stage. The record goes to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from wan_pipeline.errors import WanBenchError
from wan_pipeline.plan.config import ATTENTION_BACKENDS, PRECISIONS, seed_value

COMMON_STAGES = ("text_encode", "image_encode", "pass1", "pass2", "decode")


def configure_crosscheck_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--comfyui", metavar="URL", default=os.environ.get("WAN_COMFYUI_URL"),
                   help="the ComfyUI server (default: $WAN_COMFYUI_URL)")
    p.add_argument("--workflow", metavar="FILE", required=True,
                   help="the workflow both sides run (UI or API format, the Wan 2.2 i2v two-pass graph)")
    p.add_argument("--models", metavar="DIR", default=os.environ.get("WAN_MODELS_DIR"),
                   help="the ComfyUI models folder with the files the server loads (default: $WAN_MODELS_DIR)")
    p.add_argument("--seed", type=seed_value, default=None,
                   help="noise seed of the timed generation, 0 to 2**64-1 as in ComfyUI (default: the workflow's)")
    p.add_argument("--attention", choices=ATTENTION_BACKENDS, default=None,
                   help="wan-bench's attention backend (default: sdpa, as ComfyUI without --use-sage-attention)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="wan-bench's precision (default: auto, what ComfyUI does with these files on this device)")
    p.add_argument("--out", metavar="DIR", default="wan-bench-out", help="where the record and both latents go")


def stage_ratios(server: dict[str, float], ours: dict[str, float]) -> dict[str, float | None]:
    """Server seconds over wan-bench seconds per stage both ran (None where either side spent no time: a stage the
    server found cached, such as the text encode of an unchanged prompt)."""
    return {s: (round(server[s] / ours[s], 4) if server.get(s) and ours.get(s) else None) for s in COMMON_STAGES}


def run_crosscheck(args: argparse.Namespace) -> int:
    from wan_pipeline.fsutil import atomic_write_json
    from wan_pipeline.measure.agreement import latent_agreement
    from wan_pipeline.plan.comfy import load_workflow_configs, locate_input_image

    if not args.comfyui:
        raise WanBenchError("crosscheck needs the server: --comfyui URL (or WAN_COMFYUI_URL)")
    if not args.models:
        raise WanBenchError("crosscheck needs the models folder the server loads from: --models DIR (or "
                            "WAN_MODELS_DIR); wan-bench reads the same files")
    config = locate_input_image(load_workflow_configs(args.workflow)[0], args.workflow, args.models, "real")
    seed = config.seed if args.seed is None else args.seed
    overrides = {"seed": seed}
    if args.attention:
        overrides["attention"] = args.attention
    if args.precision:
        overrides["precision"] = args.precision
    config = config.replace(**overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    server = server_side(args.comfyui, args.workflow, seed, out)  # first: a bad server fails before any model loads
    ours = wan_bench_side(config, args.models, out)
    agreement = latent_agreement(server.pop("latent"), ours.pop("latent"), ("ComfyUI", "wan-bench"))
    common = [s for s in COMMON_STAGES if server["stages"].get(s) and ours["stages"].get(s)]
    record = {
        "workflow": str(args.workflow),
        "seed": seed,
        "comfyui": server,
        "wan_bench": ours,
        "stage_ratio_comfyui_over_wan_bench": stage_ratios(server["stages"], ours["stages"]),
        "common_stages": common,
        "ratio_comfyui_over_wan_bench": round(sum(server["stages"][s] for s in common) /
                                              sum(ours["stages"][s] for s in common), 4) if common else None,
        "latent": agreement,
    }
    path = atomic_write_json(out / f"crosscheck-{config.name}-seed{seed}.json", record)
    print(format_crosscheck(record))
    print(f"record {path}")
    return 0


def server_side(url: str, workflow: str, seed: int, out: Path) -> dict:
    """One warm-up (another seed: the loads and encodes, cached afterwards as on a user's install) and the timed
    generation at `seed`, with the final latent saved by the server's SaveLatent node and fetched; then the server
    unloads its models (`/free`), so that wan-bench's side finds the card as free as the server did."""
    import time

    from safetensors.numpy import load as load_safetensors

    from wan_pipeline.fsutil import atomic_write_bytes
    from wan_pipeline.plan.comfy.api import node_stages, prompt_variant, with_saved_latent
    from wan_pipeline.run.comfyui.case import ServerSession, comfy_cases, stage_seconds
    from wan_pipeline.run.comfyui.client import ComfyClient, ComfyServerError

    session = ServerSession(ComfyClient(url))
    fingerprint = session.fingerprint()
    case = comfy_cases(workflow, session.object_info)[0]
    prompt, latent_node = with_saved_latent(session.prompt_for(case), workflow)
    session.client.run(prompt_variant(prompt, seed=seed + 1, source=workflow))
    execution = session.client.run(prompt_variant(prompt, seed=seed, source=workflow))
    saved = (session.client.history(execution.prompt_id).get("outputs") or {}).get(latent_node, {}).get("latents")
    if not saved:
        raise ComfyServerError(f"{url}: the SaveLatent node #{latent_node} added to {workflow} saved no latent")
    item = saved[0]
    data = session.client.view(item["filename"], item.get("subfolder", ""), item.get("type", "output"))
    target = atomic_write_bytes(out / f"comfyui-seed{seed}.latent", data)
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # the file as the server sent it: a bf16 latent numpy cannot hold, or not safetensors
        raise ComfyServerError(f"{url}: the saved latent {item['filename']} could not be read ({exc})") from None
    if "latent_tensor" not in tensors:
        raise ComfyServerError(f"{url}: {item['filename']} holds no 'latent_tensor' (keys {sorted(tensors)})")
    # the card goes to wan-bench's side next: a server on it would otherwise keep both experts loaded
    session.client.free()
    time.sleep(1.0)  # the server's worker applies /free when it wakes for it
    stages = {k: round(v, 6) for k, v in stage_seconds(execution, node_stages(prompt)).items()}
    return {"url": url, "version": fingerprint.get("version"), "launch_flags": fingerprint.get("launch_flags"),
            "seconds": round(execution.total_seconds, 6), "stages": stages,
            "cached_nodes": sorted(execution.cached, key=lambda n: (len(n), n)), "latent_file": str(target),
            "latent": tensors["latent_tensor"]}


def wan_bench_side(config, models_dir: str, out: Path) -> dict:
    """wan-bench's pipeline in real mode on the same files: one warm-up generation, then the timed one."""
    from wan_pipeline.plan.config import default_allocator_settings

    default_allocator_settings()  # before torch is imported, as `wan-bench run` does
    import torch
    from safetensors.torch import save as save_safetensors

    from wan_pipeline.fsutil import atomic_write_bytes
    from wan_pipeline.run.pipeline import generate, prepare

    plan, prepared = prepare(config, "real", models_dir)
    generate(prepared, plan)
    gen = generate(prepared, plan)
    latent = gen.latent.float().contiguous()
    # ComfyUI's own .latent layout (SaveLatent), so LoadLatent reads it back
    target = atomic_write_bytes(out / f"wan-bench-seed{config.seed}.latent", save_safetensors(
        {"latent_tensor": latent, "latent_format_version_0": torch.tensor([])}))
    return {"mode": "real", "precision": plan.config.precision, "attention": prepared.kernel.backend,
            "device": str(prepared.models.device), "seconds": round(gen.total_seconds, 6),
            "stages": {k: round(v, 6) for k, v in gen.seconds.items()}, "latent_file": str(target),
            "latent": latent.numpy()}


def format_crosscheck(record: dict) -> str:
    server, ours = record["comfyui"], record["wan_bench"]
    lines = [f"{record['workflow']} seed {record['seed']}: ComfyUI {server.get('version')} at {server['url']} "
             f"vs wan-bench ({ours['precision']}, {ours['attention']}, {ours['device']})",
             f"  {'stage':<14}{'ComfyUI s':>12}{'wan-bench s':>13}{'ratio':>8}"]
    for stage in COMMON_STAGES:
        a, b = server["stages"].get(stage), ours["stages"].get(stage)
        ratio = record["stage_ratio_comfyui_over_wan_bench"].get(stage)
        lines.append(f"  {stage:<14}{'cached' if not a else f'{a:.3f}':>12}{'-' if b is None else f'{b:.3f}':>13}"
                     f"{'-' if ratio is None else f'{ratio:.3f}':>8}")
    lines.append(f"  {'total':<14}{server['seconds']:>12.3f}{ours['seconds']:>13.3f}"
                 f"{'':>8}  (ComfyUI's total includes saving; loads were cached by the warm-up)")
    if record["ratio_comfyui_over_wan_bench"] is not None:
        lines.append(f"  over the stages both ran ({', '.join(record['common_stages'])}): ComfyUI / wan-bench = "
                     f"{record['ratio_comfyui_over_wan_bench']:.3f}")
    agreement = record["latent"]
    lines.append(f"  final latent {agreement['shape']}: cosine {agreement['cosine']:.6f}, max |diff| "
                 f"{agreement['max_abs_diff']:.4g}, relative L2 {agreement['relative_l2']:.4g}")
    return "\n".join(lines)

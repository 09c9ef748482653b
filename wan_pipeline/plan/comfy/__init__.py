"""ComfyUI workflow file -> run configurations: benchmark exactly the graph a user runs every day.

`load_workflow_configs(path)` reads a UI, UI-with-subgraphs or API file (`graph`), resolves every active
KSamplerAdvanced chain (`chains`, with ComfyMathExpression through the safe evaluator in `expr`) and returns one
RunConfig per chain; `workflow_matrix` adds the length and CFG variants, `locate_input_image` finds the LoadImage
file. Nothing here imports torch or the model code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path

from wan_pipeline.errors import WorkflowError
from wan_pipeline.plan.comfy.chains import WorkflowChain, _Resolver, _stem
from wan_pipeline.plan.comfy.graph import _Graph
from wan_pipeline.plan.config import RunConfig

MATRIX_LENGTHS = (49, 81, 161)
MATRIX_CFGS = (1.0, 3.5, 7.0)

# ---------------------------------------------------------------------------------------------------------------------
# Public API



def load_workflow_configs(path: str | os.PathLike) -> list[RunConfig]:
    """Read a ComfyUI workflow file (UI, UI with subgraphs, or API format): one RunConfig per active chain."""
    return [c.config for c in load_workflow_chains(path)]


def load_workflow_chains(path: str | os.PathLike) -> list[WorkflowChain]:
    """Like load_workflow_configs, with the sampler node ids and groups of each chain."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise WorkflowError(f"{source}: cannot read the workflow file ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise WorkflowError(f"{source}: not a JSON workflow file (not UTF-8 text: {exc.reason} at byte {exc.start})") \
            from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkflowError(f"{source}: not a JSON workflow file ({exc.msg} at line {exc.lineno} column {exc.colno})") \
            from None
    except RecursionError:
        raise WorkflowError(f"{source}: not a usable JSON workflow file (nested too deeply)") from None
    return workflow_chains(data, source, stem=_stem(source))


def configs_from_workflow(data: dict, source: str) -> list[RunConfig]:
    """The same from parsed JSON; ``source`` names the file in errors and gives the configuration names."""
    return [c.config for c in workflow_chains(data, source)]


def workflow_chains(data: object, source: str, stem: str | None = None) -> list[WorkflowChain]:
    graph = _Graph.build(data, source)
    return _Resolver(graph, source, stem if stem is not None else _stem(source)).chains()


def workflow_matrix(config: RunConfig) -> list[RunConfig]:
    """The workflow as it is, then variants at 49/81/161 frames and at CFG 1.0/3.5/7.0 (all passes).

    Names are stable: ``<name>``, ``<name>-81f``, ``<name>-cfg3.5``; a variant equal to the as-is configuration is left
    out (no duplicates).
    """
    out = [config]
    for n in MATRIX_LENGTHS:
        if n != config.length:
            out.append(config.replace(name=f"{config.name}-{n}f", length=n))
    for cfg in MATRIX_CFGS:
        if all(math.isclose(p.cfg, cfg) for p in config.passes):
            continue
        passes = tuple(dataclasses.replace(p, cfg=cfg) for p in config.passes)
        out.append(config.replace(name=f"{config.name}-cfg{cfg:.1f}", passes=passes))
    return out


def locate_input_image(config: RunConfig, workflow_path, models_dir: str | None, mode: str) -> RunConfig:
    """Find the workflow's LoadImage file the way a ComfyUI install would have it: next to the workflow, in the
    ComfyUI `input/` folder beside the models folder, in $WAN_INPUT_DIR, or as given. Missing in real mode is an
    error naming the folders searched; in synthetic and tiny mode (random weights, the video is noise) the run uses
    the built-in test card and says so."""
    if config.image is None:
        return config
    name = Path(config.image)
    folders = [Path(workflow_path).parent]
    if models_dir:
        models = Path(models_dir)
        folders += [models.parent / "input", models / "input", models.parent.parent / "input"]
    if os.environ.get("WAN_INPUT_DIR"):
        folders.append(Path(os.environ["WAN_INPUT_DIR"]))
    candidates = [name] if name.is_absolute() else [f / name for f in folders] + [name]
    for candidate in candidates:
        if candidate.is_file():
            return config.replace(image=str(candidate))
    searched = ", ".join(str(c.parent) for c in candidates)
    if mode == "real":
        raise WorkflowError(f"{workflow_path}: LoadImage file {config.image!r} was not found (searched {searched}); "
                            f"put it next to the workflow or set WAN_INPUT_DIR to ComfyUI's input folder")
    warnings.warn(f"{workflow_path}: LoadImage file {config.image!r} not found (searched {searched}); {mode} mode "
                  f"uses the built-in test card instead", stacklevel=2)
    return config.replace(image=None)

"""A workflow file as the prompt a ComfyUI server runs (`POST /prompt`), its variants, and its nodes' stages.

API-format files are posted as they are. UI and subgraph files are converted the way ComfyUI's frontend does it,
with the server's `/object_info` (pure data, passed in): each node's widget values map in order onto the inputs the
server lists as widgets (``input_order``), the extra value the frontend keeps after a ``control_after_generate`` seed
and after an ``image_upload`` combo is dropped, muted nodes are left out (and links from them dropped), bypassed and
Reroute nodes pass the input of the output's type through, legacy PrimitiveNode values go to their targets, and
subgraphs are flattened (inner ids ``<instance>:<inner>``, as ComfyUI's own export). Errors name the node.

Variants (`prompt_variant`) edit the graph: WanImageToVideo's ``length``, every sampler's ``cfg``, the noise seed.
`node_stages` maps each node onto the suite's stage names by class and graph position. Nothing here imports torch.
"""

from __future__ import annotations

import copy
import json
import os

from wan_pipeline.errors import WorkflowError
from wan_pipeline.plan.comfy.graph import MODE_ACTIVE, MODE_BYPASSED, MODE_MUTED, _Const, _Graph, _Link, _Missing

# Nodes that live in the frontend only (never posted).
FRONTEND_ONLY = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
LOADER_CLASSES = ("UNETLoader", "CLIPLoader", "VAELoader", "LoraLoaderModelOnly", "LoraLoader", "CLIPVisionLoader",
                  "CheckpointLoaderSimple", "DualCLIPLoader", "UnetLoaderGGUF", "CLIPLoaderGGUF")
SAMPLER_CLASSES = ("KSamplerAdvanced", "KSampler", "SamplerCustom", "SamplerCustomAdvanced")
DECODE_CLASSES = ("VAEDecode", "VAEDecodeTiled")
IMAGE_ENCODE_CLASSES = ("WanImageToVideo", "CLIPVisionEncode", "WanFirstLastFrameToVideo")
SEED_INPUTS = ("noise_seed", "seed")
SAVE_CLASSES = ("CreateVideo", "SaveVideo", "SaveWEBM", "SaveAnimatedWEBP", "SaveAnimatedPNG", "SaveImage",
                "VHS_VideoCombine")


def read_workflow_json(path: str | os.PathLike) -> object:
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8-sig") as f:
            return json.load(f)
    except OSError as exc:
        raise WorkflowError(f"{source}: cannot read the workflow file ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WorkflowError(f"{source}: not a JSON workflow file ({exc})") from None


def is_api_format(data: object) -> bool:
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "nodes" not in data:
        data = data["prompt"]
    return isinstance(data, dict) and bool(data) and all(isinstance(v, dict) and "class_type" in v
                                                         for v in data.values())


def to_api_prompt(data: object, object_info: dict, source: str) -> dict:
    """The API-format prompt of a workflow (parsed JSON): as it is for an API file, converted for a UI file."""
    if is_api_format(data):
        prompt = data["prompt"] if "nodes" not in data and isinstance(data.get("prompt"), dict) else data
        return copy.deepcopy(prompt)
    graph = _Graph.build(data, source)
    return _Converter(graph, object_info, source).prompt()


def _widget_inputs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of the inputs the frontend shows as widgets, in its order (required, then optional)."""
    inputs = info.get("input") or {}
    order = info.get("input_order") or {}
    out = []
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        for name in order.get(section) or list(specs):
            spec = specs.get(name)
            if not isinstance(spec, (list, tuple)) or not spec:
                continue
            kind = spec[0]
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                out.append((name, list(spec)))
    return out


def _extra_widget_values(spec: list) -> int:
    """How many values the frontend stores after this widget's own (its seed control, its upload button)."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    extra = 0
    if options.get("control_after_generate"):
        extra += 1
    if options.get("image_upload") or options.get("video_upload") or options.get("audio_upload"):
        extra += 1
    return extra


class _Converter:
    def __init__(self, graph: _Graph, object_info: dict, source: str):
        self.g = graph
        self.info = object_info
        self.source = source

    def err(self, node, message: str) -> WorkflowError:
        return WorkflowError(f"{self.source}: {node.describe()}: {message}")

    def prompt(self) -> dict:
        out = {}
        for nid, node in self.g.nodes.items():
            if node.mode in (MODE_MUTED, MODE_BYPASSED) or node.type in FRONTEND_ONLY or node.outputs_map is not None:
                continue
            if node.mode != MODE_ACTIVE:
                raise self.err(node, f"mode {node.mode} is not one ComfyUI runs (0 active, 2 muted, 4 bypassed)")
            info = self.info.get(node.type)
            if not isinstance(info, dict):
                raise self.err(node, "the server has no node of this class (a custom node package that is not "
                                     "installed there, or a misspelt type)")
            out[nid] = {"class_type": node.type, "inputs": self._inputs(node, info),
                        "_meta": {"title": node.type}}
        # links to nodes that are not posted (muted, or resolved to nothing) are dropped, as the frontend does
        for entry in out.values():
            for name, value in list(entry["inputs"].items()):
                if isinstance(value, list) and value[0] not in out:
                    del entry["inputs"][name]
        return out

    def _inputs(self, node, info: dict) -> dict:
        inputs = {}
        widgets = node.widgets
        if isinstance(widgets, dict):  # some custom nodes store widgets by name
            values = dict(widgets)
        else:
            values = {}
            seq = list(widgets) if isinstance(widgets, list) else []
            i = 0
            for name, spec in _widget_inputs(info):
                if i >= len(seq):
                    break
                values[name] = seq[i]
                i += 1 + _extra_widget_values(spec)
        for name, value in values.items():
            inputs[name] = value
        for name, src in node.inputs.items():
            resolved = self._source(src, node, name, set())
            if resolved is not None:
                inputs[name] = resolved
        return inputs

    def _source(self, src, node, name: str, seen: set):
        """An input's value: [node_id, slot] of the posted node behind it, a literal, or None (dropped)."""
        if isinstance(src, _Const):
            return src.value
        if isinstance(src, _Missing):
            raise self.err(node, f"input {name!r}: {src.why}")
        key = (src.node, src.slot)
        if key in seen:
            raise self.err(node, f"input {name!r}: a loop of bypassed or Reroute nodes")
        seen = seen | {key}
        origin = self.g.nodes.get(src.node)
        if origin is None:
            raise self.err(node, f"input {name!r} comes from node #{src.node}, which is not in the workflow")
        if origin.outputs_map is not None:  # a subgraph instance: whatever feeds its output slot inside
            inner = origin.outputs_map.get(src.slot)
            if inner is None:
                raise self.err(node, f"input {name!r}: {origin.describe()} ({origin.label}) has no output "
                                     f"{src.slot}")
            return self._source(inner, node, name, seen)
        if origin.mode == MODE_MUTED:
            return None
        if origin.type == "PrimitiveNode":
            values = origin.widgets if isinstance(origin.widgets, list) else []
            if not values:
                raise self.err(origin, "a primitive with no value")
            return values[0]
        if origin.type == "Reroute" or origin.mode == MODE_BYPASSED:
            through = self._pass_through(origin, src.slot)
            return None if through is None else self._source(through, node, name, seen)
        return [origin.id, src.slot]

    def _pass_through(self, origin, slot: int):
        """What a bypassed or Reroute node hands on at output ``slot``: its first input of that output's type (the
        same slot first, as the frontend), else nothing."""
        if origin.type == "Reroute":
            return next(iter(origin.inputs.values()), None)
        out_type = origin.out_types[slot] if slot < len(origin.out_types) else ""
        typed = [(n, t) for n, t in origin.in_types if n in origin.inputs]
        if slot < len(origin.in_types):
            n, t = origin.in_types[slot]
            if n in origin.inputs and (t == out_type or not out_type):
                return origin.inputs[n]
        for n, t in typed:
            if t == out_type:
                return origin.inputs[n]
        return None


# ---------------------------------------------------------------------------------------------------- variants


def _consumers(prompt: dict) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {nid: [] for nid in prompt}
    for nid, entry in prompt.items():
        for name, value in (entry.get("inputs") or {}).items():
            if _is_link(value) and str(value[0]) in out:
                out[str(value[0])].append((nid, name))
    return out


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) and not isinstance(value[1], bool)


def prompt_variant(prompt: dict, *, length: int | None = None, cfg: float | None = None, seed: int | None = None,
                   source: str = "the prompt") -> dict:
    """A copy of the prompt with WanImageToVideo's frame count, every sampler's CFG and the noise seed set.

    The seed goes to every sampler that adds noise (a later pass of a KSamplerAdvanced chain adds none: its seed is
    unused, and left alone). An edit with nowhere to go is an error naming what is missing."""
    out = copy.deepcopy(prompt)
    nodes = {nid: e for nid, e in out.items() if isinstance(e, dict)}
    if length is not None:
        targets = [e for e in nodes.values() if e.get("class_type") in IMAGE_ENCODE_CLASSES
                   and "length" in (e.get("inputs") or {})]
        if not targets:
            raise WorkflowError(f"{source}: no WanImageToVideo node with a 'length' input to set to {length}")
        for e in targets:
            if _is_link(e["inputs"]["length"]):
                raise WorkflowError(f"{source}: WanImageToVideo's 'length' comes from a link; the frame-count "
                                    f"variant needs a literal there")
            e["inputs"]["length"] = int(length)
    samplers = [e for e in nodes.values() if e.get("class_type") in SAMPLER_CLASSES]
    if (cfg is not None or seed is not None) and not samplers:
        raise WorkflowError(f"{source}: no sampler node (KSamplerAdvanced, KSampler) to edit")
    if cfg is not None:
        for e in samplers:
            if "cfg" in e.get("inputs", {}) and not _is_link(e["inputs"]["cfg"]):
                e["inputs"]["cfg"] = float(cfg)
    if seed is not None:
        noisy = [e for e in samplers if e["inputs"].get("add_noise", "enable") in ("enable", True)]
        for e in noisy or samplers[:1]:
            for name in SEED_INPUTS:
                if name in e["inputs"] and not _is_link(e["inputs"][name]):
                    e["inputs"][name] = int(seed)
        for e in nodes.values():  # SamplerCustomAdvanced takes its noise from RandomNoise
            if e.get("class_type") == "RandomNoise" and not _is_link(e["inputs"].get("noise_seed")):
                e["inputs"]["noise_seed"] = int(seed)
    return out


def node_stages(prompt: dict) -> dict[str, str]:
    """Each node's stage: ``load`` (model loaders, apart), ``text_encode``, ``image_encode``, ``pass1``, ``pass2`` ...
    (samplers in chain order), ``decode``, ``save`` (video assembly and file), else ``other``.

    Text encode is any node whose output reaches a WanImageToVideo (or sampler) conditioning input without passing a
    sampler or the image encode (a CLIPTextEncode or a custom conditioning node alike)."""
    consumers = _consumers(prompt)
    stages: dict[str, str] = {}
    sampler_ids = [nid for nid, e in prompt.items() if e.get("class_type") in SAMPLER_CLASSES]

    def upstream_samplers(nid: str, seen: set) -> int:
        depth = 0
        for value in (prompt[nid].get("inputs") or {}).values():
            if _is_link(value) and str(value[0]) in prompt and str(value[0]) not in seen:
                parent = str(value[0])
                d = upstream_samplers(parent, seen | {parent})
                depth = max(depth, d + (1 if prompt[parent].get("class_type") in SAMPLER_CLASSES else 0))
        return depth

    for nid in sampler_ids:
        stages[nid] = f"pass{upstream_samplers(nid, {nid}) + 1}"
    for nid, entry in prompt.items():
        cls = entry.get("class_type")
        if nid in stages:
            continue
        if cls in LOADER_CLASSES:
            stages[nid] = "load"
        elif cls in DECODE_CLASSES:
            stages[nid] = "decode"
        elif cls in IMAGE_ENCODE_CLASSES:
            stages[nid] = "image_encode"
        elif cls in SAVE_CLASSES:
            stages[nid] = "save"
    conditioning_inputs = ("positive", "negative")
    for nid, entry in prompt.items():
        if nid in stages:
            continue
        targets = consumers.get(nid, [])
        if any(n in conditioning_inputs and stages.get(c) in ("image_encode",) or
               (n in conditioning_inputs and str(stages.get(c, "")).startswith("pass")) for c, n in targets):
            stages[nid] = "text_encode"
        else:
            stages[nid] = "other"
    return stages


def sampler_steps(prompt: dict) -> int:
    """Sampler steps one generation runs (what drives a progress bar): each sampler's end - start."""
    total = 0
    for e in prompt.values():
        if e.get("class_type") not in SAMPLER_CLASSES:
            continue
        inp = e.get("inputs") or {}
        steps = inp.get("steps")
        if not isinstance(steps, int):
            continue
        start = inp.get("start_at_step", 0)
        end = inp.get("end_at_step", steps)
        start = start if isinstance(start, int) else 0
        end = min(end if isinstance(end, int) else steps, steps)
        total += max(0, end - start)
    return total


def prompt_matrix(prompt: dict, name: str, lengths=(49, 81, 161), cfgs=(1.0, 3.5, 7.0)) \
        -> list[tuple[str, int | None, float | None]]:
    """The workflow matrix read from the prompt itself, for graphs the plan layer cannot resolve into a run
    configuration (a custom node in the chain): ``(name, length or None, cfg or None)`` for the graph as it is, its
    frame-count variants and its CFG variants, with the names and the duplicate rule of `workflow_matrix`."""
    length = next((e["inputs"]["length"] for e in prompt.values() if e.get("class_type") in IMAGE_ENCODE_CLASSES
                   and isinstance((e.get("inputs") or {}).get("length"), int)), None)
    if length is None:
        raise WorkflowError(f"{name}: no WanImageToVideo node with a literal 'length': not an image-to-video graph "
                            f"the matrix can vary")
    now = {e["inputs"]["cfg"] for e in prompt.values() if e.get("class_type") in SAMPLER_CLASSES
           and isinstance((e.get("inputs") or {}).get("cfg"), (int, float))}
    out: list[tuple[str, int | None, float | None]] = [(name, None, None)]
    out += [(f"{name}-{n}f", n, None) for n in lengths if n != length]
    out += [(f"{name}-cfg{c:.1f}", None, c) for c in cfgs if not (now and all(abs(v - c) < 1e-9 for v in now))]
    return out


LATENT_PREFIX = "wan-bench/final"


def with_saved_latent(prompt: dict, source: str = "the prompt") -> tuple[dict, str]:
    """A copy of the prompt that also saves the final latent (what the decode node receives) with ComfyUI's own
    SaveLatent node, and that node's id: how a cross-check reads the server's result before the VAE.

    The final latent is the `samples` input of the decode node; a graph with no decode node, or with several fed
    from different latents, is an error naming them."""
    decodes = {nid: e for nid, e in prompt.items() if isinstance(e, dict) and e.get("class_type") in DECODE_CLASSES}
    links = {tuple(e["inputs"]["samples"]) for e in decodes.values() if _is_link((e.get("inputs") or {}).get("samples"))}
    if not links:
        raise WorkflowError(f"{source}: no VAEDecode node with a latent input: nothing marks the final latent")
    if len(links) > 1:
        raise WorkflowError(f"{source}: decode nodes {', '.join(sorted(decodes))} take different latents; the "
                            f"cross-check needs one final latent")
    out = copy.deepcopy(prompt)
    numeric = [int(n) for n in out if str(n).isdigit()]
    node_id = str(max(numeric, default=0) + 1)
    out[node_id] = {"class_type": "SaveLatent", "_meta": {"title": "wan-bench: final latent"},
                    "inputs": {"samples": list(next(iter(links))), "filename_prefix": LATENT_PREFIX}}
    return out, node_id

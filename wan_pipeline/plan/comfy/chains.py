"""The active sampling chains of a flattened workflow graph, each resolved to a run configuration.

Resolution starts at every active KSamplerAdvanced. A pass whose ``latent_image`` comes from WanImageToVideo starts a
chain; the pass fed by its LATENT output follows, and so on. From each pass the model input is followed back through
ModelSamplingSD3 and LoraLoaderModelOnly to UNETLoader; WanImageToVideo's inputs lead to CLIPTextEncode (CLIPLoader),
VAELoader and LoadImage. Widget values resolve through links, PrimitiveInt/Float/Boolean/String, ComfySwitchNode and
ComfyMathExpression (a small ast evaluator; never ``eval``). Reroute nodes and bypassed nodes pass their input of the
output's type through; a muted node never runs, and a chain that needs one is dead (ComfyUI drops it). A chain whose
final latent reaches no output node does not run in ComfyUI either, and is dead too.

ComfyUI facts this module relies on (read from ComfyUI, not copied):

- Without ModelSamplingSD3 a Wan model samples with its built-in shift, 8.0 (``sampling_settings`` of ``WAN21_T2V``,
  which the i2v models inherit): ``DEFAULT_WAN_SHIFT``. With several ModelSamplingSD3 nodes, the one nearest the
  sampler wins (each patch replaces the model's sampling object).
- LoraLoaderModelOnly with ``strength_model == 0`` returns the model unchanged: recorded as no LoRA.
- ComfyMathExpression returns ``float(result)`` (slot 0), ``int(result)`` (slot 1, truncation) and, in newer builds,
  ``bool(result)`` (slot 2); names ``a``, ``b``, ... are its ``values.*`` inputs; functions are a fixed whitelist.
- ComfySwitchNode returns ``on_true if switch else on_false`` (lazily: the other branch never runs).

Nothing here imports torch or the model code.
"""

from __future__ import annotations

import collections
import math
import os
import re
import warnings
from dataclasses import dataclass

from wan_pipeline.errors import WorkflowError
from wan_pipeline.plan.comfy.expr import _MATH_FUNCTIONS, _ExprError, _safe_eval
from wan_pipeline.plan.comfy.graph import (_CONTROL_WIDGET, MODE_ACTIVE, MODE_BYPASSED, MODE_MUTED, PRIMITIVE_TYPES,
                                           WIDGET_NAMES, _Const, _Graph, _Link, _Missing, _Node)
from wan_pipeline.plan.config import SAMPLERS, SCHEDULERS, WEIGHT_DTYPES, ConfigError, PassConfig, RunConfig

DEFAULT_WAN_SHIFT = 8.0  # ComfyUI's built-in shift for Wan models (used when no ModelSamplingSD3 is in the chain)
DEFAULT_FPS = 16  # when no video node names a frame rate
# Video nodes that carry the frame rate, and the name of that input.
FPS_NODES = {"CreateVideo": "fps", "SaveAnimatedWEBP": "fps", "SaveAnimatedPNG": "fps", "SaveWEBM": "fps",
             "VHS_VideoCombine": "frame_rate"}
# Output nodes: what ComfyUI executes (with everything they depend on).
OUTPUT_NODES = ("SaveVideo", "SaveWEBM", "SaveAnimatedWEBP", "SaveAnimatedPNG", "SaveImage", "PreviewImage",
                "VHS_VideoCombine", "SaveLatent", "PreviewAny")
# Known nodes that are not outputs: a latent that only reaches these is never used. Unknown (custom) nodes downstream
# count as possible outputs, so a custom save node keeps its chain alive.
TRANSIT_NODES = ("VAEDecode", "VAEDecodeTiled", "CreateVideo", "Reroute", "KSamplerAdvanced", "KSampler",
                 "ComfySwitchNode", "Note", "MarkdownNote", "LatentUpscale", "LatentUpscaleBy", "ImageScale",
                 "ImageScaleBy", "GetVideoComponents")

@dataclass(frozen=True)
class WorkflowChain:
    """One independent active sampling chain of a workflow and the configuration it runs."""

    config: RunConfig
    sampler_ids: tuple[str, ...]  # KSamplerAdvanced node ids in execution order
    groups: tuple[str, ...]  # titles of the groups holding nodes this chain uses (sorted)



class _Dead(Exception):
    """The chain needs a node that never runs (muted, or a bypassed node with nothing to pass through)."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


class _Resolver:
    def __init__(self, graph: _Graph, source: str, stem: str):
        self.g = graph
        self.source = source
        self.stem = stem
        self._stack: list = []
        self.used: set = set()
        self._consumers: dict | None = None

    # -- errors --------------------------------------------------------------------------------------------------

    def err(self, node: _Node | None, message: str) -> WorkflowError:
        if node is None:
            return WorkflowError(f"{self.source}: {message}")
        return WorkflowError(f"{self.source}: {node.describe()}: {message}")

    # -- graph walking -------------------------------------------------------------------------------------------

    def node(self, nid: str, wanted_by: str) -> _Node:
        n = self.g.nodes.get(nid)
        if n is None:
            raise WorkflowError(f"{self.source}: {wanted_by} is linked to node #{nid}, which does not exist")
        return n

    def producer(self, src, wanted_by: str, out_type: str = ""):
        """Follow a source through reroutes, bypassed nodes, switches and subgraph boundaries.

        Returns (_Node, slot) of the node that really produces the value, or _Const. Raises _Dead.
        """
        seen = set()
        while True:
            if isinstance(src, _Const):
                return src
            if isinstance(src, _Missing):
                raise WorkflowError(f"{self.source}: {src.why}; expected a link to an existing node output")
            if src is None:
                raise _Dead(f"{wanted_by} is not connected")
            key = (src.node, src.slot)
            if key in seen or key in self._stack:
                n = self.g.nodes.get(src.node)
                raise WorkflowError(f"{self.source}: {n.describe() if n else '#' + src.node}: the links form a cycle "
                                    f"(reached again while resolving {wanted_by}); expected an acyclic graph")
            seen.add(key)
            n = self.node(src.node, wanted_by)
            self.used.add(n.id)
            if n.mode == MODE_MUTED:
                raise _Dead(f"{n.describe()} is muted (mode 2) and never runs")
            if n.mode not in (MODE_ACTIVE, MODE_BYPASSED):
                raise self.err(n, f"unknown mode {n.mode}; expected 0 (active), 2 (muted) or 4 (bypassed)")
            if src.slot < 0:
                raise self.err(n, f"{wanted_by} uses output slot {src.slot}; expected a slot >= 0")
            if n.mode == MODE_BYPASSED:
                src = self._bypass_input(n, src.slot, wanted_by, out_type)
                continue
            if n.outputs_map is not None:  # subgraph instance
                if src.slot not in n.outputs_map:
                    raise self.err(n, f"{wanted_by} uses output slot {src.slot} of {n.label}, which has no such "
                                      f"connected output")
                src = n.outputs_map[src.slot]
                continue
            if n.type == "Reroute":
                src = n.inputs.get("") if "" in n.inputs else next(iter(n.inputs.values()), None)
                if src is None:
                    raise _Dead(f"{n.describe()} has no input")
                continue
            if n.type == "ComfySwitchNode":
                if src.slot != 0:
                    raise self.err(n, f"{wanted_by} uses output slot {src.slot}; expected slot 0 (output)")
                on = self.param_bool(n, "switch")
                branch, other = ("on_true", "on_false") if on else ("on_false", "on_true")
                if branch in n.inputs:
                    src = n.inputs[branch]
                elif other in n.inputs:
                    src = n.inputs[other]  # newer ComfyUI: a switch with one input connected passes that one
                else:
                    raise _Dead(f"{n.describe()}: neither on_true nor on_false is connected")
                continue
            if n.type == "PrimitiveNode":  # legacy frontend primitive: its value is its first widget
                return _Const(self.widget(n, "value"))
            return n, src.slot

    def _bypass_input(self, n: _Node, slot: int, wanted_by: str, out_type: str):
        """A bypassed node passes through its input of the output's type (same slot first, then the first match)."""
        t = n.out_types[slot] if slot < len(n.out_types) else out_type
        if not t:
            raise _Dead(f"{n.describe()} is bypassed and its output {slot} has no type to pass through")

        def matches(in_type: str) -> bool:
            return in_type == t or t in in_type.split(",")

        candidates = []
        if slot < len(n.in_types) and matches(n.in_types[slot][1]):
            candidates.append(n.in_types[slot][0])
        candidates += [name for name, it in n.in_types if matches(it)]
        for name in candidates:
            if name in n.inputs:
                return n.inputs[name]
        raise _Dead(f"{n.describe()} is bypassed (mode 4) and has no connected {t} input to pass through")

    def consumers(self) -> dict:
        if self._consumers is None:
            c: dict = {}
            for n in self.g.nodes.values():
                for name, src in n.inputs.items():
                    if isinstance(src, _Link):
                        c.setdefault(src.node, []).append((n.id, name, src.slot))
                if n.outputs_map:
                    for slot, src in n.outputs_map.items():
                        if isinstance(src, _Link):
                            # consumers of the instance's output slot consume the inner node
                            for cid, cname, cslot in [(x, y, z) for x, y, z in self._direct(n.id) if z == slot]:
                                c.setdefault(src.node, []).append((cid, cname, src.slot))
            self._consumers = c
        return self._consumers

    def _direct(self, nid: str) -> list:
        return [(m.id, name, s.slot) for m in self.g.nodes.values() for name, s in m.inputs.items()
                if isinstance(s, _Link) and s.node == nid]

    # -- values --------------------------------------------------------------------------------------------------

    def widget(self, n: _Node, name: str):
        w = n.widgets
        if isinstance(w, dict):
            if name in w:
                return w[name]
            raise self.err(n, f"has no value for {name!r}")
        names = WIDGET_NAMES.get(n.type)
        if names is None or not isinstance(w, list):
            raise self.err(n, f"has no widget value for {name!r} (widgets_values: {w!r:.80})")
        if _CONTROL_WIDGET in names and len(w) == len(names) - 1:
            names = tuple(x for x in names if x != _CONTROL_WIDGET)  # older exports without the UI-only widget
        if name not in names:
            raise self.err(n, f"has no widget {name!r}")
        i = names.index(name)
        if i >= len(w):
            raise self.err(n, f"widgets_values has {len(w)} entries, expected {name!r} at position {i} "
                              f"(order: {', '.join(names)})")
        return w[i]

    def param(self, n: _Node, name: str):
        """A widget-or-input value: a linked input resolves through the graph, else the node's widget value."""
        if name in n.inputs:
            return self.value(n.inputs[name], f"{n.describe()} input {name!r}")
        if self.g.format == "api":
            raise self.err(n, f"input {name!r} is missing")
        return self.widget(n, name)

    def value(self, src, wanted_by: str):
        p = self.producer(src, wanted_by)
        if isinstance(p, _Const):
            return p.value
        n, slot = p
        key = (n.id, slot)
        if key in self._stack:
            raise self.err(n, f"the links form a cycle (while resolving {wanted_by}); expected an acyclic graph")
        self._stack.append(key)
        try:
            if n.type in PRIMITIVE_TYPES:
                return self.param(n, "value")
            if n.type == "ComfyMathExpression":
                return self._math(n, slot)
        finally:
            self._stack.pop()
        raise self.err(n, f"feeds {wanted_by}; expected a value wan-bench can resolve without running the graph "
                          f"(a widget, {', '.join(PRIMITIVE_TYPES)}, ComfySwitchNode or ComfyMathExpression)")

    def _math(self, n: _Node, slot: int):
        expr = self.param(n, "expression")
        if not isinstance(expr, str) or not expr.strip():
            raise self.err(n, f"expression {expr!r:.80}: expected a non-empty math expression")
        names = {}
        for key in n.inputs:
            if key.startswith("values."):
                v = self.param(n, key)
                if isinstance(v, bool) or isinstance(v, (int, float)):
                    names[key[len("values."):]] = v
                else:
                    raise self.err(n, f"input {key!r} is {v!r:.60}; expected a number")
        try:
            result = _safe_eval(expr, names)
        except _ExprError as exc:
            raise self.err(n, f"cannot evaluate {expr!r:.100}: {exc}; expected arithmetic on a, b, ... with "
                              f"{', '.join(sorted(_MATH_FUNCTIONS))}") from None
        if slot == 0:
            return float(result)
        if slot == 1:
            return int(result)
        if slot == 2:
            return bool(result)
        raise self.err(n, f"has no output slot {slot}; expected 0 (FLOAT), 1 (INT) or 2 (BOOL)")

    def _typed(self, n: _Node, name: str, kind: str):
        v = self.param(n, name)
        if kind == "int":
            if isinstance(v, bool):
                pass
            elif isinstance(v, int):
                return v
            elif isinstance(v, float) and v.is_integer():
                return int(v)
            raise self.err(n, f"{name} is {v!r:.60}; expected an integer")
        if kind == "float":
            if not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v):
                return float(v)
            raise self.err(n, f"{name} is {v!r:.60}; expected a finite number")
        if kind == "str":
            if isinstance(v, str):
                return v
            raise self.err(n, f"{name} is {v!r:.60}; expected a string")
        if kind == "enable":
            if v in ("enable", "disable"):
                return v == "enable"
            if isinstance(v, bool):
                return v
            raise self.err(n, f"{name} is {v!r:.60}; expected 'enable' or 'disable'")
        raise AssertionError(kind)

    def param_bool(self, n: _Node, name: str) -> bool:
        v = self.param(n, name)
        if isinstance(v, bool):
            return v
        if isinstance(v, (int, float)) and v in (0, 1):
            return bool(v)
        raise self.err(n, f"{name} is {v!r:.60}; expected a boolean")

    def expect(self, src, wanted_by: str, types: tuple, out_type: str = "") -> tuple:
        p = self.producer(src, wanted_by, out_type)
        if isinstance(p, _Const):
            raise WorkflowError(f"{self.source}: {wanted_by} is the literal {p.value!r:.60}; expected a link from "
                                f"{' or '.join(types)}")
        n, slot = p
        if n.type not in types:
            raise self.err(n, f"feeds {wanted_by}; expected {' or '.join(types)} (unsupported node type inside a "
                              f"sampling chain)")
        return n, slot

    # -- chains --------------------------------------------------------------------------------------------------

    def chains(self) -> list[WorkflowChain]:
        samplers = [n for n in self.g.nodes.values() if n.type == "KSamplerAdvanced" and n.mode == MODE_ACTIVE]
        if not samplers:
            others = [n for n in self.g.nodes.values()
                      if n.mode == MODE_ACTIVE and n.type in ("KSampler", "SamplerCustom", "SamplerCustomAdvanced")]
            if others:
                raise self.err(others[0], "is not supported; expected the Wan 2.2 image-to-video two-pass graph "
                                          "built from KSamplerAdvanced nodes")
            raise self.err(None, "not a Wan image-to-video workflow: no active KSamplerAdvanced node "
                                 f"(node types found: {', '.join(sorted({n.type for n in self.g.nodes.values()})) or 'none'})")
        dead: dict[str, str] = {}
        prev_of: dict[str, str | None] = {}
        for s in samplers:
            try:
                n, slot = self.expect(s.inputs.get("latent_image"), f"{s.describe()} input 'latent_image'",
                                      ("WanImageToVideo", "KSamplerAdvanced"), "LATENT")
            except _Dead as d:
                dead[s.id] = d.why
                continue
            if n.type == "WanImageToVideo":
                if slot != 2:
                    raise self.err(n, f"output {slot} feeds {s.describe()} latent_image; expected output 2 (latent)")
                prev_of[s.id] = None
            else:
                prev_of[s.id] = n.id
        nexts: dict[str, list] = {}
        for sid, prev in prev_of.items():
            if prev is not None:
                nexts.setdefault(prev, []).append(sid)
        for prev, followers in nexts.items():
            if len(followers) > 1:
                ids = ", ".join(f"#{f}" for f in sorted(followers))
                raise self.err(self.g.nodes[prev], f"feeds several KSamplerAdvanced nodes ({ids}): ambiguous; "
                                                   f"expected one chain per WanImageToVideo latent")
        roots = sorted((sid for sid, prev in prev_of.items() if prev is None), key=_id_key)
        results = []
        reasons = [f"{self.g.nodes[sid].describe()}: {why}" for sid, why in dead.items()]
        for root in roots:
            order = [root]
            while order[-1] in nexts:
                nxt = nexts[order[-1]][0]
                if nxt in order:
                    raise self.err(self.g.nodes[nxt], "the sampling passes form a cycle; expected an acyclic graph")
                order.append(nxt)
            self.used = set()
            try:
                config, used = self._chain_config(order)
            except _Dead as d:
                reasons.append(f"chain from {self.g.nodes[root].describe()}: {d.why}")
                continue
            groups = sorted({g for nid in used for g in self.g.nodes[nid].groups})
            results.append((order, config, tuple(groups)))
        if not results:
            detail = "; ".join(reasons) if reasons else "no KSamplerAdvanced takes its latent from WanImageToVideo"
            raise self.err(None, f"no runnable Wan image-to-video sampling chain ({detail})")
        named = []
        base = f"wf-{self.stem}"
        suffixes = self._suffixes(results) if len(results) > 1 else [""]
        for (order, config, groups), suffix in zip(results, suffixes):
            name = base + (f"-{suffix}" if suffix else "")
            named.append(WorkflowChain(config.replace(name=name), tuple(order), groups))
        return named

    def _suffixes(self, results) -> list[str]:
        outer = []
        for order, _, _ in results:
            gs = self.g.nodes[order[0]].groups
            outer.append(_slug(gs[0]) if gs else "")
        if all(outer) and len(set(outer)) == len(outer):
            return outer
        return [f"ks{_slug(order[0])}" for order, _, _ in results]

    def _chain_config(self, order: list[str]) -> tuple[RunConfig, set]:
        nodes = [self.g.nodes[sid] for sid in order]
        first = nodes[0]
        self.used.update(order)
        downstream = self._downstream(nodes[-1])
        if not self._reaches_output(downstream):  # first: a chain ComfyUI never runs is not checked further
            raise _Dead(f"the output of {nodes[-1].describe()} reaches no output node "
                        f"({', '.join(OUTPUT_NODES[:4])}, ...), so ComfyUI never runs this chain")
        wan, _ = self.expect(first.inputs.get("latent_image"), f"{first.describe()} input 'latent_image'",
                             ("WanImageToVideo",), "LATENT")
        for s in nodes:
            for name, slot in (("positive", 0), ("negative", 1)):
                n, got = self.expect(s.inputs.get(name), f"{s.describe()} input {name!r}", ("WanImageToVideo",),
                                     "CONDITIONING")
                if n.id != wan.id or got != slot:
                    raise self.err(s, f"input {name!r} comes from {n.describe()} output {got}; expected "
                                      f"{wan.describe()} output {slot} ({name}), the node that makes the latent")
        passes = tuple(self._pass(s, i) for i, s in enumerate(nodes))
        # WanImageToVideo: geometry, prompts, VAE, start image.
        width = self._typed(wan, "width", "int")
        height = self._typed(wan, "height", "int")
        length = self._typed(wan, "length", "int")
        batch = self._typed(wan, "batch_size", "int")
        prompt, te_pos = self._text(wan, "positive")
        negative, te_neg = self._text(wan, "negative")
        if te_pos != te_neg:
            raise self.err(wan, f"positive and negative prompts use different text encoders ({te_pos!r} and "
                                f"{te_neg!r}); expected one CLIPLoader")
        vae, _ = self.expect(wan.inputs.get("vae"), f"{wan.describe()} input 'vae'", ("VAELoader",), "VAE")
        vae_file = self._typed(vae, "vae_name", "str")
        image = None
        if "start_image" in wan.inputs:
            try:
                img, _ = self.expect(wan.inputs["start_image"], f"{wan.describe()} input 'start_image'",
                                     ("LoadImage",), "IMAGE")
                image = self._typed(img, "image", "str")
            except _Dead:
                image = None  # the optional start image is dropped; ComfyUI runs without it
        seed = next((self._typed(s, "noise_seed", "int") for s, p in zip(nodes, passes) if p.add_noise), 0)
        fps = self._fps(downstream)
        config = RunConfig(name=f"wf-{self.stem}", passes=passes, width=width, height=height, length=length, fps=fps,
                           seed=seed, batch_size=batch, image=image, prompt=prompt, negative_prompt=negative,
                           text_encoder_file=te_pos, vae_file=vae_file)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # geometry snapping warns again where the run is planned
                config.validate()
        except ConfigError as exc:
            raise self.err(wan, f"{exc}; expected a runnable geometry") from None
        return config, set(self.used)

    def _text(self, wan: _Node, name: str) -> tuple[str, str]:
        enc, _ = self.expect(wan.inputs.get(name), f"{wan.describe()} input {name!r}", ("CLIPTextEncode",),
                             "CONDITIONING")
        text = self._typed(enc, "text", "str")
        clip, _ = self.expect(enc.inputs.get("clip"), f"{enc.describe()} input 'clip'", ("CLIPLoader",), "CLIP")
        clip_file = self._typed(clip, "clip_name", "str")
        try:
            ctype = self.param(clip, "type")
        except WorkflowError:
            ctype = "wan"  # older exports without the type widget
        if ctype != "wan":
            raise self.err(clip, f"type is {ctype!r:.40}; expected 'wan' (the UMT5-XXL text encoder of Wan)")
        return text, clip_file

    def _pass(self, s: _Node, index: int) -> PassConfig:
        add_noise = self._typed(s, "add_noise", "enable")
        steps = self._typed(s, "steps", "int")
        cfg = self._typed(s, "cfg", "float")
        sampler = self._typed(s, "sampler_name", "str")
        scheduler = self._typed(s, "scheduler", "str")
        start = self._typed(s, "start_at_step", "int")
        end = self._typed(s, "end_at_step", "int")
        leftover = self._typed(s, "return_with_leftover_noise", "enable")
        if add_noise:
            self._typed(s, "noise_seed", "int")
        if sampler not in SAMPLERS:
            raise self.err(s, f"sampler_name {sampler!r:.60} is not supported; expected one of {', '.join(SAMPLERS)}")
        if scheduler not in SCHEDULERS:
            raise self.err(s, f"scheduler {scheduler!r:.60} is not supported; expected one of {', '.join(SCHEDULERS)}")
        # The model chain: ModelSamplingSD3 / LoraLoaderModelOnly (any order) down to UNETLoader.
        shift = None
        lora_file, lora_strength = None, 0.0
        src, wanted = s.inputs.get("model"), f"{s.describe()} input 'model'"
        visited = set()
        while True:
            m, _ = self.expect(src, wanted, ("ModelSamplingSD3", "LoraLoaderModelOnly", "UNETLoader"), "MODEL")
            if m.id in visited:
                raise self.err(m, f"the model links of {s.describe()} form a cycle; expected a chain ending in "
                                  f"UNETLoader")
            visited.add(m.id)
            if m.type == "UNETLoader":
                model_file = self._typed(m, "unet_name", "str")
                has_dtype = "weight_dtype" in m.inputs or (
                    isinstance(m.widgets, dict) and "weight_dtype" in m.widgets) or (
                    isinstance(m.widgets, list) and len(m.widgets) > 1)
                weight_dtype = self._typed(m, "weight_dtype", "str") if has_dtype else "default"
                if weight_dtype not in WEIGHT_DTYPES:
                    raise self.err(m, f"weight_dtype {weight_dtype!r:.60} is not one of {', '.join(WEIGHT_DTYPES)}")
                break
            if m.type == "ModelSamplingSD3":
                value = self._typed(m, "shift", "float")
                if shift is None:
                    shift = value  # the patch nearest the sampler is the one that samples
            else:
                strength = self._typed(m, "strength_model", "float")
                name = self._typed(m, "lora_name", "str")
                if strength != 0.0:
                    if lora_file is not None:
                        raise self.err(m, f"is a second active LoRA in the chain of {s.describe()} (after "
                                          f"{lora_file!r}); expected at most one LoraLoaderModelOnly per pass")
                    lora_file, lora_strength = name, strength
            src, wanted = m.inputs.get("model"), f"{m.describe()} input 'model'"
        low = model_file.lower()
        expert = "high" if "high_noise" in low else "low" if "low_noise" in low else ("high" if index == 0 else "low")
        p = PassConfig(expert=expert, model_file=model_file, lora_file=lora_file, lora_strength=lora_strength,
                          shift=DEFAULT_WAN_SHIFT if shift is None else shift, steps=steps, start_at_step=start,
                          end_at_step=end, add_noise=add_noise, return_with_leftover_noise=leftover, cfg=cfg,
                          sampler=sampler, scheduler=scheduler, weight_dtype=weight_dtype)
        try:
            p.validate(f"pass {index + 1} ({expert})")
        except ConfigError as exc:
            raise self.err(s, f"{exc}") from None
        return p

    def _downstream(self, start: _Node) -> list[_Node]:
        """Active and bypassed nodes downstream of ``start``, breadth first."""
        cons = self.consumers()
        seen, queue, out = {start.id}, collections.deque([start.id]), []
        while queue:
            nid = queue.popleft()
            for cid, _, _ in cons.get(nid, []):
                if cid in seen:
                    continue
                seen.add(cid)
                c = self.g.nodes[cid]
                if c.mode == MODE_MUTED:
                    continue
                out.append(c)
                queue.append(cid)
        return out

    def _fps(self, downstream: list[_Node]) -> int:
        """The frame rate of the first active video-saving node downstream of the chain."""
        for n in downstream:
            if n.mode == MODE_ACTIVE and n.type in FPS_NODES:
                try:
                    fps = self._typed(n, FPS_NODES[n.type], "float")
                except _Dead:
                    continue
                if fps <= 0:
                    raise self.err(n, f"{FPS_NODES[n.type]} is {fps}; expected a positive frame rate")
                if not fps.is_integer():
                    warnings.warn(f"{self.source}: {n.describe()}: frame rate {fps} rounded to {round(fps)}",
                                  stacklevel=4)
                return max(1, round(fps))
        return DEFAULT_FPS

    def _reaches_output(self, downstream: list[_Node]) -> bool:
        for n in downstream:
            if n.mode != MODE_ACTIVE or n.outputs_map is not None:
                continue
            if n.type in OUTPUT_NODES or n.type not in TRANSIT_NODES and n.type not in WIDGET_NAMES:
                return True
        return False


def _id_key(nid: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", nid)]


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9.]+", "-", text.strip().lower()).strip("-")
    return s or "x"


def _stem(source: str) -> str:
    base = os.path.basename(source)
    stem = base[:-5] if base.lower().endswith(".json") else os.path.splitext(base)[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "workflow"

"""A ComfyUI workflow file as one flat graph of nodes and links. Three formats are read:

- UI format: top-level ``nodes`` / ``links`` / ``groups``; node ``mode`` 0 active, 2 muted, 4 bypassed.
- UI format with subgraphs: ``definitions.subgraphs[]``; an instance node's type is the subgraph id, its widget values
  map in order onto the subgraph inputs that feed widgets, its input links onto the subgraph inputs by name. Links
  inside a subgraph are objects (``origin_id`` ...), outside arrays. The graph is flattened; inner nodes get the id
  ``<instance>:<inner>`` (ComfyUI's own convention for API exports of subgraphs).
- API format: ``{node_id: {"class_type", "inputs"}}``, inputs literals or ``[node_id, slot]``.

"""

from __future__ import annotations

from dataclasses import dataclass

from wan_pipeline.errors import WorkflowError

MODE_ACTIVE, MODE_MUTED, MODE_BYPASSED = 0, 2, 4
_MAX_SUBGRAPH_DEPTH = 16

# Widget order of each node type this module reads (UI format ``widgets_values``; docs/comfyui.md, section 15).
WIDGET_NAMES: dict[str, tuple[str, ...]] = {
    "KSamplerAdvanced": ("add_noise", "noise_seed", "control_after_generate", "steps", "cfg", "sampler_name",
                         "scheduler", "start_at_step", "end_at_step", "return_with_leftover_noise"),
    "WanImageToVideo": ("width", "height", "length", "batch_size"),
    "ModelSamplingSD3": ("shift",),
    "LoraLoaderModelOnly": ("lora_name", "strength_model"),
    "UNETLoader": ("unet_name", "weight_dtype"),
    "CLIPLoader": ("clip_name", "type", "device"),
    "VAELoader": ("vae_name",),
    "LoadImage": ("image", "upload"),
    "CLIPTextEncode": ("text",),
    "PrimitiveInt": ("value", "control_after_generate"),
    "PrimitiveFloat": ("value",),
    "PrimitiveBoolean": ("value",),
    "PrimitiveString": ("value",),
    "PrimitiveStringMultiline": ("value",),
    "PrimitiveNode": ("value", "control_after_generate"),  # the legacy frontend primitive
    "ComfySwitchNode": ("switch",),
    "ComfyMathExpression": ("expression",),
    "CreateVideo": ("fps",),
    "SaveAnimatedWEBP": ("filename_prefix", "fps", "lossless", "quality", "method"),
    "SaveAnimatedPNG": ("filename_prefix", "fps", "compress_level"),
    "SaveWEBM": ("filename_prefix", "codec", "fps", "crf"),
}
# Widgets the frontend adds after a seed-like value: absent from some older exports.
_CONTROL_WIDGET = "control_after_generate"

PRIMITIVE_TYPES = ("PrimitiveInt", "PrimitiveFloat", "PrimitiveBoolean", "PrimitiveString", "PrimitiveStringMultiline")


@dataclass(frozen=True)
class _Link:
    node: str
    slot: int


@dataclass(frozen=True)
class _Const:
    value: object


@dataclass(frozen=True)
class _Missing:
    why: str  # e.g. "link 12 does not exist"


@dataclass
class _Node:
    id: str
    type: str
    mode: int
    inputs: dict  # input name -> _Link | _Const | _Missing (only inputs with a link or a literal)
    in_types: list  # [(name, type)] in slot order (UI format; empty for API format)
    out_types: list  # [type] in slot order (UI format; empty for API format)
    widgets: object = None  # list (UI) | dict (API or dict-valued widgets) | None
    groups: tuple = ()
    outputs_map: dict | None = None  # subgraph instance: output slot -> source inside
    label: str = ""  # "subgraph '<name>'" for instances

    def describe(self) -> str:
        return f"node #{self.id} ({self.type})"


def _fmt_id(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError
    return str(value)


class _Graph:
    def __init__(self, source: str):
        self.source = source
        self.nodes: dict[str, _Node] = {}
        self.format = ""

    def err(self, message: str) -> WorkflowError:
        return WorkflowError(f"{self.source}: {message}")

    @classmethod
    def build(cls, data: object, source: str) -> "_Graph":
        g = cls(source)
        if isinstance(data, dict) and isinstance(data.get("nodes"), list):
            g.format = "ui"
            subgraphs = {}
            defs = data.get("definitions")
            if isinstance(defs, dict) and defs.get("subgraphs") is not None:
                if not isinstance(defs["subgraphs"], list):
                    raise g.err("definitions.subgraphs: expected a list of subgraph definitions")
                for i, sg in enumerate(defs["subgraphs"]):
                    if not isinstance(sg, dict) or not isinstance(sg.get("id"), str):
                        raise g.err(f"definitions.subgraphs[{i}]: expected an object with a string 'id'")
                    subgraphs[sg["id"]] = sg
                if subgraphs:
                    g.format = "ui-subgraph"
            g._add_ui_graph(data, prefix="", subgraphs=subgraphs, inputs_from=None, depth=0, forced_mode=None,
                            where="the workflow")
            return g
        if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "nodes" not in data:
            data = data["prompt"]  # a /prompt request body
        if isinstance(data, dict) and data and all(isinstance(v, dict) and "class_type" in v for v in data.values()):
            g.format = "api"
            g._add_api_graph(data)
            return g
        raise g.err("not a ComfyUI workflow: expected a UI-format graph (a 'nodes' list and 'links') or an "
                    "API-format prompt (node id -> {'class_type', 'inputs'})")

    # -- API format ----------------------------------------------------------------------------------------------

    def _add_api_graph(self, data: dict) -> None:
        for key, entry in data.items():
            nid = str(key)
            ctype = entry.get("class_type")
            if not isinstance(ctype, str):
                raise self.err(f"node #{nid}: expected a string 'class_type', got {ctype!r}")
            raw_inputs = entry.get("inputs", {})
            if not isinstance(raw_inputs, dict):
                raise self.err(f"node #{nid} ({ctype}): expected 'inputs' to be an object, got {type(raw_inputs).__name__}")
            inputs = {}
            for name, value in raw_inputs.items():
                if isinstance(value, list):
                    if (len(value) == 2 and isinstance(value[1], int) and not isinstance(value[1], bool)
                            and isinstance(value[0], (str, int)) and not isinstance(value[0], bool)):
                        inputs[name] = _Link(str(value[0]), value[1])
                    else:
                        inputs[name] = _Missing(f"node #{nid} ({ctype}) input {name!r} is {value!r:.60}, not a "
                                                f"link [node_id, slot]")
                else:
                    inputs[name] = _Const(value)
            self.nodes[nid] = _Node(nid, ctype, MODE_ACTIVE, inputs, [], [], widgets=None)

    # -- UI format -----------------------------------------------------------------------------------------------

    def _links_table(self, links: object, where: str) -> dict:
        table = {}
        if links is None:
            return table
        if not isinstance(links, list):
            raise self.err(f"{where}: 'links' must be a list")
        for i, link in enumerate(links):
            try:
                if isinstance(link, list):
                    if len(link) < 5:
                        raise ValueError
                    lid, origin, oslot = link[0], link[1], link[2]
                elif isinstance(link, dict):
                    lid, origin, oslot = link["id"], link["origin_id"], link["origin_slot"]
                else:
                    raise ValueError
                lid, origin = _fmt_id(lid), _fmt_id(origin)
                if isinstance(oslot, bool) or not isinstance(oslot, int):
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                raise self.err(f"{where}: links[{i}] is malformed: expected [id, from_node, from_slot, to_node, "
                               f"to_slot, type] or an object with id/origin_id/origin_slot, got {link!r:.120}") from None
            table[lid] = (origin, oslot)
        return table

    def _add_ui_graph(self, graph: dict, prefix: str, subgraphs: dict, inputs_from, depth: int, forced_mode,
                      where: str) -> dict:
        """Add one graph level; return its raw links table (for resolving an instance's outputs)."""
        if depth > _MAX_SUBGRAPH_DEPTH:
            raise self.err(f"{where}: subgraphs nested deeper than {_MAX_SUBGRAPH_DEPTH} levels (a subgraph that "
                           f"contains itself?)")
        nodes = graph.get("nodes")
        if not isinstance(nodes, list):
            raise self.err(f"{where}: 'nodes' must be a list")
        links = self._links_table(graph.get("links"), where)
        groups = _groups(graph.get("groups"))

        def source_of(link_id: object, origin_desc: str):
            if link_id is None:
                return None
            try:
                lid = _fmt_id(link_id)
            except ValueError:
                return _Missing(f"{origin_desc} has a malformed link id {link_id!r}")
            if lid not in links:
                return _Missing(f"{origin_desc} uses link {lid}, which does not exist in the links list")
            origin, oslot = links[lid]
            if origin == "-10":  # the subgraph's input node
                if inputs_from is None:
                    return _Missing(f"{origin_desc}: link {lid} comes from a subgraph input outside any subgraph")
                return inputs_from(oslot)
            return _Link(prefix + origin, oslot)

        for i, raw in enumerate(nodes):
            if not isinstance(raw, dict):
                raise self.err(f"{where}: nodes[{i}] is not an object")
            try:
                local_id = _fmt_id(raw.get("id"))
            except ValueError:
                raise self.err(f"{where}: nodes[{i}] has no valid 'id' (got {raw.get('id')!r:.60})") from None
            ntype = raw.get("type")
            nid = prefix + local_id
            if not isinstance(ntype, str):
                raise self.err(f"node #{nid}: expected a string 'type', got {ntype!r:.60}")
            if nid in self.nodes:
                raise self.err(f"node #{nid} ({ntype}): the node id is used twice in {where}")
            mode = raw.get("mode", 0)
            if isinstance(mode, bool) or not isinstance(mode, int):
                raise self.err(f"node #{nid} ({ntype}): expected an integer 'mode' (0 active, 2 muted, 4 bypassed), "
                               f"got {mode!r:.60}")
            if forced_mode is not None and forced_mode != MODE_ACTIVE:
                mode = forced_mode if mode == MODE_ACTIVE or forced_mode == MODE_MUTED else mode
            inputs, in_types = {}, []
            raw_inputs = raw.get("inputs") or []
            if not isinstance(raw_inputs, list):
                raise self.err(f"node #{nid} ({ntype}): expected 'inputs' to be a list")
            for j, inp in enumerate(raw_inputs):
                if not isinstance(inp, dict):
                    raise self.err(f"node #{nid} ({ntype}): inputs[{j}] is not an object")
                name = inp.get("name")
                widget = inp.get("widget")
                if isinstance(widget, dict) and isinstance(widget.get("name"), str):
                    name = widget["name"]
                if not isinstance(name, str):
                    raise self.err(f"node #{nid} ({ntype}): inputs[{j}] has no name")
                in_types.append((name, inp.get("type") if isinstance(inp.get("type"), str) else ""))
                src = source_of(inp.get("link"), f"node #{nid} ({ntype}) input {name!r}")
                if src is not None:
                    inputs[name] = src
            out_types = []
            raw_outputs = raw.get("outputs") or []
            if isinstance(raw_outputs, list):
                for out in raw_outputs:
                    out_types.append(out.get("type") if isinstance(out, dict) and isinstance(out.get("type"), str) else "")
            widgets = raw.get("widgets_values")
            node = _Node(nid, ntype, mode, inputs, in_types, out_types, widgets=widgets,
                         groups=tuple(_groups_of(raw.get("pos"), groups)))
            self.nodes[nid] = node
            if ntype in subgraphs:
                self._expand_instance(node, raw, subgraphs, depth, where)
        return links

    def _expand_instance(self, node: _Node, raw: dict, subgraphs: dict, depth: int, where: str) -> None:
        sg = subgraphs[node.type]
        name = sg.get("name") if isinstance(sg.get("name"), str) else node.type
        node.label = f"subgraph {name!r}"
        sg_inputs = sg.get("inputs") or []
        sg_outputs = sg.get("outputs") or []
        if not isinstance(sg_inputs, list) or not isinstance(sg_outputs, list):
            raise self.err(f"node #{node.id} ({node.type}): subgraph {name!r} has malformed 'inputs'/'outputs'")
        inner_nodes = sg.get("nodes") if isinstance(sg.get("nodes"), list) else []
        # Which subgraph inputs carry a widget: those that feed a widget input inside.
        widget_targets = set()
        for inner in inner_nodes:
            if isinstance(inner, dict):
                for inp in inner.get("inputs") or []:
                    if isinstance(inp, dict) and isinstance(inp.get("widget"), dict) and inp.get("link") is not None:
                        try:
                            widget_targets.add(_fmt_id(inp["link"]))
                        except ValueError:
                            pass
        widget_index = {}
        k = 0
        for idx, sgi in enumerate(sg_inputs):
            link_ids = sgi.get("linkIds") if isinstance(sgi, dict) else None
            ids = set()
            for x in link_ids if isinstance(link_ids, list) else []:
                try:
                    ids.add(_fmt_id(x))
                except ValueError:
                    pass
            if ids & widget_targets:
                widget_index[idx] = k
                k += 1
        values = node.widgets if isinstance(node.widgets, list) else []
        outer_inputs = dict(node.inputs)

        def inputs_from(slot: int):
            if not (0 <= slot < len(sg_inputs)) or not isinstance(sg_inputs[slot], dict):
                return _Missing(f"subgraph {name!r} has no input slot {slot}")
            in_name = sg_inputs[slot].get("name")
            if isinstance(in_name, str) and in_name in outer_inputs:
                return outer_inputs[in_name]
            if slot in widget_index and widget_index[slot] < len(values):
                return _Const(values[widget_index[slot]])
            return _Missing(f"{node.describe()} ({node.label}): input {in_name!r} is neither connected nor set")

        inner_links = self._add_ui_graph(sg, prefix=f"{node.id}:", subgraphs=subgraphs, inputs_from=inputs_from,
                                         depth=depth + 1, forced_mode=node.mode, where=f"subgraph {name!r}")
        # The instance's output slot k is whatever feeds the subgraph output node (-20) at slot k.
        outputs_map = {}
        raw_links = sg.get("links") if isinstance(sg.get("links"), list) else []
        for link in raw_links:
            target = tslot = lid = None
            if isinstance(link, dict):
                target, tslot, lid = link.get("target_id"), link.get("target_slot"), link.get("id")
            elif isinstance(link, list) and len(link) >= 5:
                target, tslot, lid = link[3], link[4], link[0]
            if target == -20 and isinstance(tslot, int):
                try:
                    origin, oslot = inner_links[_fmt_id(lid)]
                except (ValueError, KeyError):
                    continue
                outputs_map[tslot] = inputs_from(oslot) if origin == "-10" else _Link(f"{node.id}:{origin}", oslot)
        node.outputs_map = outputs_map


def _groups(raw: object) -> list:
    out = []
    if isinstance(raw, list):
        for g in raw:
            if not isinstance(g, dict):
                continue
            b, title = g.get("bounding"), g.get("title")
            if (isinstance(title, str) and isinstance(b, list) and len(b) == 4
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b)):
                out.append((title, b))
    return out


def _groups_of(pos: object, groups: list) -> list:
    if not (isinstance(pos, (list, tuple)) and len(pos) >= 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pos[:2])):
        return []
    x, y = pos[0], pos[1]
    inside = [(bw * bh, t) for t, (bx, by, bw, bh) in groups if bx <= x <= bx + bw and by <= y <= by + bh]
    return [t for _, t in sorted(inside, key=lambda a: -a[0])]  # outermost (largest) group first

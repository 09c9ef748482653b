"""LoRA merging for Wan experts, following ComfyUI's LoraLoaderModelOnly.

Key formats (docs/comfyui.md, sections 11-12): a module name with the prefix ``diffusion_model.`` (dotted original Wan names, e.g.
``diffusion_model.blocks.0.self_attn.q``) or ``lora_unet_`` (the same name with dots flattened to underscores),
followed by one of

- ``.lora_up`` / ``.lora_down`` or ``.lora_B`` / ``.lora_A`` (each with or without ``.weight``): the delta is
  ``strength * alpha / rank * up @ down`` with ``rank = down.shape[0]``, or ``strength * up @ down`` without ``.alpha``;
- ``.alpha``: a scalar for the pair above;
- ``.diff``: a full delta of the weight (``strength * diff``);
- ``.diff_b``: a delta of the module's bias (``strength * diff_b``).

Deltas are computed in float32 and added to ``weight.float()``; the sum is rounded back to the stored dtype, as
ComfyUI does when it patches a weight. A float8_e4m3fn tensor with a per-tensor scale is dequantized
(``weight.float() * scale``), patched and requantized with the same scale. ``rounding="comfyui"`` (the default)
requantizes as ComfyUI's patcher does: stochastic rounding after a float16 cast, seeded with the CRC-32 of the
weight's name in ComfyUI's model (:func:`wan_pipeline.run.precision.stochastic_round_fp8`), so that the merged weights
are ComfyUI's bit for bit when the merge runs on the same kind of device; ``rounding="nearest"`` rounds to nearest
(clamped to +-448). An fp8 bias (fp8_scaled files store them, scale 1) patched by ``diff_b`` is rounded the same way.

A module's ``.diff`` replaces its ``lora_up``/``lora_down`` pair instead of adding to it, as ComfyUI 0.3.64's LoRA
loader keeps one patch per weight and takes the ``diff`` last (comfy/lora.py ``load_lora``); the pair's keys are
listed in :attr:`LoraReport.superseded` and the run record says so.

Keys on ``modulation`` (``blocks.N.modulation.diff``, ``head.modulation.diff``, and their ``diff_b``) are accepted
and not applied: ComfyUI's patcher only patches parameters of leaf modules, and these parameters sit on modules
with children, so ComfyUI never merges them (:attr:`LoraReport.accepted_unapplied`).

Unknown keys: ComfyUI logs ``lora key not loaded: <key>`` for every LoRA key that matches no model weight and goes on,
so :func:`apply_lora` does the same with one ``warnings.warn`` listing them; a LoRA of which *no* key matches the
model is an error (it is not a LoRA for this model), as is a key that matches a weight of another shape.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from wan_pipeline.errors import WanBenchError
from wan_pipeline.run.precision import key_seed, quantize_fp8, stochastic_round_fp8

# suffix -> role; longest suffixes first so ".lora_up.weight" wins over ".weight"-less forms.
_SUFFIXES = (
    (".lora_up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_up", "up"),
    (".lora_down", "down"),
    (".lora_B", "up"),
    (".lora_A", "down"),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
)
_PREFIXES = ("diffusion_model.", "lora_unet_")


class LoraError(WanBenchError):
    """A LoRA file that cannot be applied to its expert; the message names the LoRA file and the key."""


@dataclass
class LoraReport:
    """What a merge did: target weight names patched, and the LoRA keys that matched nothing (ComfyUI ignores them)."""

    patched: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)
    # keys ComfyUI accepts and never applies (parameters of non-leaf modules: blocks.N.modulation, head.modulation)
    accepted_unapplied: list[str] = field(default_factory=list)
    # lora_up/lora_down/alpha keys of a module that also has a ``.diff``: ComfyUI applies the diff alone
    superseded: list[str] = field(default_factory=list)
    rounding: str = "comfyui"

    def notes(self, lora_name: str) -> list[str]:
        out = []
        if self.accepted_unapplied:
            out.append(f"{lora_name}: {len(self.accepted_unapplied)} LoRA keys accepted and ignored, as ComfyUI does "
                       f"(it patches only leaf modules' parameters): {', '.join(self.accepted_unapplied[:4])}"
                       f"{' ...' if len(self.accepted_unapplied) > 4 else ''}")
        if self.superseded:
            out.append(f"{lora_name}: {len(self.superseded)} lora_up/lora_down keys accepted and ignored, as ComfyUI "
                       f"does (the same module's .diff replaces them): {', '.join(self.superseded[:4])}"
                       f"{' ...' if len(self.superseded) > 4 else ''}")
        return out


def lora_key_map(model_keys) -> dict[str, str]:
    """LoRA module name -> model tensor name, built from the original Wan tensor names the way ComfyUI builds it.

    For every ``X.weight``: ``diffusion_model.X`` and ``lora_unet_`` + X with dots replaced by underscores.
    For every other tensor ``Y`` (``blocks.0.modulation``, ``head.modulation``): ``diffusion_model.Y``.
    """
    out: dict[str, str] = {}
    for k in model_keys:
        if k.endswith(".weight"):
            base = k[: -len(".weight")]
            out["diffusion_model." + base] = k
            out["lora_unet_" + base.replace(".", "_")] = k
        else:
            out["diffusion_model." + k] = k
    return out


def _on_non_leaf_module(target: str) -> bool:
    """A parameter ComfyUI's patcher never reaches: ``modulation`` of a block or of the head (modules with
    children)."""
    return target.split(".")[-1] == "modulation"


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def lora_deltas(
    lora_sd: dict[str, torch.Tensor],
    key_map: dict[str, str],
    model_shapes: dict[str, torch.Size],
    strength: float,
    lora_name: str,
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """float32 deltas keyed by model tensor name (original names), the LoRA keys that matched nothing, and the
    lora_up/lora_down/alpha keys a ``.diff`` of the same module supersedes (ComfyUI applies only the diff)."""
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    ignored: list[str] = []
    for key, tensor in lora_sd.items():
        split = _split_key(key)
        if split is None or split[0] not in key_map:
            ignored.append(key)
            continue
        module, role = split
        groups.setdefault(module, {})[role] = (key, tensor)

    deltas: dict[str, torch.Tensor] = {}
    superseded: list[str] = []

    def add(target: str, delta: torch.Tensor, key: str) -> None:
        if target not in model_shapes:
            ignored.append(key)  # e.g. diff_b for a module without bias: ComfyUI skips it
            return
        if tuple(delta.shape) != tuple(model_shapes[target]):
            raise LoraError(
                f"{lora_name}: tensor {key} gives a delta of shape {tuple(delta.shape)} for {target}, "
                f"which has shape {tuple(model_shapes[target])}"
            )
        deltas[target] = deltas[target] + delta if target in deltas else delta

    for module, parts in groups.items():
        weight_key = key_map[module]
        if "diff" in parts and ("up" in parts or "down" in parts):
            superseded += [parts[r][0] for r in ("up", "down", "alpha") if r in parts]
            parts = {r: v for r, v in parts.items() if r not in ("up", "down", "alpha")}
        if "up" in parts or "down" in parts:
            if "up" not in parts or "down" not in parts:
                have = next(iter(parts.values()))[0]
                raise LoraError(f"{lora_name}: tensor {have} has no matching up/down (B/A) partner")
            up_key, up = parts["up"]
            down_key, down = parts["down"]
            rank = down.shape[0]
            if up.shape[1] != rank:
                raise LoraError(
                    f"{lora_name}: tensors {up_key} {tuple(up.shape)} and {down_key} {tuple(down.shape)} "
                    "disagree on the rank"
                )
            scale = float(strength)
            if "alpha" in parts:
                scale *= float(parts["alpha"][1].float().item()) / rank
            shape = model_shapes.get(weight_key)
            product = up.flatten(1).float() @ down.flatten(1).float()
            if shape is not None and product.numel() == torch.Size(shape).numel():
                product = product.reshape(shape)
            add(weight_key, product * scale, up_key)
        elif "alpha" in parts:
            ignored.append(parts["alpha"][0])
        if "diff" in parts:
            key, diff = parts["diff"]
            add(weight_key, diff.float() * float(strength), key)
        if "diff_b" in parts:
            key, diff_b = parts["diff_b"]
            if weight_key.endswith(".weight"):
                add(weight_key[: -len(".weight")] + ".bias", diff_b.float() * float(strength), key)
            else:
                ignored.append(key)
    return deltas, ignored, superseded


def apply_lora(
    state_dict: dict[str, torch.Tensor],
    fp8_scales: dict[str, torch.Tensor],
    lora_sd: dict[str, torch.Tensor],
    *,
    original_names: dict[str, str],
    strength: float,
    lora_name: str,
    rounding: str = "comfyui",
    device: torch.device | str | None = None,
) -> LoraReport:
    """Merge a LoRA into ``state_dict`` in place.

    ``original_names`` maps each original Wan tensor name to its key in ``state_dict`` (which may use diffusers
    names); ``fp8_scales`` holds the per-tensor scale of every float8_e4m3fn tensor (keyed like ``state_dict``).
    ``device``: where fp8 requantization runs with ``rounding="comfyui"`` (ComfyUI patches on the GPU it runs on;
    the random draws depend on the device type); None: where the tensor is.
    """
    if rounding not in ("comfyui", "nearest"):
        raise LoraError(f"{lora_name}: LoRA rounding {rounding!r} is not one of comfyui, nearest")
    key_map = lora_key_map(original_names)
    shapes = {orig: state_dict[key].shape for orig, key in original_names.items()}
    deltas, ignored, superseded = lora_deltas(lora_sd, key_map, shapes, strength, lora_name)
    # ComfyUI maps a diff_b on X.modulation to the bias of "X.modul" (the name minus 7 characters): no such tensor
    accepted = []
    for key in list(ignored):
        split = _split_key(key)
        if split and split[0] in key_map and key_map[split[0]].split(".")[-1] == "modulation":
            ignored.remove(key)
            accepted.append(key)
    for target in [t for t in deltas if _on_non_leaf_module(t)]:
        del deltas[target]
        accepted += [k for k in lora_sd if (_split_key(k) or ("",))[0] in key_map
                     and key_map[_split_key(k)[0]] == target]
    if not deltas and not accepted:
        sample = ", ".join(sorted(lora_sd)[:5])
        raise LoraError(
            f"{lora_name}: none of its {len(lora_sd)} keys matches a weight of the model (first keys: {sample}); "
            f"expected keys like diffusion_model.blocks.0.self_attn.q.lora_up.weight or "
            f"lora_unet_blocks_0_self_attn_q.lora_down.weight"
        )
    if ignored:
        shown = ", ".join(sorted(ignored)[:8])
        more = f" and {len(ignored) - 8} more" if len(ignored) > 8 else ""
        warnings.warn(
            f"{lora_name}: {len(ignored)} LoRA keys match no weight of the model and are ignored, as ComfyUI "
            f"ignores them: {shown}{more}",
            stacklevel=3,
        )
    report = LoraReport(ignored_keys=sorted(ignored), accepted_unapplied=sorted(set(accepted)),
                        superseded=sorted(superseded), rounding=rounding)
    for orig, delta in deltas.items():
        key = original_names[orig]
        stored = state_dict[key]
        if stored.dtype == torch.float8_e4m3fn:
            scale = fp8_scales.get(key, torch.tensor(1.0))
            where = torch.device(device) if device is not None else stored.device
            merged = stored.to(where).float() * scale.to(where).float() + delta.to(where)
            if rounding == "comfyui":
                out = stochastic_round_fp8(merged / scale.to(where).float(), key_seed("diffusion_model." + orig))
            else:
                out = quantize_fp8(merged, scale.to(where))
            state_dict[key] = out.to(stored.device)
        else:
            state_dict[key] = (stored.float() + delta).to(stored.dtype)
        report.patched.append(key)
    return report


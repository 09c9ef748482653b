"""What changed on a ComfyUI server between two runs, in the words a user would use: "ComfyUI 0.3.64 -> 0.3.66",
"--use-sage-attention added", "ComfyUI-KJNodes appeared". Reads machine_info['comfyui'] only (no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ServerChange:
    """A change with compare's Change fields (field, baseline, current) and its own sentence."""

    field: str
    baseline: Any
    current: Any
    text: str = ""

    def describe(self) -> str:
        return self.text


def _flag_names(flags) -> dict[str, str]:
    return {str(f).split(" ", 1)[0].split("=", 1)[0]: str(f) for f in flags or []}


def comfyui_changes(before: dict | None, after: dict | None) -> list[ServerChange]:
    """Server changes between two machine_info['comfyui'] entries (either may be missing)."""
    if not before and not after:
        return []
    if not before or not after:
        which = "appeared" if after else "went away"
        url = (after or before).get("url")
        return [ServerChange("machine:comfyui", None if after else url, url if after else None,
                             text=f"ComfyUI server {which} ({url})")]
    out: list[ServerChange] = []
    for key, label in (("version", "ComfyUI"), ("torch", "ComfyUI server torch"),
                       ("python", "ComfyUI server Python")):
        a, b = before.get(key), after.get(key)
        if a != b:
            out.append(ServerChange(f"machine:comfyui.{key}", a, b, text=f"{label} {a or 'unset'} -> {b or 'unset'}"))
    fa, fb = _flag_names(before.get("launch_flags")), _flag_names(after.get("launch_flags"))
    for name in sorted(set(fa) | set(fb)):
        if name not in fa:
            out.append(ServerChange("machine:comfyui.launch_flags", None, fb[name], text=f"{fb[name]} added"))
        elif name not in fb:
            out.append(ServerChange("machine:comfyui.launch_flags", fa[name], None, text=f"{fa[name]} removed"))
        elif fa[name] != fb[name]:
            out.append(ServerChange("machine:comfyui.launch_flags", fa[name], fb[name],
                                    text=f"{fa[name]} -> {fb[name]}"))
    na, nb = set(before.get("custom_nodes") or ()), set(after.get("custom_nodes") or ())
    out += [ServerChange("machine:comfyui.custom_nodes", None, p, text=f"{p} appeared") for p in sorted(nb - na)]
    out += [ServerChange("machine:comfyui.custom_nodes", p, None, text=f"{p} went away") for p in sorted(na - nb)]
    da = [d.get("name") for d in before.get("devices") or []]
    db = [d.get("name") for d in after.get("devices") or []]
    if da != db:
        out.append(ServerChange("machine:comfyui.devices", da, db,
                                text=f"ComfyUI server devices {', '.join(map(str, da)) or 'none'} -> "
                                     f"{', '.join(map(str, db)) or 'none'}"))
    return out

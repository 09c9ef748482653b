"""Finding the user's weight files without torch: ComfyUI ``models/`` folders and diffusers folders, safetensors
headers checked, pickle files refused; and the model source `auto` resolves to, so that planning needs no torch.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from wan_pipeline.errors import WanBenchError
from wan_pipeline.plan.config import RunConfig

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class LoadingError(WanBenchError):
    """A weight file that cannot be used; the message names the file (and the tensor where one is at fault)."""


class MissingModelFiles(LoadingError):
    """Model files not found. ``missing`` lists (expected file name, folders searched)."""

    def __init__(self, missing: list[tuple[str, list[Path]]], root: Path | None = None):
        self.missing = missing
        lines = [f"model files not found{f' under {root}' if root else ''}:"]
        for name, folders in missing:
            lines.append(f"  {name} (searched: {', '.join(str(f) for f in folders)})")
        super().__init__("\n".join(lines))


class PickleCheckpointRefused(LoadingError):
    """A .ckpt/.pt/.pth/.bin file: pickle can run code when loaded, so only safetensors are read."""


class CheckpointError(LoadingError):
    """A truncated or corrupt safetensors file, or a tensor of the wrong shape or an unknown quantization."""


# ---------------------------------------------------------------------------------------------------------------
# Finding files


@dataclass(frozen=True)
class ExpertFiles:
    expert: str
    model: Path  # a .safetensors file (ComfyUI) or a transformer folder (diffusers)
    lora: Path | None
    lora_strength: float


@dataclass(frozen=True)
class ModelFiles:
    layout: str  # "comfyui" or "diffusers"
    root: Path  # the ComfyUI models/ folder or the diffusers folder
    experts: dict[str, ExpertFiles]
    text_encoder: Path  # a file (ComfyUI) or the text_encoder/ folder (diffusers; tokenizer/ next to it)
    vae: Path


def _comfy_models_dir(path: Path) -> Path | None:
    for candidate in (path / "models", path):
        if any((candidate / d).is_dir() for d in ("diffusion_models", "unet", "loras", "text_encoders", "clip", "vae")):
            return candidate
    return None


def _experts(config: RunConfig) -> dict[str, tuple[str, str | None, float]]:
    out: dict[str, tuple[str, str | None, float]] = {}
    for p in config.passes:
        item = (p.model_file, p.lora_file, float(p.lora_strength))
        if p.expert in out and out[p.expert] != item:
            raise LoadingError(f"{config.name}: expert {p.expert!r} is bound to two different model/LoRA choices: "
                               f"{out[p.expert]} and {item}")
        out[p.expert] = item
    return out


def _find(name: str, folders: list[Path], missing: list) -> Path | None:
    for folder in folders:
        candidate = folder / name
        if candidate.is_file():
            if candidate.suffix.lower() in PICKLE_SUFFIXES:
                refuse_pickle(candidate)
            return candidate
    hint = ""
    for folder in folders:
        for suffix in PICKLE_SUFFIXES:
            alt = folder / (Path(name).stem + suffix)
            if alt.is_file():
                hint = f" [found {alt.name}: pickle checkpoints are refused, use a .safetensors file]"
    missing.append((name + hint, folders))
    return None


def find_model_files(models_dir, config: RunConfig) -> ModelFiles:
    """Resolve every file a run needs in a ComfyUI root, a ComfyUI ``models/`` folder or a diffusers folder.

    Diffusers layout: ``transformer/`` is the high-noise expert and ``transformer_2/`` the low-noise one (the
    configured model file names are not used); LoRAs are looked up in ``loras/`` inside the folder, next to it, and in
    ``models/loras`` next to it. Raises :class:`MissingModelFiles` listing every missing name and the folders searched.
    """
    root = Path(models_dir).expanduser()
    experts = _experts(config)
    missing: list[tuple[str, list[Path]]] = []
    if (root / "model_index.json").is_file():
        lora_dirs = list(dict.fromkeys([root / "loras", root.parent / "loras", root.parent / "models" / "loras"]))
        found = {}
        for expert, (model_file, lora_file, strength) in experts.items():
            sub = root / ("transformer" if expert == "high" else "transformer_2")
            _diffusers_weight_files(sub, missing)
            lora = _find(lora_file, lora_dirs, missing) if lora_file else None
            found[expert] = ExpertFiles(expert, sub, lora, strength)
        for sub in ("vae", "text_encoder"):
            _diffusers_weight_files(root / sub, missing)
        tok = root / "tokenizer"
        if not ((tok / "spiece.model").is_file() or (tok / "tokenizer.json").is_file()):
            missing.append(("spiece.model or tokenizer.json", [tok]))
        if missing:
            raise MissingModelFiles(missing, root)
        return ModelFiles("diffusers", root, found, root / "text_encoder", root / "vae")

    models = _comfy_models_dir(root)
    if models is None:
        raise MissingModelFiles(
            [("model_index.json (diffusers) or a models/ folder with diffusion_models/, loras/, text_encoders/, vae/",
              [root, root / "models"])], root)
    found = {}
    for expert, (model_file, lora_file, strength) in experts.items():
        model = _find(model_file, [models / "diffusion_models", models / "unet"], missing)
        lora = _find(lora_file, [models / "loras"], missing) if lora_file else None
        found[expert] = ExpertFiles(expert, model, lora, strength)
    te = _find(config.text_encoder_file, [models / "text_encoders", models / "clip"], missing)
    vae = _find(config.vae_file, [models / "vae"], missing)
    if missing:
        raise MissingModelFiles(missing, models)
    return ModelFiles("comfyui", models, found, te, vae)


def _diffusers_weight_files(folder: Path, missing: list | None = None) -> list[Path]:
    """The safetensors shards of a diffusers/transformers component folder (index json honoured)."""
    if not (folder / "config.json").is_file():
        if missing is None:
            raise MissingModelFiles([("config.json", [folder])])
        missing.append(("config.json", [folder]))
        return []
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{indexes[0]}: not a safetensors index ({exc})") from None
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            pickles = [f for f in folder.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES]
            if pickles:
                refuse_pickle(pickles[0])
            files = [folder / "*.safetensors"]
    absent = [f for f in files if not f.is_file()]
    if absent:
        if missing is None:
            raise MissingModelFiles([(f.name, [folder]) for f in absent])
        missing.extend((f.name, [folder]) for f in absent)
        return []
    return files


# ---------------------------------------------------------------------------------------------------------------
# Reading safetensors safely

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I64": 8,
                "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1}


def refuse_pickle(path: Path) -> None:
    raise PickleCheckpointRefused(
        f"{path}: pickle checkpoints ({', '.join(PICKLE_SUFFIXES)}) are refused because loading them can run "
        f"arbitrary code; convert it to .safetensors"
    )


def read_safetensors_header(path) -> tuple[dict, dict]:
    """(tensor entries, ``__metadata__``) of a safetensors file, checked against the file size."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(path)
    if not path.is_file():
        raise MissingModelFiles([(path.name, [path.parent])])
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short to be a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: header of {n} bytes does not fit in the file of {size} bytes: "
                                  "truncated or not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: unreadable safetensors header (corrupt, or not a safetensors file)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: unreadable safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    data_bytes = size - 8 - n
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            need = math.prod(info["shape"]) * _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name}: malformed header entry {info!r}") from None
        if end - begin != need:
            raise CheckpointError(f"{path}: tensor {name}: header says shape {info['shape']} {info['dtype']} "
                                  f"({need} bytes) but stores {end - begin} bytes")
        if end > data_bytes:
            raise CheckpointError(f"{path}: tensor {name} ends at byte {end} of the data but the file holds only "
                                  f"{data_bytes} bytes of data: the file is truncated")
    return header, metadata


def auto_mode(models_dir: str | None, configs: list[RunConfig] | None = None) -> tuple[str, str]:
    """What `auto` runs and why, decided without torch. A models folder that was given must hold a complete, usable
    set for every configuration to run (`configs`, default: the presets' files): a missing or unusable file is an
    error naming it (never a quiet fall-back to random weights). Without one: synthetic on a GPU, else tiny."""
    from wan_pipeline.measure.telemetry import cuda_available

    if models_dir:
        from wan_pipeline.plan.presets import get_preset

        try:
            for config in configs or [get_preset("seed-832x1216-49f")]:
                find_model_files(models_dir, config)
        except LoadingError as exc:
            raise LoadingError(f"models folder {models_dir} (--wan-models / --models / WAN_MODELS_DIR) is not usable, "
                               f"so auto cannot run real weights; fix the folder, unset it, or choose --mode "
                               f"synthetic/tiny: {exc}") from None
        return "real", f"auto: the model files were found in {models_dir}"
    if cuda_available():
        return "synthetic", "auto: a GPU is visible and no models folder (--wan-models / WAN_MODELS_DIR)"
    return "tiny", "auto: no GPU is visible and no models folder (--wan-models / WAN_MODELS_DIR)"

"""Latency budgets and quality thresholds from a TOML file, looked up by GPU name, preset and mode.

Pure lookup over plain data: the first entry whose patterns all match wins, so specific entries go first.
"""

from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass
from pathlib import Path

from wan_pipeline.errors import WanBenchError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_BUDGETS = Path(__file__).resolve().parent / "budgets.toml"  # package data
QUALITY_KEYS = {"flicker_score_min", "ssim_mean_min", "ssim_min_min", "warp_error_max", "motion_min",
                "first_frame_ssim_min", "first_frame_psnr_min"}


class BudgetFileError(WanBenchError):
    """The budgets file cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class Budget:
    gpu: str
    preset: str
    mode: str
    seconds: float
    attention: str = "*"
    compile: str = "*"
    precision: str = "*"
    source: str = ""

    def describe(self) -> str:
        return (f"{self.seconds:g} s for {self.preset} on {self.gpu} ({self.mode}, precision {self.precision}, "
                f"attention {self.attention}, compile {self.compile}){': ' + self.source if self.source else ''}")


@dataclass(frozen=True)
class QualityThresholds:
    preset: str
    limits: dict  # e.g. {"flicker_score_min": 0.95}
    source: str = ""

    def violations(self, metrics: dict) -> list[str]:
        out = []
        for key, limit in self.limits.items():
            name, bound = key.rsplit("_", 1)
            value = metrics.get(name)
            if value is None:
                continue
            if (bound == "min" and value < limit) or (bound == "max" and value > limit):
                out.append(f"{name} = {value:.4f} ({'below' if bound == 'min' else 'above'} {limit})")
        return out


@dataclass(frozen=True)
class Budgets:
    path: str
    budgets: tuple[Budget, ...]
    quality: tuple[QualityThresholds, ...]

    def budget_for(self, gpu_name: str | None, preset: str, mode: str, attention: str = "",
                   compile_on: bool = False, precision: str = "") -> Budget | None:
        gpu = gpu_name or "cpu"
        for b in self.budgets:
            if (_match(b.gpu, gpu) and _match(b.preset, preset) and _match(b.mode, mode)
                    and _match(b.attention, attention) and _match(b.compile, "1" if compile_on else "0")
                    and _match(b.precision, precision)):
                return b
        return None

    def quality_for(self, preset: str) -> QualityThresholds | None:
        return next((q for q in self.quality if _match(q.preset, preset)), None)


def _match(pattern: str, value: str) -> bool:
    return fnmatch.fnmatch(value.lower(), pattern.lower())


def load_budgets(path: str | Path | None = None) -> Budgets:
    path = Path(path) if path else DEFAULT_BUDGETS
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BudgetFileError(f"budgets file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise BudgetFileError(f"budgets file {path} is not valid TOML: {exc}") from None
    return parse_budgets(text, path)


def parse_budgets(text: str, path: str | Path = "<budgets>") -> Budgets:
    """The budgets in TOML `text`, checked as load_budgets checks a file (`path` names it in errors)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BudgetFileError(f"budgets file {path} is not valid TOML: {exc}") from None
    budgets = []
    for i, entry in enumerate(data.get("budget", []), 1):
        where = f"{path}: [[budget]] entry {i}"
        missing = {"gpu", "preset", "seconds"} - set(entry)
        if missing:
            raise BudgetFileError(f"{where} lacks {sorted(missing)}")
        unknown = set(entry) - {"gpu", "preset", "mode", "seconds", "attention", "compile", "precision", "source"}
        if unknown:
            raise BudgetFileError(f"{where} has unknown keys {sorted(unknown)}")
        seconds = entry["seconds"]
        if not isinstance(seconds, (int, float)) or seconds <= 0:
            raise BudgetFileError(f"{where}: seconds must be a positive number, got {seconds!r}")
        budgets.append(Budget(gpu=str(entry["gpu"]), preset=str(entry["preset"]), mode=str(entry.get("mode", "*")),
                              seconds=float(seconds), attention=str(entry.get("attention", "*")),
                              compile=str(entry.get("compile", "*")), precision=str(entry.get("precision", "*")),
                              source=str(entry.get("source", ""))))
    quality = []
    for i, entry in enumerate(data.get("quality", []), 1):
        where = f"{path}: [[quality]] entry {i}"
        if "preset" not in entry:
            raise BudgetFileError(f"{where} lacks 'preset'")
        limits = {k: v for k, v in entry.items() if k not in ("preset", "source")}
        unknown = set(limits) - QUALITY_KEYS
        if unknown:
            raise BudgetFileError(f"{where} has unknown keys {sorted(unknown)} (known: {sorted(QUALITY_KEYS)})")
        quality.append(QualityThresholds(str(entry["preset"]), {k: float(v) for k, v in limits.items()},
                                         str(entry.get("source", ""))))
    return Budgets(str(path), tuple(budgets), tuple(quality))

"""Latency budgets for any card from its own baseline: `[[budget]]` entries made from a benchmark run.

A budget is only useful on the card it was measured on, so each entry carries every key `plan.budgets` matches a
case on (the exact GPU name, preset, mode, precision, attention, compile), seconds = the run's median times one plus
the headroom, and a source naming the run's date, card, driver, torch and diffusers versions, commit and file.

The run comes from a pytest-benchmark JSON file, or the newest usable run of a storage folder (`history.runs`).
Runs marked partial in their `wan_incomplete` record (interrupted or stopped early, a worker that died or timed
out, tests collected that never ran) are skipped, and so are
benchmarks whose test failed, benchmarks that time something other than a whole generation, and split
(sequence-parallel) generations, whose budget lookup cannot tell them from the one-GPU case. Entries merge into a
budgets file with tomlkit, which keeps the file's comments: an entry with the same keys is updated where it is,
new entries go first (the first matching entry wins, and these are the most specific there are). Reads files only:
no torch import.

The median is pytest-benchmark's (`stats.median`, the wall time of a round), the figure every report shows; the
suite checks a budget against the median of the rounds' stage sums, which is that or slightly less, so a budget
made from a run is never tighter than the run itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import tomlkit

from wan_pipeline.errors import WanBenchError
from wan_pipeline.fsutil import atomic_write_bytes
from wan_pipeline.history.results import run_info
from wan_pipeline.history.runs import Run, benchmark_key, load_history, load_run
from wan_pipeline.plan.budgets import Budget, BudgetFileError, Budgets, load_budgets, parse_budgets

DEFAULT_HEADROOM = 0.15
KEYS = ("gpu", "preset", "mode", "precision", "attention", "compile")  # what Budgets.budget_for matches on


class MakeBudgetsError(WanBenchError):
    """No budget can be made: bad headroom, no usable run, no generation benchmark, or an unusable budgets file."""


def parse_headroom(text: str) -> float:
    """'15%' or '15 %' -> 0.15; '0.15' -> 0.15. A bare number is a fraction below 1 (write 15% for fifteen percent)."""
    raw = str(text).strip()
    percent = raw.endswith("%")
    try:
        value = float(raw.rstrip("%").strip())
    except ValueError:
        raise MakeBudgetsError(f"--headroom {text!r}: not a number; write 15% or 0.15") from None
    if not math.isfinite(value) or value < 0:
        raise MakeBudgetsError(f"--headroom {text!r}: must be a finite number >= 0, e.g. 15% or 0.15")
    if percent:
        return value / 100.0
    if value >= 1:
        raise MakeBudgetsError(f"--headroom {text!r}: a bare number is a fraction (0.15 = 15 %); "
                               f"for {value:g} percent write {value:g}%")
    return value


def literal_pattern(text: str) -> str:
    """`text` as an fnmatch pattern that matches exactly it (budgets match keys as globs)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def budget_seconds(median: float, headroom: float) -> float:
    """median x (1 + headroom), to 4 significant digits (never more than 0.05 % off)."""
    value = median * (1.0 + headroom)
    digits = 3 - int(math.floor(math.log10(value))) if value > 0 else 0
    return round(value, digits)


@dataclass(frozen=True)
class BudgetEntry:
    """One `[[budget]]` entry made from one benchmark; the key fields are the values as the case looks them up."""

    gpu: str  # "cpu" for a case that ran on the CPU, as Budgets.budget_for reads None
    preset: str
    mode: str
    precision: str
    attention: str
    compile: str  # "0" / "1"
    seconds: float
    source: str
    benchmark: str

    def key(self) -> tuple[str, ...]:
        return tuple(literal_pattern(getattr(self, k)).lower() for k in KEYS)

    def table(self) -> dict:
        entry = {k: literal_pattern(getattr(self, k)) for k in KEYS}
        entry.update(seconds=self.seconds, source=self.source)
        return entry

    def found_in(self, budgets: Budgets) -> Budget | None:
        """The entry `budgets` gives this benchmark's case (what --wan-budgets will check it against)."""
        return budgets.budget_for(None if self.gpu == "cpu" else self.gpu, self.preset, self.mode, self.attention,
                                  self.compile == "1", self.precision)


@dataclass
class MadeBudgets:
    run: Run
    entries: list[BudgetEntry]
    notes: list[str] = field(default_factory=list)  # what was skipped, and which run was used


# ------------------------------------------------------------------------------------------------ runs


def run_problem(run: Run) -> str | None:
    """Why a run is partial as a whole (None: it is not), from the structured fields of its `wan_incomplete`
    record and its workers: interrupted or stopped early, a --wan-gpus worker that did not finish (one whose tests
    failed did finish: only those benchmarks are skipped), tests collected that never ran. A memory-capped run
    emulates a smaller card on this one's compute: its times are no budget for this card."""
    if run.memory_cap is not None:
        return (f"capped: run under a {run.memory_cap / 1e9:.2f} GB memory cap (it emulates a smaller card's memory on "
                f"this card's compute); budgets are made from uncapped runs")
    for worker in run.data.get("wan_workers") or []:
        if isinstance(worker, dict) and worker.get("status") not in ("ok", "tests failed"):
            return (f"partial: worker {worker.get('worker')} on {worker.get('device')} {worker.get('status')}"
                    + (f" ({worker['problem']})" if worker.get("problem") else ""))
    incomplete = run.data.get("wan_incomplete")
    if isinstance(incomplete, dict):
        if incomplete.get("stopped"):
            return f"partial: {incomplete['stopped']}"
        for worker in incomplete.get("workers") or []:
            if isinstance(worker, dict) and worker.get("status") not in ("ok", "tests failed"):
                return f"partial: worker {worker.get('index')} {worker.get('status')}"
        if incomplete.get("not_run"):
            not_run = list(incomplete["not_run"])
            return f"partial: {len(not_run)} collected test(s) never ran, e.g. {not_run[0]}"
    return None


def failed_tests(run: Run) -> dict[str, str]:
    """node id -> why, for each test of the run that failed: the session's own reason where it kept one, else the
    worker (and its log) it failed on."""
    failed: dict[str, str] = {}
    incomplete = run.data.get("wan_incomplete")
    why = incomplete.get("why") if isinstance(incomplete, dict) and isinstance(incomplete.get("why"), dict) else {}
    for worker in run.data.get("wan_workers") or []:
        outcomes = worker.get("outcomes") if isinstance(worker, dict) else None
        for nodeid, outcome in (outcomes or {}).items():
            if outcome == "failed":
                failed.setdefault(str(nodeid), f"failed on worker {worker.get('worker')} (its log: {worker.get('log')})")
    for nodeid in (incomplete.get("failed") or []) if isinstance(incomplete, dict) else []:
        if nodeid in why or nodeid not in failed:
            failed[str(nodeid)] = str(why.get(nodeid, "failed in its session"))
    return failed


def _requested_attention(info: dict) -> str | None:
    attention = info.get("attention")
    if isinstance(attention, dict):
        attention = attention.get("requested")
    return attention if isinstance(attention, str) and attention else None


def _compile_flag(info: dict) -> str | None:
    value = info.get("compile")
    if isinstance(value, dict):
        value = value.get("enabled")
    return None if value is None else "1" if value else "0"


def _gpu_name(run: Run, info: dict) -> str:
    """The name the case looked its budget up with: the device it ran on, or "cpu"."""
    gpu = info.get("gpu")
    if not isinstance(gpu, dict):
        return "cpu"
    for snapshot in (gpu.get("before"), gpu.get("after")):
        if isinstance(snapshot, dict) and snapshot.get("name"):
            return str(snapshot["name"])
    return run.gpu_name or "cpu"


def entries_of(run: Run, headroom: float, shown_path: str) -> tuple[list[BudgetEntry], list[str]]:
    """The budget entries of a run's generation benchmarks, and a note for each benchmark skipped."""
    info_run = run_info(run, 1)
    failed = failed_tests(run)
    entries: list[BudgetEntry] = []
    notes: list[str] = []
    seen: dict[tuple, str] = {}
    for bench in run.data["benchmarks"]:
        name = str(bench.get("name") or benchmark_key(bench))
        info = bench.get("extra_info") or {}
        if not isinstance(info.get("stages"), dict) or info.get("reference"):
            notes.append(f"skipped {name}: not a generation benchmark (budgets time whole generations)")
            continue
        if benchmark_key(bench) in failed:
            notes.append(f"skipped {name}: its test failed: {failed[benchmark_key(bench)]}")
            continue
        split = info.get("sequence_parallel")
        if isinstance(split, dict) and (split.get("degree") or 1) > 1:
            notes.append(f"skipped {name}: split over {split['degree']} GPUs; budgets have no sequence-parallel "
                         f"key, so its budget would be the one-GPU case's")
            continue
        values = {"preset": info.get("preset"), "mode": info.get("mode"), "precision": info.get("precision"),
                  "attention": _requested_attention(info), "compile": _compile_flag(info)}
        missing = sorted(k for k, v in values.items() if not isinstance(v, str) or not v)
        if missing:
            notes.append(f"skipped {name}: its extra_info lacks {', '.join(missing)}")
            continue
        stats = bench["stats"]
        median = float(stats["median"])
        rounds = stats.get("rounds") or len(stats.get("data") or []) or "?"
        mean, stddev = stats.get("mean"), stats.get("stddev")
        spread = f", CV {stddev / mean * 100:.2f} %" if isinstance(mean, (int, float)) and mean and \
            isinstance(stddev, (int, float)) else ""
        gpu = _gpu_name(run, info)
        versions = ", ".join(f"{label} {value}" for label, value in (
            ("driver", info_run.driver), ("torch", info_run.torch), ("diffusers", info_run.diffusers),
            ("commit", info_run.commit)) if value)
        source = (f"measured {median:.3f} s median ({rounds} rounds{spread}) on {gpu if gpu != 'cpu' else 'the CPU'}"
                  f", {info_run.date or 'undated'}{', ' + versions if versions else ''}; plus "
                  f"{headroom * 100:g} % headroom; {name} in {shown_path}")
        entry = BudgetEntry(gpu=gpu, seconds=budget_seconds(median, headroom), source=source, benchmark=name,
                            **values)
        if entry.key() in seen:
            notes.append(f"skipped {name}: same budget keys as {seen[entry.key()]}, kept that one")
            continue
        seen[entry.key()] = name
        entries.append(entry)
    return entries, notes


def _describe(run: Run) -> str:
    return f"{run.path} ({run.datetime[:19] or 'undated'}, {run.gpu_name or 'no GPU'})"


def make_budgets(source: str | Path, headroom: float = DEFAULT_HEADROOM, run_name: str | None = None) -> MadeBudgets:
    """Entries from `source`: a benchmark JSON file, or a storage folder's newest run that is not partial and has
    a generation benchmark to make a budget from (or the run named `run_name`: a file name or its start, e.g.
    0003)."""
    source = Path(source)
    if not source.exists():
        raise MakeBudgetsError(f"{source}: no such file or folder")
    notes: list[str] = []
    if source.is_file():
        if run_name:
            raise MakeBudgetsError(f"--run {run_name}: names a run inside a storage folder; {source} is one file")
        candidates = [load_run(source)]
    else:
        history = load_history(source)
        notes += [f"skipped unusable file {path}: {why}" for path, why in history.skipped]
        candidates = list(reversed(history.runs))  # newest first
        if run_name:
            candidates = [r for r in candidates if r.path.name == run_name or r.path.name.startswith(run_name)
                          or str(r.path).endswith(run_name)]
            if len(candidates) != 1:
                found = ", ".join(r.path.name for r in candidates) if candidates else "none"
                raise MakeBudgetsError(f"--run {run_name}: names {len(candidates)} run(s) in {source} ({found}); "
                                       f"name exactly one")
        if not candidates:
            raise MakeBudgetsError(f"{source}: no usable benchmark file in this folder")
    for run in candidates:
        problem = run_problem(run)
        if problem:
            notes.append(f"skipped run {_describe(run)}: {problem}")
            continue
        entries, skipped = entries_of(run, headroom, run.path.as_posix())
        if not entries:
            notes += skipped
            notes.append(f"skipped run {_describe(run)}: no generation benchmark to make a budget from")
            continue
        notes.append(f"using run {_describe(run)}")
        return MadeBudgets(run, entries, notes + skipped)
    where = f"{source}" if source.is_file() else f"{source}: no run in this folder"
    raise MakeBudgetsError(f"{where}: no budget can be made; " + "; ".join(notes))


# ------------------------------------------------------------------------------------------------ TOML


def render_entries(entries: list[BudgetEntry], header: str = "") -> str:
    """TOML text of the entries alone (what `wan-bench budgets` prints without --out)."""
    doc = tomlkit.document()
    for line in header.splitlines():
        doc.add(tomlkit.comment(line))
    if header:
        doc.add(tomlkit.nl())
    aot = tomlkit.aot()
    for entry in entries:
        aot.append(_table(entry, blank_line=False))  # a new array of tables separates its entries itself
    doc["budget"] = aot
    return tomlkit.dumps(doc)


def _table(entry: BudgetEntry, blank_line: bool = True):
    table = tomlkit.table()
    for key, value in entry.table().items():
        table[key] = value
    if blank_line:
        table.add(tomlkit.nl())
    return table


def _key_of(table) -> tuple[str, ...]:
    return tuple(str(table.get(k, "*")).lower() for k in KEYS)


def merge_entries(path: Path, entries: list[BudgetEntry]) -> tuple[str, list[str]]:
    """The text of budgets file `path` with the entries merged in, and what was replaced. Entries with the same
    keys are updated where they stand (seconds and source); new ones go before every other [[budget]] entry; an
    updated entry that an earlier one would shadow moves to the top too. Other entries, quality thresholds and
    comments stay as they are."""
    load_budgets(path)  # a budgets file the suite would refuse is refused here too, naming the entry
    try:
        doc = tomlkit.parse(path.read_text(encoding="utf-8"))
    except Exception as exc:  # tomlkit's parse errors have no common base worth naming
        raise MakeBudgetsError(f"budgets file {path}: cannot be edited: {exc}") from None
    if "budget" not in doc:
        doc["budget"] = tomlkit.aot()
    aot = doc["budget"]
    if not isinstance(aot, tomlkit.items.AoT):
        raise MakeBudgetsError(f"budgets file {path}: 'budget' is not an array of [[budget]] tables")
    notes: list[str] = []
    new = []
    for entry in entries:
        same = [i for i, table in enumerate(aot) if _key_of(table) == entry.key()]
        if not same:
            new.append(entry)
            continue
        table = aot[same[0]]
        old = table.get("seconds")
        table["seconds"] = entry.seconds
        table["source"] = entry.source
        notes.append(f"replaced the budget for {entry.benchmark} on {entry.gpu} (entry {same[0] + 1}: {old} s -> "
                     f"{entry.seconds:g} s)")
    for i, entry in enumerate(new):
        aot.insert(i, _table(entry))
    text = tomlkit.dumps(doc)
    # an updated entry shadowed by an earlier, broader one would never be checked: move it up
    budgets = _budgets_of(text, path)
    for entry in entries:
        found = entry.found_in(budgets)
        if found is not None and found.seconds == entry.seconds and found.source == entry.source:
            continue
        index = next(i for i, table in enumerate(aot) if _key_of(table) == entry.key())
        del aot[index]
        aot.insert(0, _table(entry))
        notes.append(f"moved the budget for {entry.benchmark} to the top: an earlier entry matched its case first")
        text = tomlkit.dumps(doc)
        budgets = _budgets_of(text, path)
    return text, notes


def _budgets_of(text: str, path: Path) -> Budgets:
    """The merged text as the suite will read it (checked before anything is written)."""
    try:
        return parse_budgets(text, path)
    except BudgetFileError as exc:
        raise MakeBudgetsError(f"merging into {path} would make an unusable file: {exc}") from None


def write_budgets(path: Path | str, entries: list[BudgetEntry], header: str = "") -> list[str]:
    """Write the entries into `path` atomically: merged when it exists, a new file otherwise; returns notes."""
    path = Path(path)
    if path.exists():
        text, notes = merge_entries(path, entries)
    else:
        text, notes = render_entries(entries, header), []
    atomic_write_bytes(path, text.encode("utf-8"))
    return notes


__all__ = ["BudgetEntry", "MadeBudgets", "MakeBudgetsError", "budget_seconds", "entries_of",
           "literal_pattern", "make_budgets", "merge_entries", "parse_headroom", "render_entries", "run_problem",
           "write_budgets"]

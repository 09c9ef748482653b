"""The package's layers: each module imports only its own layer or layers below it, no module imports itself back
through others, and the commands that need no model (plan, compare, trend, report, metrics) never import torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "wan_pipeline"

# Bottom -> top: a module may import from its own layer or from a layer below.
LAYERS = {"errors": 0, "fsutil": 0, "plan": 1, "measure": 2, "history": 3, "run": 4, "launch": 5, "suite": 6, "cli": 7}
TOP = 8  # wan_pipeline/__init__.py and __main__.py
HEAVY = ("torch", "diffusers", "transformers", "accelerate")
# Layers that never import the model stack, not even inside a function.
NO_TORCH = {"errors", "fsutil", "plan", "measure", "history"}
# Layers that import it only inside the functions that run a model (so importing them stays cheap).
TORCH_IN_FUNCTIONS_ONLY = {"launch", "suite", "cli"}
# Modules of higher layers that never import it, not even inside a function: the ComfyUI server does the work.
TORCH_FREE_MODULES = ("wan_pipeline.run.comfyui", "wan_pipeline.run.comfyui.client", "wan_pipeline.run.comfyui.case",
                      "wan_pipeline.suite.comfyui", "wan_pipeline.cli.comfyui")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> tuple[str | None, int]:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__main__",):
        return None, TOP
    return parts[1], LAYERS[parts[1]]


def imports_of(module: str) -> list[tuple[str, bool, int]]:
    """(imported module, at module level?, line) for every import in `module`, relative ones resolved;
    `from package import name` counts as importing package.name when that is a module."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, id(node) in top_level, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub if sub in MODULES else target, id(node) in top_level, node.lineno))
    return out


def test_every_module_is_in_a_layer():
    unknown = [m for m in MODULES
               if m.count(".") >= 1 and m.split(".")[1] not in LAYERS and m != "wan_pipeline.__main__"]
    assert not unknown, f"modules outside the layers {sorted(LAYERS)}: {unknown}"


def test_modules_import_only_their_own_layer_or_below():
    wrong = []
    for module in MODULES:
        name, level = layer_of(module)
        for target, _, line in imports_of(module):
            if target.split(".")[0] != "wan_pipeline" or target == "wan_pipeline":
                continue
            target_name, target_level = layer_of(target)
            if target_level > level:
                wrong.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {name} imports {target} ({target_name})")
    assert not wrong, "imports from a higher layer:\n" + "\n".join(wrong)


def test_the_model_stack_is_imported_only_where_a_model_runs():
    wrong = []
    for module in MODULES:
        name, _ = layer_of(module)
        for target, at_top, line in imports_of(module):
            if target.split(".")[0] not in HEAVY:
                continue
            if name in NO_TORCH or module in TORCH_FREE_MODULES or (at_top and name in TORCH_IN_FUNCTIONS_ONLY):
                wrong.append(f"{MODULES[module].relative_to(ROOT)}:{line}: imports {target}"
                             + (" at module level" if at_top else ""))
    assert not wrong, "\n".join(wrong)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circles():
    """Counting imports inside functions too: a circle through a lazy import is still a circle of the design."""
    graph = {m: {t for t, _, _ in imports_of(m) if t in MODULES and t != m} for m in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


# ------------------------------------------------------------------------------------------------ no torch at run time

FIXTURES = ROOT / "fixtures" / "workflows"

NO_TORCH_COMMANDS = {
    "plan-workflow": ["plan", "--workflow", str(FIXTURES / "users_variant.json")],  # auto mode: the device probe
    "plan-preset": ["plan", "--preset", "seed-832x1216-49f"],
    "plan-preset-json": ["plan", "--preset", "seed-832x1216-49f", "--json"],
    "plan-workflow-tiny": ["plan", "--mode", "tiny", "--workflow", str(FIXTURES / "users_variant.json")],
    "compare": ["compare", "{storage}/0001_a.json", "{storage}/0002_b.json"],
    "trend": ["trend", "{storage}"],
    "report": ["report", "{storage}", "--out", "{tmp}/report"],
    "metrics-help": ["metrics", "--help"],
    "budgets": ["budgets", "--from", str(ROOT / "docs" / "results"), "--out", "{tmp}/budgets.toml"],
    # a ComfyUI server that is not there: one clear error (exit 2), and no model stack loaded on the way
    "run-comfyui-unreachable": ["run", "--comfyui", "http://127.0.0.1:9", "--workflow",
                                str(FIXTURES / "users_variant.json")],
}
EXIT_CODES = {"compare": 1, "run-comfyui-unreachable": 2}


def benchmark_file(day: int, seconds: list[float]) -> dict:
    """A small pytest-benchmark session file: one benchmark with its rounds."""
    median = sorted(seconds)[len(seconds) // 2]
    bench = {"group": None, "name": "test_generation[seed]", "fullname": "tests/test_x.py::test_generation[seed]",
             "params": {}, "extra_info": {"mode": "tiny", "preset": "seed"},
             "stats": {"min": min(seconds), "max": max(seconds), "median": median, "mean": sum(seconds) / len(seconds),
                       "rounds": len(seconds), "data": seconds}}
    return {"machine_info": {"node": "box", "gpu": None}, "commit_info": {"id": f"c{day}"}, "benchmarks": [bench],
            "datetime": f"2026-01-{day:02d}T03:00:00+00:00", "version": "5.2.3"}


@pytest.mark.parametrize("name", sorted(NO_TORCH_COMMANDS))
def test_commands_that_need_no_model_never_import_torch(name, tmp_path):
    storage = tmp_path / "storage"
    storage.mkdir()
    for day, name_ in ((1, "a"), (2, "b")):
        seconds = [1.0 + 0.01 * i + 0.1 * (day - 1) for i in range(6)]
        (storage / f"000{day}_{name_}.json").write_text(json.dumps(benchmark_file(day, seconds)))
    args = [a.replace("{storage}", str(storage)).replace("{tmp}", str(tmp_path)) for a in NO_TORCH_COMMANDS[name]]
    code = ("import json, sys\n"
            "from wan_pipeline.cli.main import main\n"
            "try:\n"
            "    rc = main(json.loads(sys.argv[1]))\n"
            "except SystemExit as exc:\n"
            "    rc = exc.code\n"
            "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'accelerate') if m in sys.modules)\n"
            "print('HEAVY=' + json.dumps(heavy))\n"
            "sys.exit(rc or 0)\n")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=300)
    # compare exits 1 on a regression (the second run is 10 % slower): the command ran to its verdict
    assert proc.returncode == EXIT_CODES.get(name, 0), \
        f"wan-bench {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    heavy = [line for line in proc.stdout.splitlines() if line.startswith("HEAVY=")]
    assert heavy == ["HEAVY=[]"], f"wan-bench {' '.join(args)} imported {heavy}"


def test_the_comfyui_backend_imports_without_the_model_stack():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in TORCH_FREE_MODULES)
            + "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'accelerate') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout

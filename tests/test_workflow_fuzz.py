"""Fuzzing workflow.py with hypothesis on mutated real templates and fixtures.

Whatever the mutation, the result is a list of run configurations or a WorkflowError / ConfigError whose message
names the file: never another exception, never a hang.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="optional test dependency hypothesis is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from wan_pipeline.errors import WorkflowError  # noqa: E402
from wan_pipeline.plan.comfy import configs_from_workflow, load_workflow_configs  # noqa: E402
from wan_pipeline.plan.config import ConfigError, RunConfig  # noqa: E402
from wan_pipeline.plan.plan import make_plan  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = "video_wan2_2_14B_i2v.json"


def _sources() -> dict[str, dict]:
    out = {}
    for package in ("comfyui_workflow_templates_json", "comfyui_workflow_templates"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            path = os.path.join(list(spec.submodule_search_locations)[0], "templates", TEMPLATE)
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    out[package] = json.load(f)
    for name in ("users_variant.json", "users_variant_api.json"):
        with open(os.path.join(ROOT, "fixtures", "workflows", name), encoding="utf-8") as f:
            out[name] = json.load(f)
    return out


SOURCES = _sources()
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=8), st.just("enable"), st.just([]), st.just({}), st.just([1, 0]),
                 st.just(["1", 0]), st.just("floor(a * b + 1)"), st.just("a ** 99999"), st.just("1/0"))


def _containers(obj, path=()):
    """Every (container, key) pair in a JSON document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield obj, k
            yield from _containers(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield obj, i
            yield from _containers(v, path + (i,))


@st.composite
def mutated(draw):
    name = draw(st.sampled_from(sorted(SOURCES)))
    doc = copy.deepcopy(SOURCES[name])
    spots = list(_containers(doc))
    for _ in range(draw(st.integers(1, 4))):
        container, key = spots[draw(st.integers(0, len(spots) - 1))]
        try:
            current = container[key]
        except (KeyError, IndexError):
            continue
        action = draw(st.sampled_from(["replace", "delete", "mode", "swap"]))
        if action == "replace":
            container[key] = copy.deepcopy(draw(junk))  # st.just values are shared objects
        elif action == "delete":
            del container[key]
        elif action == "mode" and isinstance(current, dict) and "mode" in current:
            current["mode"] = draw(st.sampled_from([0, 2, 4, 1, -1]))
        elif action == "swap" and isinstance(current, list) and len(current) > 1:
            i, j = draw(st.integers(0, len(current) - 1)), draw(st.integers(0, len(current) - 1))
            current[i], current[j] = current[j], current[i]
        spots = list(_containers(doc))
        if not spots:
            break
    return name, doc


def _check(doc, source="fuzz.json"):
    try:
        configs = configs_from_workflow(doc, source)
    except (WorkflowError, ConfigError) as exc:
        assert source in str(exc)
        return None
    assert configs and all(isinstance(c, RunConfig) for c in configs)
    for c in configs:
        try:
            make_plan(c, "synthetic")
        except ConfigError:
            pass
    return configs


@pytest.mark.skipif(len(SOURCES) < 3, reason="real templates not installed (comfyui-workflow-templates-json, "
                                             "comfyui-workflow-templates==0.1.95)")
@SETTINGS
@given(mutated())
def test_mutated_templates_end_in_configs_or_a_clear_error(case):
    _name, doc = case
    _check(doc)


@SETTINGS
@given(st.sampled_from(sorted(SOURCES)), st.sampled_from([0, 2, 4]), st.data())
def test_random_node_modes(name, mode, data):
    doc = copy.deepcopy(SOURCES[name])
    nodes = doc.get("nodes") or (doc.get("definitions", {}).get("subgraphs") or [{}])[0].get("nodes") or []
    if not nodes:
        return
    for i in data.draw(st.lists(st.integers(0, len(nodes) - 1), max_size=5)):
        nodes[i]["mode"] = mode
    _check(doc)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.binary(max_size=200))
def test_arbitrary_bytes(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fuzz") / "blob.json"
    path.write_bytes(blob)
    try:
        load_workflow_configs(path)
    except WorkflowError as exc:
        assert "blob.json" in str(exc)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
                    max_leaves=20))
def test_arbitrary_json_values(value):
    _check(value)

"""Budget and quality-threshold lookup from the budgets TOML."""

from pathlib import Path

import pytest

from wan_pipeline.plan.budgets import DEFAULT_BUDGETS, BudgetFileError, load_budgets

SAMPLE = """
[[budget]]
gpu = "*RTX 4090 D*"
preset = "seed-832x1216-49f"
mode = "real"
seconds = 85
source = "users' good days"

[[budget]]
gpu = "NVIDIA H100*"
preset = "seed-832x1216-49f"
mode = "synthetic"
compile = "1"
precision = "fp8-*"
seconds = 20

[[budget]]
gpu = "NVIDIA H100*"
preset = "seed-*"
seconds = 60

[[quality]]
preset = "seed-*"
flicker_score_min = 0.9
motion_min = 0.1
"""


@pytest.fixture
def budgets(tmp_path):
    path = tmp_path / "budgets.toml"
    path.write_text(SAMPLE)
    return load_budgets(path)


def test_first_matching_entry_wins(budgets):
    assert budgets.budget_for("NVIDIA H100 80GB HBM3", "seed-832x1216-49f", "synthetic", "sdpa", True,
                              "fp8-scaled-mm").seconds == 20
    assert budgets.budget_for("NVIDIA H100 80GB HBM3", "seed-832x1216-49f", "synthetic", "sdpa", True,
                              "bf16").seconds == 60
    assert budgets.budget_for("NVIDIA H100 80GB HBM3", "seed-832x1216-49f", "synthetic", "sdpa", False).seconds == 60
    assert budgets.budget_for("NVIDIA H100 80GB HBM3", "seed-832x1216-81f", "real").seconds == 60


def test_gpu_pattern_is_case_insensitive(budgets):
    assert budgets.budget_for("NVIDIA GeForce RTX 4090 D", "seed-832x1216-49f", "real").seconds == 85


def test_no_budget_is_none(budgets):
    assert budgets.budget_for("NVIDIA A100-SXM4-80GB", "seed-832x1216-49f", "real") is None
    assert budgets.budget_for(None, "seed-832x1216-49f", "tiny") is None


def test_quality_violations_name_the_metric(budgets):
    q = budgets.quality_for("seed-832x1216-81f")
    assert q.violations({"flicker_score": 0.95, "motion": 0.5}) == []
    assert q.violations({"flicker_score": 0.8, "motion": 0.05}) == [
        "flicker_score = 0.8000 (below 0.9)", "motion = 0.0500 (below 0.1)"]
    assert budgets.quality_for("template-640x640-81f-4step") is None


@pytest.mark.parametrize("text, message", [
    ("[[budget]]\ngpu='x'\npreset='y'\n", r"lacks \['seconds'\]"),
    ("[[budget]]\ngpu='x'\npreset='y'\nseconds=-1\n", "positive number"),
    ("[[budget]]\ngpu='x'\npreset='y'\nseconds=1\nsecs=2\n", r"unknown keys \['secs'\]"),
    ("[[quality]]\npreset='x'\nflicker=1\n", r"unknown keys \['flicker'\]"),
    ("not toml [", "not valid TOML"),
])
def test_bad_budget_files_name_file_and_entry(tmp_path, text, message):
    path = tmp_path / "b.toml"
    path.write_text(text)
    with pytest.raises(BudgetFileError, match=message) as info:
        load_budgets(path)
    assert str(path) in str(info.value)


def test_missing_budget_file(tmp_path):
    with pytest.raises(BudgetFileError, match="does not exist"):
        load_budgets(tmp_path / "nope.toml")


def test_the_default_budgets_are_package_data():
    """An installed wheel has the default budgets: the file sits in the package and pyproject ships it."""
    import wan_pipeline.plan

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    assert DEFAULT_BUDGETS.parent == Path(wan_pipeline.plan.__file__).parent and DEFAULT_BUDGETS.is_file()
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert DEFAULT_BUDGETS.name in pyproject["tool"]["setuptools"]["package-data"]["wan_pipeline.plan"]


def test_shipped_budgets_file_loads_and_has_the_users_budget():
    budgets = load_budgets(DEFAULT_BUDGETS)
    b = budgets.budget_for("NVIDIA GeForce RTX 4090 D", "seed-832x1216-49f", "real")
    assert b is not None and b.seconds == 85


@pytest.mark.parametrize("preset, attention, compile_on, precision, seconds", [
    ("seed-832x1216-49f", "cudnn-fp8", True, "fp8-scaled-mm", 25.5),  # H100-measured 22.15 s + 15 %
    ("seed-832x1216-49f", "cudnn-fp8", True, "fp8-scaled-mm-fast", 22.2),  # fast accumulation: 19.30 s + 15 %
    ("seed-832x1216-81f", "cudnn-fp8", True, "fp8-scaled-mm-fast", 48.2),
    ("seed-832x1216-49f", "sdpa", True, "fp8-scaled-mm", 30.5),  # the cuDNN FP8 entry does not catch SDPA
    ("seed-832x1216-49f-cfg7.0", "cudnn-fp8", True, "fp8-scaled-mm", 44.5),
    ("seed-832x1216-81f", "cudnn-fp8", True, "fp8-scaled-mm", 53.7),
    ("seed-832x1216-81f", "sdpa", True, "fp8-scaled-mm", 66.2),
    ("seed-832x1216-81f", "sdpa", False, "fp8-scaled-mm", 78.3),
])
def test_shipped_h100_budgets_pick_the_entry_of_the_configuration(preset, attention, compile_on, precision, seconds):
    budgets = load_budgets(DEFAULT_BUDGETS)
    budget = budgets.budget_for("NVIDIA H100 80GB HBM3", preset, "synthetic", attention, compile_on, precision)
    assert budget is not None and budget.seconds == seconds

"""Start-up checks of the wan-bench options: the files they name (budgets, workflow, models folder) and the model
source `auto` resolves to, checked once in `pytest_configure`, before any test runs. A bad one is a usage error:
pytest prints its one line and exits 4, without a traceback, instead of every case failing after the others ran.
"""

from __future__ import annotations

import pytest

from wan_pipeline.suite.options import WanOptions


def check_option_files(options: WanOptions) -> None:
    """Raise pytest.UsageError naming the option and the file at fault."""
    from wan_pipeline.errors import WanBenchError

    checks = []
    if options.budgets:
        checks.append(("--wan-budgets / WAN_BUDGETS", _budgets))
    if options.workflow and not options.comfyui:  # a server runs what it can load: its prompt is checked there
        checks.append(("--wan-workflow / WAN_WORKFLOW", _workflow))
    if not options.comfyui:  # the server loads its own models
        checks.append(("--wan-models / WAN_MODELS_DIR", _mode))
    checks.append(("--wan-preset / --wan-vae-bands", _presets))
    for where, check in checks:
        try:
            check(options)
        except WanBenchError as exc:
            raise pytest.UsageError(f"{where}: {exc}") from None


def _budgets(options: WanOptions) -> None:
    from wan_pipeline.plan.budgets import load_budgets

    load_budgets(options.budgets)


def _workflow(options: WanOptions) -> None:
    from wan_pipeline.plan.comfy import load_workflow_configs

    load_workflow_configs(options.workflow)


def _mode(options: WanOptions) -> None:
    from wan_pipeline.suite.cases import mode_and_reason

    mode_and_reason(options)  # a models folder auto cannot use is an error naming the missing file


def _presets(options: WanOptions) -> None:
    """The presets with the session's execution options, within ComfyUI's bounds (vae bands against the frame)."""
    import warnings

    from wan_pipeline.plan.presets import get_preset

    for name in options.presets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_preset(name).replace(vae_bands=options.vae_bands, residency=options.residency).validate()

"""Feedback on long runs: a line per case as it starts and ends and one per round, the one-line message on Ctrl-C,
`wan-bench --version` and a `--help` with examples."""

import shutil
from importlib.metadata import version
from pathlib import Path

import pytest
from inner_sessions import cpu_only, plugin_args

from wan_pipeline.cli.main import main
from wan_pipeline.cli.run import interrupt_message

pytest_plugins = ["pytester"]

BENCHMARK_TEST = Path(__file__).parent / "benchmarks" / "test_generation.py"


def test_version_comes_from_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"wan-bench {version('wan-bench')}"


def test_help_shows_examples_not_a_docstring(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "wan-bench compare .benchmarks/<gpu-folder>" in out
    assert "wan-bench plan --preset seed-832x1216-49f" in out and "exit status:" in out
    assert "each module owning its own arguments" not in out  # the module docstring is for developers


def test_ctrl_c_in_run_says_what_was_kept(monkeypatch, capsys):
    import wan_pipeline.run.pipeline as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_and_save", interrupted)
    assert main(["run", "--mode", "tiny", "--out", "somewhere"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("wan-bench run: interrupted before any generation finished; nothing "
                                           "was written to somewhere")
    message = interrupt_message(["out/a.mp4", "out/a.json"], "out")
    assert message.startswith("interrupted; kept 2 file(s) of the finished generation(s) in out: out/a.mp4")


def test_each_case_says_when_it_starts_and_ends_and_each_round(pytester, monkeypatch):
    cpu_only(monkeypatch)
    shutil.copy(BENCHMARK_TEST, pytester.path / "test_generation.py")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *plugin_args(), "--wan-mode", "tiny",
                                           "--wan-preset", "seed-832x1216-49f", "--benchmark-min-rounds", "2",
                                           "--wan-warmup", "0", "--wan-video", "none", "-q")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([
        "wan-bench: case 1 of 1 starts: test_generation[[]seed-832x1216-49f-*]: preset seed-832x1216-49f, tiny mode, "
        "*(session *s)",
        "wan-bench:   round 1 of 2: * s (session *",
        "wan-bench:   round 2 of 2: * s (session *",
        "wan-bench: case 1 of 1 done in * s: test_generation[[]seed-832x1216-49f-*",
    ])

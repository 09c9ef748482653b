"""Feedback on long sessions: a line as each wan case starts and ends (preset, mode, precision, attention, case i of
n, elapsed) and one per timed round, written through pytest's terminal reporter with output capture suspended (as
pytest's live logging does), so a long run says what it is doing instead of printing only dots."""

from __future__ import annotations

import contextlib
import time

import pytest


class CaseProgress:
    """Registered by the plugin; `round_reporter` gives benchmark.pedantic a teardown that reports each round."""

    def __init__(self, config):
        self.config = config
        self.total = 0
        self.index = 0
        self.started = time.perf_counter()

    def _write(self, line: str) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        quiet = capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()
        with quiet:
            reporter.ensure_newline()
            reporter.write_line(line)

    def _elapsed(self) -> str:
        return _duration(time.perf_counter() - self.started)

    def pytest_collection_finish(self, session):
        from wan_pipeline.suite.cases import case_of

        self.total = sum(1 for item in session.items if case_of(item) is not None)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        from wan_pipeline.suite.cases import case_of

        case = case_of(item)
        if case is None:
            yield
            return
        self.index += 1
        c = case.config
        what = (f"{item.name}: preset {c.name}, {case.mode} mode, {c.precision}, {c.attention}, "
                f"compile {int(c.compile)}") if c is not None else f"{item.name}: on a ComfyUI server"
        self._write(f"wan-bench: case {self.index} of {self.total} starts: {what} (session {self._elapsed()})")
        start = time.perf_counter()
        outcome = yield
        skipped = outcome.excinfo is not None and issubclass(outcome.excinfo[0], pytest.skip.Exception)
        result = "skipped" if skipped else ("failed" if outcome.excinfo is not None else "done")
        self._write(f"wan-bench: case {self.index} of {self.total} {result} in "
                    f"{_duration(time.perf_counter() - start)}: {item.name} (session {self._elapsed()})")

    def round_reporter(self, rounds: int, seconds):
        """A pytest-benchmark `teardown` for benchmark.pedantic: after each timed round (outside the timed call),
        `round i of n: seconds`, the seconds read from the round's own record by `seconds()`."""
        count = [0]

        def report(*_args, **_kwargs):
            count[0] += 1
            self._write(f"wan-bench:   round {count[0]} of {rounds}: {seconds():.2f} s (session {self._elapsed()})")

        return report


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


PROGRESS_KEY = pytest.StashKey[CaseProgress]()


def track_progress(config) -> CaseProgress:
    progress = CaseProgress(config)
    config.stash[PROGRESS_KEY] = progress
    config.pluginmanager.register(progress, "wan-case-progress")
    return progress


@pytest.fixture
def wan_round_progress(pytestconfig):
    """`wan_round_progress(rounds, seconds)`: the teardown that prints `round i of n` after each timed round (None,
    no teardown, without the plugin's progress tracker)."""
    progress = pytestconfig.stash.get(PROGRESS_KEY, None)
    if progress is None:
        return lambda rounds, seconds: None
    return progress.round_reporter

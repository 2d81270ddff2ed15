"""Suite-wide rules: under CI=true a skipped test is a failed test; a test marked
``root`` is skipped, with the reason, when not run as root; in a checkout the user
cannot write (``make check`` as another user) Hypothesis keeps no example database."""

from __future__ import annotations

import os
from pathlib import Path

import hypothesis
import pytest

IN_CI = os.environ.get("CI") == "true"

if not os.access(Path(__file__).resolve().parent.parent, os.W_OK):
    # Its default database lives in the checkout; it would fall back to memory with a
    # warning per test.
    hypothesis.settings.register_profile("read-only-checkout", database=None)
    hypothesis.settings.load_profile("read-only-checkout")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    for item in items:
        if item.get_closest_marker("root"):
            item.add_marker(pytest.mark.skip(reason="marked root: needs root"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which is not allowed: {report.longrepr}"

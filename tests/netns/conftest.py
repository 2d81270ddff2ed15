"""Fixtures for the network-namespace tests: the ``bed`` factory.

Every test in this folder is marked ``netns`` and is skipped, with the reason, when the
machine cannot build namespaces (not root, no ``ip netns``); under CI=true the suite's
top-level conftest turns such skips into failures, on purpose.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lbd.testbed.bed import Bed, cleanup_stale, netns_unavailable_reason

HERE = Path(__file__).resolve().parent
UNAVAILABLE = netns_unavailable_reason()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.netns)
            if UNAVAILABLE:
                item.add_marker(pytest.mark.skip(reason=UNAVAILABLE))


@pytest.fixture(scope="session", autouse=True)
def _clean_stale_beds() -> None:
    """Remove beds left by crashed earlier runs (their builder process is dead)."""
    if not UNAVAILABLE:
        cleanup_stale()


def bed_prefix(test_name: str) -> str:
    """'lbdt-<up to 12 chars of the test name>-<4 hex>-': test-specific and unique."""
    slug = re.sub(r"[^a-z0-9]+", "", test_name.lower().removeprefix("test_"))[:12] or "t"
    return f"lbdt-{slug}-{secrets.token_hex(2)}-"


@pytest.fixture
def bed(request: pytest.FixtureRequest) -> Iterator[Callable[..., Bed]]:
    """Factory: ``bed(nodes=3, add_vip=True, ...)`` builds a Bed torn down after the test.

    Several beds per test are allowed; each has its own prefix.
    """
    built: list[Bed] = []

    def make(**kwargs: Any) -> Bed:
        the_bed = Bed(bed_prefix(request.node.name), **kwargs)
        built.append(the_bed)
        return the_bed.__enter__()

    try:
        yield make
    finally:
        for the_bed in reversed(built):
            the_bed.teardown()

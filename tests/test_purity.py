"""protocol/ is pure: no sockets, no asyncio, no clock, no threads (house rule).

Checked on the source's direct imports (numpy itself imports time, which is
fine: what matters is that the core never reads a clock or touches I/O).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

FORBIDDEN = {
    "socket",
    "asyncio",
    "time",
    "threading",
    "select",
    "selectors",
    "datetime",
    "subprocess",
    "signal",
    "nftables",
    "pyroute2",
    "asyncio_dgram",
}
PROTOCOL = Path(__file__).resolve().parent.parent / "protocol"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(PROTOCOL.glob("*.py")), ids=lambda p: p.name)
def test_protocol_module_is_pure(path: Path) -> None:
    assert not imported_modules(path) & FORBIDDEN


def test_the_check_would_catch_an_impure_module(tmp_path: Path) -> None:
    impure = tmp_path / "impure.py"
    impure.write_text("import time\nfrom asyncio import sleep\n")
    assert imported_modules(impure) & FORBIDDEN == {"time", "asyncio"}

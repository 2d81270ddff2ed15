"""lbd-cli's human output: what an operator reads in 80 columns."""

from __future__ import annotations

from typing import Any

from lbd.daemon.ctl import WIDTH, format_members


def row(node_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "address": "192.0.2.10",
        "state": "active",
        "slices": 100,
        "share": 33.3,
        "weight": 100,
        "last_heard_ms": 12,
        "incarnation": 1,
        "is_self": False,
        "key": "",
        "mismatch": [],
        "health": "ok",
        **extra,
    }


def test_members_name_each_unhealthy_node_and_why_within_80_columns() -> None:
    text = format_members(
        [
            row("web1", is_self=True),
            row("web2", health="unhealthy: check"),
            row("web3", health="unhealthy: interface, agent"),
        ]
    )
    lines = text.splitlines()
    assert "  web2 is unhealthy: check" in lines
    assert "  web3 is unhealthy: interface, agent" in lines
    assert not any("web1 is" in line for line in lines)
    assert max(len(line) for line in lines) <= WIDTH

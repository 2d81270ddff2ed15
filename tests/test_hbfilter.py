"""The heartbeat filter's rule text (netcfg/hbfilter.py) and the interface's subnets.

The kernel side (the table installed by a real daemon dropping what it must) is
tests/netns/test_hostile.py.
"""

from __future__ import annotations

import ipaddress

import pytest

from lbd.netcfg.hbfilter import (
    COUNTERS,
    HB_TABLE,
    FilterSpec,
    HeartbeatFilter,
    filter_commands,
    interface_networks,
    set_commands,
)
from lbd.protocol.wire import MAX_DATAGRAM, MIN_DATAGRAM


def spec(**kw: object) -> FilterSpec:
    args: dict[str, object] = {
        "interface": "eth0",
        "port": 7946,
        "segment": ["192.0.2.0/24"],
        "peers": [],
        **kw,
    }
    return FilterSpec.build(**args)  # type: ignore[arg-type]


def test_every_table_statement_is_owner_flagged() -> None:
    cmds = filter_commands(spec())
    tables = [c for c in cmds if c.startswith(("add table", "create table", "table"))]
    assert tables == [f"add table inet {HB_TABLE} {{ flags owner; }}"]
    assert cmds[0] == tables[0]  # created before anything names it


def test_rules_accept_segment_on_the_interface_and_peers_anywhere() -> None:
    cmds = filter_commands(spec(peers=["198.51.100.7"]))
    rules = [c.removeprefix(f"add rule inet {HB_TABLE} ") for c in cmds if c.startswith("add rule")]
    assert rules == [
        "input meta nfproto ipv4 udp dport 7946 jump heartbeat",
        'heartbeat iifname "eth0" ip saddr @segment goto valid',
        "heartbeat ip saddr @peers goto valid",
        'heartbeat counter name "foreign" drop',
        f'valid udp length {MIN_DATAGRAM + 8}-{MAX_DATAGRAM + 8} counter name "passed" accept',
        'valid counter name "badlen" drop',
    ]
    assert (
        f"add chain inet {HB_TABLE} input {{ type filter hook input priority -160; "
        "policy accept; }" in cmds
    )
    assert [f"add counter inet {HB_TABLE} {name}" for name in COUNTERS] == [
        c for c in cmds if c.startswith("add counter")
    ]
    assert f"add element inet {HB_TABLE} peers {{ 198.51.100.7 }}" in cmds
    assert f"add element inet {HB_TABLE} segment {{ 192.0.2.0/24 }}" in cmds


def test_size_bounds_follow_the_wire_format() -> None:
    """The bounds are the wire format's constants, as UDP length fields (+ 8)."""
    assert spec().udp_lengths == (MIN_DATAGRAM + 8, MAX_DATAGRAM + 8)
    text = "\n".join(filter_commands(spec(min_size=40, max_size=1472)))
    assert "udp length 48-1480 " in text


def test_segment_is_merged_and_peers_deduplicated() -> None:
    """An interval set refuses overlapping elements: a VIP's /32 inside the subnet,
    a subnet given twice, neighbouring halves all merge."""
    s = spec(
        segment=[
            "192.0.2.0/25",
            "192.0.2.128/25",
            "192.0.2.100/32",
            "10.1.2.3/16",
            ipaddress.IPv4Network("192.0.2.0/24"),
        ],
        peers=["10.9.9.9", "10.9.9.9", "10.0.0.1"],
    )
    assert [str(n) for n in s.segment] == ["10.1.0.0/16", "192.0.2.0/24"]
    assert [str(p) for p in s.peers] == ["10.0.0.1", "10.9.9.9"]


def test_empty_sets_get_no_elements() -> None:
    cmds = filter_commands(spec(segment=[], peers=[]))
    assert not [c for c in cmds if c.startswith("add element")]


def test_set_replacement_is_one_flush_and_refill() -> None:
    assert set_commands(spec(peers=["10.0.0.1"]), flush=True) == [
        f"flush set inet {HB_TABLE} segment",
        f"flush set inet {HB_TABLE} peers",
        f"add element inet {HB_TABLE} segment {{ 192.0.2.0/24 }}",
        f"add element inet {HB_TABLE} peers {{ 10.0.0.1 }}",
    ]


@pytest.mark.parametrize(
    "bad",
    [
        {"interface": 'eth0" accept #'},
        {"interface": ""},
        {"interface": "x" * 16},
        {"port": 0},
        {"port": 65536},
        {"min_size": 0},
        {"min_size": 100, "max_size": 99},
        {"max_size": 65528},
        {"peers": ["2001:db8::1"]},
        {"segment": ["not an address"]},
    ],
)
def test_bad_values_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        spec(**bad)


def test_update_without_a_table_only_changes_the_spec() -> None:
    hb = HeartbeatFilter("eth0", 7946, ["192.0.2.0/24"], ["10.0.0.1"])
    assert not hb.installed and hb.counters() == {}
    hb.update(peers=["10.0.0.2", "10.0.0.3"])
    assert [str(p) for p in hb.spec.peers] == ["10.0.0.2", "10.0.0.3"]
    assert [str(n) for n in hb.spec.segment] == ["192.0.2.0/24"]
    hb.remove()  # nothing installed: nothing to do


def test_interface_networks_reads_the_kernel() -> None:
    """Loopback is interface 1 in every namespace and carries 127.0.0.1/8."""
    assert ipaddress.IPv4Network("127.0.0.0/8") in interface_networks(1)
    assert interface_networks(2**31 - 1) == []  # no such interface: nothing

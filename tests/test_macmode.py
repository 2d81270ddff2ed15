"""Cluster-MAC modes (multicast, flood) without a kernel: MAC derivation, the
checksum-neutral ND option rewrite, the nft text, the config keys (mac_mode,
cluster_mac)."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbd.daemon.config import ConfigFileError, DaemonConfig, parse_config
from lbd.netcfg.macfilter import is_group_mac, mac_bytes
from lbd.netcfg.macmode import (
    MacMode,
    MacModeSpec,
    answer_commands,
    as_owned,
    derive_cluster_mac,
    nd_compensation,
    ones_sum,
    owned_twin,
    remove_commands,
    table_commands,
)

VIP6 = "2001:db8:1::100"
ROUTER6 = "2001:db8:1::1"


def test_derived_mac_is_group_local_stable_and_per_cluster() -> None:
    mac = derive_cluster_mac("web")
    assert mac == derive_cluster_mac("web")
    assert mac != derive_cluster_mac("dns")
    assert mac.startswith("03:00:5e:")
    first = mac_bytes(mac)[0]
    assert first & 1 and first & 2  # group bit, locally administered bit
    assert is_group_mac(mac) and not is_group_mac("02:00:00:00:01:0b")


def _checksum(data: bytes) -> int:
    return ~ones_sum(data) & 0xFFFF


def _icmp6_ok(src: str, dst: str, icmp: bytes) -> bool:
    pseudo = (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!I3xB", len(icmp), 58)
    )
    return _checksum(pseudo + icmp) == 0


def _na(target: str, lladdr: bytes, flags: int = 0x60) -> bytes:
    """A Neighbor Advertisement with a TLLA option and a valid checksum (as Linux sends)."""
    body = struct.pack("!BBHB3x", 136, 0, 0, flags) + ipaddress.IPv6Address(target).packed
    body += bytes([2, 1]) + lladdr
    csum = _checksum(
        ipaddress.IPv6Address(VIP6).packed
        + ipaddress.IPv6Address(ROUTER6).packed
        + struct.pack("!I3xB", len(body), 58)
        + body
    )
    return body[:2] + struct.pack("!H", csum) + body[4:]


def _rewrite(packet: bytes, own: str, cluster: str) -> bytes:
    """What the nft rule does: TLLA (bytes 26..31) := cluster, bytes 6..7 := comp."""
    assert packet[26:32] == mac_bytes(own) and packet[6:8] == b"\0\0"
    comp = nd_compensation(own, cluster)
    return packet[:6] + struct.pack("!H", comp) + packet[8:26] + mac_bytes(cluster)


@given(
    own=st.binary(min_size=6, max_size=6),
    cluster=st.binary(min_size=6, max_size=6),
    flags=st.sampled_from([0x20, 0x40, 0x60, 0xE0]),
)
def test_nd_rewrite_keeps_the_icmpv6_checksum_valid(own: bytes, cluster: bytes, flags: int) -> None:
    own_mac = ":".join(f"{b:02x}" for b in own)
    cluster_mac = ":".join(f"{b:02x}" for b in cluster)
    na = _na(VIP6, own, flags)
    assert _icmp6_ok(VIP6, ROUTER6, na)
    out = _rewrite(na, own_mac, cluster_mac)
    assert out[26:32] == cluster and out[4] == flags  # R/S/O flags untouched
    assert _icmp6_ok(VIP6, ROUTER6, out)


def test_table_text_for_both_families() -> None:
    spec = MacModeSpec.build(
        "eth0", "03:00:5e:11:22:33", "02:00:00:00:01:0b", ["192.0.2.100", f"{VIP6}/128"]
    )
    text = "\n".join(table_commands(spec))
    assert 'iifname "eth0" ether daddr 03:00:5e:11:22:33 meta pkttype set host' in text
    assert "arp saddr ip { 192.0.2.100 } arp saddr ether set 03:00:5e:11:22:33" in text
    assert "arp operation request arp daddr ip { 192.0.2.100 } iifname != @answer drop" in text
    assert "nd-neighbor-solicit @th,64,128 0x20010db8000100000000000000000100" in text
    assert "@th,208,48 0x02000000010b" in text and "@th,208,48 set 0x03005e112233" in text
    assert f"@th,48,16 set {nd_compensation('02:00:00:00:01:0b', '03:00:5e:11:22:33')}" in text
    # Chains are flushed (exact re-assert), the answer sets never are.
    assert "flush chain inet lbd_mac pre" in text and "flush set" not in text


def test_no_arp_table_without_an_ipv4_vip_and_answer_text() -> None:
    spec = MacModeSpec.build("eth1", "03:00:5e:11:22:33", "02:00:00:00:01:0b", [VIP6])
    assert not any(c.startswith(("add table arp", "add rule arp")) for c in table_commands(spec))
    cmds = answer_commands(spec, 560)
    assert cmds[-1] == 'add element inet lbd_mac answer { "eth1" timeout 560ms }'
    assert len(answer_commands(spec, None)) == 2  # add + delete: withdrawn
    assert "delete table arp lbd_mac" in remove_commands()
    assert remove_commands()[-1] == "delete table netdev lbd_mac"


def test_flood_mac_is_unicast_local_stable_and_per_cluster() -> None:
    mac = derive_cluster_mac("web", "flood")
    assert mac == derive_cluster_mac("web", "flood") != derive_cluster_mac("dns", "flood")
    assert mac.startswith("02:6c:")
    first = mac_bytes(mac)[0]
    assert not first & 1 and first & 2  # unicast, locally administered


def test_flood_table_text() -> None:
    cmac, own = "02:6c:11:22:33:44", "02:00:00:00:01:0b"
    spec = MacModeSpec.build("eth0.10", cmac, own, ["192.0.2.100", VIP6])
    assert spec.flood
    cmds = table_commands(spec)
    text = "\n".join(cmds)
    # Frames TO the cluster MAC made the node's own at ingress (not prerouting: IP
    # drops PACKET_OTHERHOST before it), frames FROM it never sent.
    assert (
        'add chain netdev lbd_mac ingress { type filter hook ingress device "eth0.10" '
        "priority -500; policy accept; }"
    ) in cmds
    assert f"add rule netdev lbd_mac ingress ether daddr {cmac} meta pkttype set host" in cmds
    assert f"add rule netdev lbd_mac egress ether saddr {cmac} counter drop" in cmds
    assert not any(c.startswith("add rule inet") and "pkttype" in c for c in cmds)
    # The same ARP/ND rewrite and single responder as multicast mode.
    assert f"arp saddr ip {{ 192.0.2.100 }} arp saddr ether set {cmac}" in text
    assert "iifname != @answer drop" in text
    assert f"@th,48,16 set {nd_compensation(own, cmac)}" in text
    assert "flush chain netdev lbd_mac ingress" in text
    assert not any("netdev" in c for c in answer_commands(spec, 100))
    assert [f for f in ("inet", "arp", "netdev") if f"add table {f} lbd_mac" in text] == [
        "inet",
        "arp",
        "netdev",
    ]
    multicast = table_commands(MacModeSpec.build("eth0", "03:00:5e:11:22:33", own, [VIP6]))
    assert not any("netdev" in c for c in multicast)


def test_owned_twin_text() -> None:
    """Kernels < 6.9: the twin holds the same rules in owned tables of its own name."""
    spec = MacModeSpec.build("eth0", "02:6c:11:22:33:44", "02:00:00:00:01:0b", ["192.0.2.100"])
    twin = as_owned(table_commands(owned_twin(spec)))
    assert [c for c in twin if c.startswith("add table")] == [
        "add table inet lbd_mac_owned { flags owner; }",
        "add table netdev lbd_mac_owned { flags owner; }",
        "add table arp lbd_mac_owned { flags owner; }",
    ]
    plain = [c for c in table_commands(spec) if not c.startswith("add table")]
    assert [c.replace("lbd_mac_owned", "lbd_mac") for c in twin if "add table" not in c] == plain
    assert all("lbd_mac_owned" in c for c in answer_commands(owned_twin(spec), 100))


def test_spec_refuses_the_interface_wearing_the_cluster_mac() -> None:
    with pytest.raises(ValueError, match="wears the cluster MAC"):
        MacModeSpec.build("eth0", "02:6c:00:00:01:64", "02:6C:00:00:01:64", ["192.0.2.100"])
    with pytest.raises(ValueError, match="group MAC"):
        MacModeSpec.build("eth0", "02:6c:00:00:01:64", "03:00:00:00:01:64", ["192.0.2.100"])


def test_restore_with_nothing_recorded_is_a_no_op(tmp_path: Path) -> None:
    mode = MacMode(
        "eth0", ["192.0.2.100"], "03:00:5e:11:22:33", state_file=tmp_path / "macmode.json"
    )
    mode.restore()  # no kernel access needed, nothing raised
    assert not (tmp_path / "macmode.json").exists()


def test_config_mac_mode_default_and_validation() -> None:
    base = {"vips": ["192.0.2.100"]}
    cfg = parse_config(base)
    assert cfg.mac_mode == "flood"  # the default: works on the most networks (README)
    assert cfg.effective_cluster_mac() == derive_cluster_mac("lbd", "flood")
    # The seed's recipe: a MAC to wear and no mode means shared, as before.
    cfg = parse_config({**base, "cluster_mac": "02:00:5e:00:01:64"})
    assert cfg.mac_mode == "shared" and cfg.effective_cluster_mac() == "02:00:5e:00:01:64"
    assert parse_config({**base, "mac_mode": "shared"}).effective_cluster_mac() is None
    cfg = parse_config({**base, "mac_mode": "multicast", "cluster": "web"})
    assert cfg.effective_cluster_mac() == derive_cluster_mac("web")
    cfg = parse_config({**base, "mac_mode": "multicast", "cluster_mac": "03:00:5E:00:00:01"})
    assert cfg.effective_cluster_mac() == "03:00:5e:00:00:01"
    assert DaemonConfig(cluster_mac="02:00:5e:00:01:64").effective_cluster_mac() == (
        "02:00:5e:00:01:64"
    )
    cfg = parse_config({**base, "mac_mode": "flood", "cluster": "web"})
    assert cfg.effective_cluster_mac() == derive_cluster_mac("web", "flood")
    assert dict(cfg.agreed_shared())["cluster_mac"] == derive_cluster_mac("web", "flood")
    cfg = parse_config({**base, "mac_mode": "flood", "cluster_mac": "02:6C:00:00:00:01"})
    assert cfg.effective_cluster_mac() == "02:6c:00:00:00:01"
    bad = [
        ({"mac_mode": "hub"}, "mac_mode"),
        ({"mac_mode": "multicast", "cluster_mac": "02:00:5e:00:01:64"}, "unicast MAC"),
        ({"mac_mode": "multicast", "cluster_mac": "ff:ff:ff:ff:ff:ff"}, "broadcast"),
        ({"cluster_mac": "03:00:5e:00:00:01"}, "multicast MAC"),
        ({"mac_mode": "flood", "cluster_mac": "03:00:5e:00:00:01"}, "needs a unicast MAC"),
        ({"mac_mode": "flood", "cluster_mac": "00:00:00:00:00:00"}, "cannot be a cluster"),
        ({"mac_mode": "flud"}, '"shared", "multicast" or "flood"'),
    ]
    for extra, words in bad:
        with pytest.raises(ConfigFileError, match=words):
            parse_config({**base, **extra}, "/etc/lbd/lbd.toml")

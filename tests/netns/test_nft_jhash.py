"""The kernel's ``jhash`` agrees with lbd.protocol.jhash.bucket_of, address by address.

One private namespace; a script inside it installs an output-hook table whose rules
record ``saddr . jhash(saddr [& mask]) mod B seed S`` in dynamic sets for several
(B, seed, prefix) configurations, sends one UDP datagram from each of several
hundred IPv4 and IPv6 source addresses (AnyIP routes, IPV6_FREEBIND; nothing leaves
the namespace: the rule drops the datagrams), and prints the sets as JSON.
"""

from __future__ import annotations

import ipaddress
import json
import random
import subprocess
import sys
import uuid

import pytest

from lbd.protocol.jhash import bucket_of

pytestmark = pytest.mark.netns

# (buckets, seed, prefix4, prefix6)
CONFIGS = [
    (4096, 0x1234, 32, 128),
    (65536, 0, 32, 128),
    (7, 0xFFFFFFFF, 32, 128),
    (1000, 0xDEADBEEF, 24, 56),
    (64, 42, 16, 48),
    (1, 5, 32, 128),
]

DST4 = "203.0.113.254"
DST6 = "2001:db8:ffff::1"

# Runs inside the namespace: load the table, send, print the recorded sets.
SCRIPT = r"""
import json, socket, sys
import nftables
text, srcs4, srcs6, names, dst4, dst6 = json.loads(sys.stdin.read())
nft = nftables.Nftables()
nft.set_json_output(True)
rc, out, err = nft.cmd(text)
assert rc == 0, err
for fam, srcs, dst in ((socket.AF_INET, srcs4, dst4), (socket.AF_INET6, srcs6, dst6)):
    for src in srcs:
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            if fam == socket.AF_INET:
                s.setsockopt(socket.IPPROTO_IP, 15, 1)  # IP_FREEBIND
            else:
                s.setsockopt(socket.IPPROTO_IPV6, 78, 1)  # IPV6_FREEBIND
            s.bind((src, 0))
            try:
                s.sendto(b"x", (dst, 9))
            except OSError:
                pass  # EPERM from the drop rule
result = {}
for name in names:
    rc, out, err = nft.cmd(f"list set inet jt {name}")
    assert rc == 0, err
    elems = json.loads(out)["nftables"][1]["set"].get("elem", [])
    result[name] = {e["concat"][0]: e["concat"][1] for e in elems}
print(json.dumps(result))
"""


def _mask(version: int, prefix: int) -> str:
    if prefix == (32 if version == 4 else 128):
        return ""
    zero = "0.0.0.0" if version == 4 else "::"
    return f" & {ipaddress.ip_network(f'{zero}/{prefix}').netmask}"


def _table() -> tuple[str, list[str]]:
    """An output-hook table recording ``saddr . jhash(...)`` per configuration."""
    sets, rules, names = [], [], []
    for i, (buckets, seed, p4, p6) in enumerate(CONFIGS):
        for fam, proto, dst, prefix, key in (
            ("a", "ip", DST4, p4, "ip saddr"),
            ("b", "ip6", DST6, p6, "ip6 saddr"),
        ):
            name = f"{fam}{i}"
            names.append(name)
            sets.append(
                f"set {name} {{ typeof {key} . numgen inc mod 4096; flags dynamic; size 4096; }}"
            )
            mask = _mask(4 if proto == "ip" else 6, prefix)
            rules.append(
                f"{proto} daddr {dst} update @{name} "
                f"{{ {key} . jhash {key}{mask} mod {buckets} seed {seed} }}"
            )
    rules += [f"ip daddr {DST4} drop", f"ip6 daddr {DST6} drop"]
    chain = "chain out { type filter hook output priority 0; policy accept;\n"
    text = "table inet jt {\n" + "\n".join(sets) + "\n" + chain + "\n".join(rules) + "\n}\n}\n"
    return text, names


def _sources() -> tuple[list[str], list[str]]:
    rng = random.Random(20240605)
    v4 = [f"198.51.100.{i}" for i in range(1, 255)]
    v4 += [f"203.0.113.{i}" for i in range(1, 40)] + [f"192.0.2.{i}" for i in range(1, 40)]
    v4 += ["198.51.100.0", "198.51.100.255"]
    net6 = int(ipaddress.IPv6Address("2001:db8::"))
    v6 = [str(ipaddress.IPv6Address(net6 + rng.getrandbits(96))) for _ in range(90)]
    # Siblings inside one /56 and one /48, so masked configurations share buckets.
    base = int(ipaddress.IPv6Address("2001:db8:42:1200::"))
    v6 += [str(ipaddress.IPv6Address(base + (k << 64) + rng.getrandbits(64))) for k in range(8)]
    v6 += ["2001:db8::1", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"]
    return v4, v6


def test_kernel_jhash_matches_bucket_of() -> None:
    ns = f"lbdt-nft-j{uuid.uuid4().hex[:6]}"
    v4, v6 = _sources()
    text, names = _table()
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        setup = [
            "link set lo up",
            # AnyIP: IPv4 output routing insists on a local source (IP_FREEBIND is
            # not enough there); IPv6 takes any source with IPV6_FREEBIND.
            "route add local 198.51.100.0/24 dev lo",
            "route add local 203.0.113.0/24 dev lo",
            "route add local 192.0.2.0/24 dev lo",
            "addr add 2001:db8:ffff::1/128 dev lo nodad",
        ]
        subprocess.run(
            ["ip", "-n", ns, "-batch", "-"], input="\n".join(setup) + "\n", text=True,
            check=True, timeout=10,
        )  # fmt: skip
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", SCRIPT],
            input=json.dumps([text, v4, v6, names, DST4, DST6]),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        kernel = json.loads(out.stdout)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)
    checked = 0
    for i, (buckets, seed, p4, p6) in enumerate(CONFIGS):
        got4, got6 = kernel[f"a{i}"], kernel[f"b{i}"]
        assert set(got4) == set(v4), "every IPv4 source must reach the rule"
        assert {str(ipaddress.ip_address(a)) for a in got6} == set(v6)
        for addr, bucket in [*got4.items(), *got6.items()]:
            mine = bucket_of(addr, buckets, seed, prefix4=p4, prefix6=p6)
            assert mine == bucket, f"{addr} B={buckets} seed={seed:#x} /{p4} /{p6}"
            checked += 1
    assert checked == len(CONFIGS) * (len(v4) + len(v6))

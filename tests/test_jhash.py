"""bucket_of against vectors the kernel computed (nft ``jhash``), plus edge cases.

The vectors were read back from a kernel 6.18 namespace with the dynamic-set rule of
tests/netns/test_nft_jhash.py (``update @s { ip saddr . jhash ip saddr mod B seed S }``);
that test re-checks hundreds of addresses against the live kernel on every run.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbd.protocol.jhash import bucket_of, jhash, reciprocal_scale

# (buckets, seed, prefix4, prefix6) -> {address: bucket the kernel chose}
KERNEL_VECTORS: list[tuple[tuple[int, int, int, int], dict[str, int]]] = [
    (
        (4096, 0x1234, 32, 128),
        {
            "203.0.113.7": 754, "198.51.100.255": 1457, "198.51.100.1": 1927,
            "198.51.100.0": 1929, "192.0.2.200": 2836, "198.51.100.2": 4035,
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff": 94, "2001:db8:2::1": 191,
            "2001:db8::1": 285, "2001:db8:42:1234:5678:9abc:def0:1": 1892,
            "2001:db8:42:12ff::1": 2053,
        },
    ),
    (
        (65536, 0, 32, 128),
        {
            "198.51.100.255": 380, "198.51.100.2": 15151, "198.51.100.0": 16091,
            "192.0.2.200": 32022, "198.51.100.1": 36776, "203.0.113.7": 43636,
            "2001:db8::1": 3675, "2001:db8:42:1234:5678:9abc:def0:1": 4366,
            "2001:db8:2::1": 10685, "2001:db8:42:12ff::1": 26364,
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff": 38069,
        },
    ),
    (
        (7, 0xFFFFFFFF, 32, 128),
        {
            "198.51.100.1": 0, "198.51.100.255": 1, "198.51.100.0": 2, "203.0.113.7": 5,
            "198.51.100.2": 6, "192.0.2.200": 6, "2001:db8:42:12ff::1": 0,
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff": 1, "2001:db8::1": 2,
            "2001:db8:2::1": 2, "2001:db8:42:1234:5678:9abc:def0:1": 2,
        },
    ),
    (
        (1000, 0xDEADBEEF, 24, 56),
        {
            "198.51.100.0": 7, "198.51.100.1": 7, "198.51.100.2": 7, "198.51.100.255": 7,
            "203.0.113.7": 78, "192.0.2.200": 374, "2001:db8::1": 298,
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff": 397, "2001:db8:42:12ff::1": 760,
            "2001:db8:42:1234:5678:9abc:def0:1": 760, "2001:db8:2::1": 783,
        },
    ),
    (
        (4096, 0x1BD, 32, 128),
        {
            "198.51.100.0": 325, "192.0.2.200": 1477, "198.51.100.2": 1931,
            "198.51.100.1": 2859, "198.51.100.255": 3290, "203.0.113.7": 3488,
            "2001:db8::1": 165, "2001:db8:42:1234:5678:9abc:def0:1": 458,
            "2001:db8:2::1": 919, "2001:db8:42:12ff::1": 2342,
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff": 2648,
        },
    ),
]  # fmt: skip


@pytest.mark.parametrize(("config", "vectors"), KERNEL_VECTORS)
def test_kernel_vectors(config: tuple[int, int, int, int], vectors: dict[str, int]) -> None:
    buckets, seed, p4, p6 = config
    for addr, bucket in vectors.items():
        assert bucket_of(addr, buckets, seed, prefix4=p4, prefix6=p6) == bucket, addr


def test_accepts_address_objects_and_normalises_text() -> None:
    assert bucket_of(ipaddress.IPv4Address("198.51.100.1"), 4096, 0x1234) == 1927
    assert bucket_of(ipaddress.IPv6Address("2001:db8::1"), 4096, 0x1234) == 285
    assert bucket_of("2001:0db8:0000::0001", 4096, 0x1234) == 285


def test_lookup3_reference_values() -> None:
    # Bob Jenkins' lookup3 hashlittle() self-test values: the kernel's jhash is the
    # same function (same init, mix and final) on a little-endian CPU.
    assert jhash(b"", 0) == 0xDEADBEEF
    assert jhash(b"", 0xDEADBEEF) == 0xBD5B7DDE
    assert jhash(b"Four score and seven years ago", 0) == 0x17770551
    assert jhash(b"Four score and seven years ago", 1) == 0xCD628161


def test_tail_lengths_all_defined() -> None:
    # Lengths 1..40 exercise every tail case and the 12-byte block loop.
    seen = {jhash(bytes(range(n)), 7) for n in range(1, 41)}
    assert len(seen) == 40
    assert all(0 <= h < 2**32 for h in seen)


def test_reciprocal_scale() -> None:
    assert reciprocal_scale(0, 10) == 0
    assert reciprocal_scale(0xFFFFFFFF, 10) == 9
    assert reciprocal_scale(0x80000000, 4096) == 2048
    assert reciprocal_scale(0x1_0000_0005, 2) == 0  # only the low 32 bits count


def test_prefix_affinity() -> None:
    assert len({bucket_of(f"198.51.100.{i}", 4096, 9, prefix4=24) for i in range(256)}) == 1
    same56 = [f"2001:db8:1:2{i:02x}::{i}" for i in range(256)]
    assert len({bucket_of(a, 4096, 9, prefix6=56) for a in same56}) == 1
    # /0 sends everything to one bucket; different /24s still spread.
    assert bucket_of("192.0.2.1", 4096, 9, prefix4=0) == bucket_of("203.0.113.9", 4096, 9, 0)
    spread = {bucket_of(f"10.{i}.{i}.1", 4096, 9, prefix4=24) for i in range(64)}
    assert len(spread) > 50


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"buckets": 0}, "buckets"),
        ({"buckets": 2**32}, "buckets"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"prefix4": 33}, "prefix"),
        ({"prefix4": -1}, "prefix"),
    ],
)
def test_rejects_bad_arguments(kwargs: dict[str, int], message: str) -> None:
    args = {"buckets": 16, "seed": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        bucket_of("192.0.2.1", **args)


def test_rejects_bad_address() -> None:
    with pytest.raises(ValueError):
        bucket_of("not-an-address", 16, 1)
    with pytest.raises(ValueError, match="prefix"):
        bucket_of("2001:db8::1", 16, 1, prefix6=129)


@given(
    st.ip_addresses(),
    st.integers(1, 2**32 - 1),
    st.integers(0, 2**32 - 1),
)
def test_always_in_range(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address, b: int, s: int
) -> None:
    assert 0 <= bucket_of(addr, b, s) < b


def test_spread_is_even_enough() -> None:
    counts = [0] * 16
    for i in range(16 * 512):
        counts[bucket_of(ipaddress.IPv4Address(0xC6336400 + i), 16, 0x1BD)] += 1
    assert max(counts) / (sum(counts) / 16) < 1.15

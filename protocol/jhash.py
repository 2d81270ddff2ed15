"""Pure-Python replica of the kernel's nftables ``jhash`` expression.

Every node must agree with the kernel on which bucket a client falls into:
the daemon reasons about buckets (ownership, statistics, tests) while the
kernel classifies packets with::

    jhash ip saddr [& MASK] mod B seed S        (IPv4, 4 bytes hashed)
    jhash ip6 saddr [& MASK] mod B seed S       (IPv6, 16 bytes hashed)

The kernel side (net/netfilter/nft_hash.c, ``nft_jhash_eval``) computes
``reciprocal_scale(jhash(reg, len, seed), B) + offset`` with offset 0 here.
``jhash`` is Bob Jenkins' lookup3 as in include/linux/jhash.h: initial value
``0xdeadbeef + len + seed``, 12-byte blocks read as *CPU-endian* 32-bit words
(little-endian on x86 and arm64, which is all we support), the tail added
byte-wise (which equals a little-endian read), then the final mix.
``reciprocal_scale(h, B) = (h * B) >> 32`` maps the 32-bit hash onto
``[0, B)`` without a division.

A prefix (``prefix4 < 32`` / ``prefix6 < 128``) mirrors ``saddr & MASK``: nft
masks the loaded register and still hashes the full 4 or 16 bytes, so a
masked address hashes like the network address of its prefix.

The kernel match is proven against real namespaces in tests/netns/test_nft.py;
tests/test_jhash.py pins vectors taken from the kernel.
"""

from __future__ import annotations

import ipaddress

__all__ = ["JHASH_INITVAL", "bucket_of", "jhash", "reciprocal_scale"]

JHASH_INITVAL = 0xDEADBEEF
_M32 = 0xFFFFFFFF


def _rol32(word: int, shift: int) -> int:
    return ((word << shift) | (word >> (32 - shift))) & _M32


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    # __jhash_mix from include/linux/jhash.h, with 32-bit wraparound.
    a = (a - c) & _M32
    a ^= _rol32(c, 4)
    c = (c + b) & _M32
    b = (b - a) & _M32
    b ^= _rol32(a, 6)
    a = (a + c) & _M32
    c = (c - b) & _M32
    c ^= _rol32(b, 8)
    b = (b + a) & _M32
    a = (a - c) & _M32
    a ^= _rol32(c, 16)
    c = (c + b) & _M32
    b = (b - a) & _M32
    b ^= _rol32(a, 19)
    a = (a + c) & _M32
    c = (c - b) & _M32
    c ^= _rol32(b, 4)
    b = (b + a) & _M32
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    # __jhash_final: only c is returned.
    c ^= b
    c = (c - _rol32(b, 14)) & _M32
    a ^= c
    a = (a - _rol32(c, 11)) & _M32
    b ^= a
    b = (b - _rol32(a, 25)) & _M32
    c ^= b
    c = (c - _rol32(b, 16)) & _M32
    a ^= c
    a = (a - _rol32(c, 4)) & _M32
    b ^= a
    b = (b - _rol32(a, 14)) & _M32
    c ^= b
    c = (c - _rol32(b, 24)) & _M32
    return c


def jhash(key: bytes, initval: int) -> int:
    """The kernel's ``jhash(key, len(key), initval)`` on a little-endian CPU."""
    length = len(key)
    a = b = c = (JHASH_INITVAL + length + (initval & _M32)) & _M32
    pos = 0
    # All but the last block (a last block of exactly 12 bytes is the tail).
    while length - pos > 12:
        a = (a + int.from_bytes(key[pos : pos + 4], "little")) & _M32
        b = (b + int.from_bytes(key[pos + 4 : pos + 8], "little")) & _M32
        c = (c + int.from_bytes(key[pos + 8 : pos + 12], "little")) & _M32
        a, b, c = _mix(a, b, c)
        pos += 12
    tail = key[pos:]
    if not tail:
        # case 0 of the kernel's switch: no final mix at all.
        return c
    # The kernel's fall-through switch adds bytes k[i] << 8*(i%4) into a, b, c:
    # the same as little-endian reads of the zero-padded tail.
    padded = tail + bytes(12 - len(tail))
    a = (a + int.from_bytes(padded[0:4], "little")) & _M32
    b = (b + int.from_bytes(padded[4:8], "little")) & _M32
    c = (c + int.from_bytes(padded[8:12], "little")) & _M32
    return _final(a, b, c)


def reciprocal_scale(value: int, ep_ro: int) -> int:
    """include/linux/math.h: map a 32-bit value onto ``[0, ep_ro)``."""
    return ((value & _M32) * ep_ro) >> 32


def bucket_of(
    address: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
    buckets: int,
    seed: int,
    prefix4: int = 32,
    prefix6: int = 128,
) -> int:
    """Bucket the kernel's ``jhash [ip|ip6] saddr [& mask] mod buckets seed seed`` gives.

    ``prefix4``/``prefix6`` select source-prefix affinity (e.g. 24 and 56):
    every address of one prefix lands in the same bucket.
    """
    if not 1 <= buckets <= _M32:
        raise ValueError(f"buckets must be in 1..2**32-1, not {buckets}")
    if not 0 <= seed <= _M32:
        raise ValueError(f"seed must be a 32-bit unsigned value, not {seed}")
    addr = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(addr, ipaddress.IPv4Address):
        prefix, width = prefix4, 32
    else:
        prefix, width = prefix6, 128
    if not 0 <= prefix <= width:
        raise ValueError(f"prefix /{prefix} out of range for IPv{addr.version}")
    mask = ((1 << width) - 1) ^ ((1 << (width - prefix)) - 1)
    # Network byte order, exactly as the packet header sits in the register.
    key = (int(addr) & mask).to_bytes(width // 8, "big")
    return reciprocal_scale(jhash(key, seed), buckets)

"""compute_owners against a plain reference: the pruned, grouped merge is output-identical.

The reference follows the module docstring literally, member by member over every bucket,
in uint64 arithmetic masked to 32 bits (its own fmix32, its own key and cost), with no
grouping by weight, no pruning and no padding. Only the Q32 table of -ln is shared: it
is pinned by test_ownership (accuracy, and the golden digests).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from lbd.protocol import ownership
from lbd.protocol.messages import MAX_NODES, MAX_WEIGHT
from lbd.protocol.ownership import NO_OWNER, compute_owners

M32 = np.uint64(0xFFFFFFFF)


def fmix32(z: NDArray[np.uint64]) -> NDArray[np.uint64]:
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        z = ((z ^ (z >> np.uint64(shift))) * np.uint64(multiplier)) & M32
    mixed: NDArray[np.uint64] = z ^ (z >> np.uint64(16))
    return mixed


def reference_owners(members: list[tuple[str, int]], buckets: int, seed: int) -> NDArray[Any]:
    table = ownership._neg_log_table()
    bucket_mix = fmix32(np.arange(buckets, dtype=np.uint64))
    owners = np.full(buckets, NO_OWNER, dtype=np.int16)
    best_cost = np.zeros(buckets, dtype=np.uint64)
    best_tagged = np.zeros(buckets, dtype=np.uint64)
    for index, (node_id, weight) in enumerate(sorted(members)):
        if weight == 0:
            continue
        digest = hashlib.blake2b(
            seed.to_bytes(8, "big") + node_id.encode("ascii"), digest_size=8
        ).digest()
        key_add = np.uint64(int.from_bytes(digest[:4], "big"))
        key_xor = np.uint64(int.from_bytes(digest[4:], "big"))
        h = fmix32(((bucket_mix + key_add) & M32) ^ key_xor) >> np.uint64(8)
        tagged = (h << np.uint64(8)) | np.uint64(255 - index)
        position = h + np.uint64(1)
        cell, fraction = position >> np.uint64(12), position & np.uint64(4095)
        high, low = table[cell], table[cell + np.uint64(1)]
        neg_log = high - (((high - low) * fraction) >> np.uint64(12))
        cost = (neg_log << np.uint64(20)) // np.uint64(weight)
        wins = (owners == NO_OWNER) | (cost < best_cost)
        wins |= (cost == best_cost) & (tagged > best_tagged)
        owners[wins] = index
        best_cost[wins] = cost[wins]
        best_tagged[wins] = tagged[wins]
    return owners


def assert_identical(members: list[tuple[str, int]], buckets: int, seed: int) -> None:
    ownership.clear_cache()
    assert np.array_equal(
        compute_owners(members, buckets, seed), reference_owners(members, buckets, seed)
    )


def weights_for(
    style: str, n: int, draw_weight: st.SearchStrategy[int]
) -> st.SearchStrategy[list[int]]:
    if style == "equal":
        return st.integers(1, MAX_WEIGHT).map(lambda w: [w] * n)
    if style == "distinct":
        return st.permutations(range(1, MAX_WEIGHT + 1)).map(lambda ws: list(ws[:n]))
    return st.lists(draw_weight, min_size=n, max_size=n)


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[tuple[str, int]], int, int]:
    n = draw(st.one_of(st.integers(1, 8), st.integers(1, MAX_NODES)))
    style = draw(st.sampled_from(["equal", "distinct", "few", "any"]))
    few = st.sampled_from([0, 1, 2, 3, 50, 999, 1000])
    weight = few if style == "few" else st.integers(0, MAX_WEIGHT)
    weights = draw(weights_for(style, n, weight))
    ids = draw(
        st.lists(
            st.from_regex(r"[a-z0-9][a-z0-9.-]{0,11}", fullmatch=True),
            min_size=n,
            max_size=n,
            unique=True,
        )
    )
    buckets = draw(
        st.one_of(st.sampled_from([1, 2, 63, 64, 65, 4096, 65536]), st.integers(1, 65536))
    )
    seed = draw(st.integers(0, 2**64 - 1))
    return list(zip(ids, weights, strict=True)), buckets, seed


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_identical_to_the_reference(cluster: tuple[list[tuple[str, int]], int, int]) -> None:
    assert_identical(*cluster)


@pytest.mark.parametrize(
    ("n", "weight_of"),
    [
        (256, lambda i: 1 + i),  # all distinct: the case the pruning is for
        (256, lambda i: 1000 - 3 * i),
        (64, lambda i: 1 + i),
        (256, lambda i: 100),  # equal weights
        (256, lambda i: i % 17),  # zeros, and groups of equal weights
        (2, lambda i: 999 * i + 1),  # the extreme ratio, 1 : 1000
        (1, lambda i: 7),  # a single member
    ],
)
def test_identical_at_full_size(n: int, weight_of: Callable[[int], int]) -> None:
    members = [(f"host-{i:03d}", weight_of(i)) for i in range(n)]
    assert_identical(members, 65536, seed=n)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 2**64 - 1),
    st.integers(1, MAX_WEIGHT),
    st.integers(0, 2**32 - 1),
)
def test_pruning_floor_is_a_bound(ceiling: int, weight: int, tagged: int) -> None:
    """A tagged hash under its slice's floor costs more than the ceiling: it cannot win."""
    hashes = np.array([tagged], dtype=np.uint32)
    floor = ownership._hash_floors(np.array([ceiling], dtype=np.uint64), weight)[0]
    if tagged < floor:
        assert int(ownership._cost(hashes, weight)[0]) > ceiling


def test_floor_table_is_a_bound_for_every_hash() -> None:
    """Exhaustively: every h with L(h) <= the top of cell k lies at or above F[k]."""
    every_hash = np.arange(1 << 24, dtype=np.uint32) << np.uint32(ownership.TAG_BITS)
    neg_log = ownership._cost(every_hash, 1) >> np.uint64(20)  # L(h), non-increasing
    floors = ownership._floor_table()
    tops = (np.arange(1, len(floors) + 1, dtype=np.uint64) << np.uint64(22)) - np.uint64(1)
    least_h = np.searchsorted(-neg_log.astype(np.int64), -tops.astype(np.int64), side="left")
    assert np.all(floors.astype(np.int64) >> ownership.TAG_BITS <= least_h)
    assert floors[-1] == 0 and tops[-1] >= ownership._neg_log_table()[0]
    assert MAX_WEIGHT < 2**10  # _hash_floors multiplies (ceiling >> 10) + 1 by a weight

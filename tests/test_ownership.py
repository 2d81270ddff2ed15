"""The ownership table: determinism, exact minimal disruption (L2), balance, edges."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from lbd.protocol import ownership
from lbd.protocol.errors import ConfigError
from lbd.protocol.messages import MAX_NODES, Member
from lbd.protocol.ownership import (
    NO_OWNER,
    OwnershipTable,
    compute_owners,
    owned_by,
    weights_of,
)

# Changing either digest means a new ownership function: mixed-version clusters would
# disagree on owners and both accept the same SYN. Only ever change it on purpose.
GOLDEN = {
    "equal": "237d7e90420c430b13c322a7d223973d33c8644943eaf6cdaa77840b0c977f01",
    "mixed": "249cb55403a5302c93536798302319dbff64c550b435af6f070cf3f4c212397e",
}
GOLDEN_CLUSTERS = {
    "equal": [(f"node-{i}", 100) for i in range(5)],
    "mixed": [
        ("alpha", 1),
        ("bravo", 2),
        ("charlie", 3),
        ("delta", 3),
        ("echo", 0),
        ("foxtrot", 1000),
    ],
}


def digest(owners: NDArray[Any]) -> str:
    return hashlib.sha256(owners.astype("<i2").tobytes()).hexdigest()


def names(n: int, prefix: str = "node") -> list[tuple[str, int]]:
    return [(f"{prefix}-{i:02d}", 100) for i in range(n)]


def owner_ids(table: OwnershipTable) -> list[str | None]:
    return [table.owner_of(b) for b in range(table.buckets)]


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_value(name: str) -> None:
    ownership.clear_cache()
    assert digest(compute_owners(GOLDEN_CLUSTERS[name], 1024, seed=42)) == GOLDEN[name]


def test_same_result_in_another_process() -> None:
    """Nothing may depend on per-process state such as str hash randomisation."""
    code = (
        "import hashlib, json, sys\n"
        "from lbd.protocol.ownership import compute_owners\n"
        "members = [tuple(m) for m in json.loads(sys.argv[1])]\n"
        "owners = compute_owners(members, 1024, seed=42)\n"
        "print(hashlib.sha256(owners.astype('<i2').tobytes()).hexdigest())\n"
    )
    for name, members in GOLDEN_CLUSTERS.items():
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(members)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": "12345"},
        )
        assert out.stdout.strip() == GOLDEN[name]


def test_repeatable_and_input_order_irrelevant() -> None:
    rng = random.Random(1)
    members = [(f"n{rng.getrandbits(32):08x}", rng.randint(0, 1000)) for _ in range(40)]
    first = compute_owners(members, 2048, seed=7).copy()
    ownership.clear_cache()
    assert np.array_equal(compute_owners(members, 2048, seed=7), first)
    for _ in range(5):
        rng.shuffle(members)
        ownership.clear_cache()
        assert np.array_equal(compute_owners(members, 2048, seed=7), first)
    assert not np.array_equal(compute_owners(members, 2048, seed=8), first)


def test_result_is_cached_and_read_only() -> None:
    members = names(4)
    owners = compute_owners(members, 512)
    assert compute_owners(list(reversed(members)), 512) is owners
    assert owners.dtype == np.int16
    with pytest.raises(ValueError, match="read-only"):
        owners[0] = 1


def grouped_equals_brute_force(members: list[tuple[str, int]], buckets: int, seed: int) -> None:
    """compute_owners reduces equal weights by a running max; check it against the
    definition: per bucket, the member with the smallest (C, -tagged hash)."""
    ordered = sorted(members)
    mix = ownership._fmix32(np.arange(buckets, dtype=np.uint32), np.empty(buckets, np.uint32))
    expected = np.full(buckets, NO_OWNER, dtype=np.int16)
    keys = []
    for index, (node_id, weight) in enumerate(ordered):
        if weight == 0:
            continue
        tagged = ownership._tagged_hashes(
            mix, node_id, seed, index, out=np.empty(buckets, np.uint32), scratch=np.empty_like(mix)
        )
        keys.append((ownership._cost(tagged, weight), tagged, index))
    for b in range(buckets):
        if keys:
            expected[b] = min(keys, key=lambda k: (int(k[0][b]), -int(k[1][b])))[2]
    assert np.array_equal(compute_owners(members, buckets, seed), expected)


def test_grouping_matches_the_definition() -> None:
    rng = random.Random(2)
    for trial in range(12):
        n = rng.randint(1, 12)
        weights = [1, 2, 5, 1000] if trial % 2 else list(range(1001))
        members = [(f"m{i}", rng.choice(weights)) for i in range(n)]
        grouped_equals_brute_force(members, 256, seed=trial)


def test_cost_is_monotone_in_hash_and_weight() -> None:
    every_hash = np.arange(1 << 24, dtype=np.uint32) << np.uint32(ownership.TAG_BITS)
    cost = ownership._cost(every_hash, 1).astype(np.int64)
    assert np.all(np.diff(cost) <= 0)
    sample = every_hash[:: 1 << 10]
    costs = np.array([ownership._cost(sample, w) for w in range(1, 1001)], dtype=np.int64)
    assert np.all(np.diff(costs, axis=0) <= 0)


def test_log_table_is_accurate() -> None:
    table = ownership._neg_log_table()
    for i in range(1, 4097):
        assert abs(int(table[i]) - -math.log(i / 4096) * 2**32) < 2
    assert table[0] == 2 * table[1]
    assert table[4096] == table[4097] == 0


# ---------------------------------------------------------------- exact L2


def random_cluster(rng: random.Random) -> tuple[list[tuple[str, int]], int]:
    n = rng.randint(1, 64)
    buckets = rng.choice([64, 100, 1000, 4096, rng.randint(64, 4096)])
    style = rng.randrange(3)
    ids = rng.sample(range(10_000), n)
    if style == 0:
        members = [(f"n{i}", 100) for i in ids]
    elif style == 1:
        members = [(f"n{i}", rng.choice([0, 1, 3, 50, 1000])) for i in ids]
    else:
        members = [(f"n{i}", rng.randint(0, 1000)) for i in ids]
    return members, buckets


def assert_moves_only(
    before: OwnershipTable, after: OwnershipTable, node: str, direction: str
) -> None:
    old, new = owner_ids(before), owner_ids(after)
    for b, (was, now) in enumerate(zip(old, new, strict=True)):
        if was == now:
            continue
        if direction == "from":
            assert was == node, f"bucket {b} moved {was} -> {now}, only {node} may lose"
        else:
            assert now == node, f"bucket {b} moved {was} -> {now}, only {node} may gain"
    assert after.moved_from(before) == frozenset(
        b for b, (was, now) in enumerate(zip(old, new, strict=True)) if was != now
    )


def test_removal_moves_only_the_removed_nodes_buckets() -> None:
    rng = random.Random(10)
    for _ in range(120):
        members, buckets = random_cluster(rng)
        before = OwnershipTable.build(members, buckets)
        gone = rng.choice(members)[0]
        after = OwnershipTable.build([m for m in members if m[0] != gone], buckets)
        assert_moves_only(before, after, gone, "from")
        assert after.moved_from(before) == before.buckets_of(gone)


def test_addition_moves_buckets_only_to_the_newcomer() -> None:
    rng = random.Random(11)
    for _ in range(120):
        members, buckets = random_cluster(rng)
        before = OwnershipTable.build(members, buckets)
        newcomer = ("zz" if rng.random() < 0.3 else "a") + str(rng.getrandbits(20))
        weight = rng.choice([1, 100, 1000, rng.randint(1, 1000)])
        after = OwnershipTable.build([*members, (newcomer, weight)], buckets)
        assert_moves_only(before, after, newcomer, "to")
        assert after.moved_from(before) == after.buckets_of(newcomer)


def test_weight_change_moves_buckets_only_to_or_from_that_node() -> None:
    rng = random.Random(12)
    for _ in range(160):
        members, buckets = random_cluster(rng)
        position = rng.randrange(len(members))
        node, weight = members[position]
        new_weight = rng.choice([0, 1, 1000, rng.randint(0, 1000)])
        changed = list(members)
        changed[position] = (node, new_weight)
        before = OwnershipTable.build(members, buckets)
        after = OwnershipTable.build(changed, buckets)
        if new_weight > weight:
            assert_moves_only(before, after, node, "to")
        elif new_weight < weight:
            assert_moves_only(before, after, node, "from")
        else:
            assert after.moved_from(before) == frozenset()


# ---------------------------------------------------------------- balance


@pytest.mark.parametrize("n", [3, 16, 64])
def test_balance_equal_weights(n: int) -> None:
    table = OwnershipTable.build(names(n), 65536)
    assert max(table.counts().values()) / (65536 / n) <= 1.10


def test_weighted_shares_follow_weights() -> None:
    table = OwnershipTable.build([("a", 1), ("b", 2), ("c", 3)], 65536)
    counts = table.counts()
    for node, weight in [("a", 1), ("b", 2), ("c", 3)]:
        assert counts[node] / 65536 == pytest.approx(weight / 6, rel=0.03)


def test_extreme_weight_ratio() -> None:
    counts = OwnershipTable.build([("big", 1000), ("small", 1)], 65536).counts()
    assert counts["small"] / 65536 == pytest.approx(1 / 1001, rel=0.25)


# ---------------------------------------------------------------- edges


def test_no_positive_weight_means_no_owner() -> None:
    for members in ([], [("a", 0)], [("a", 0), ("b", 0), ("c", 0)]):
        owners = compute_owners(members, 300)
        assert owners.shape == (300,)
        assert np.all(owners == NO_OWNER)
        table = OwnershipTable.build(members, 300)
        assert table.owner_of(0) is None
        assert all(count == 0 for count in table.counts().values())


def test_single_node_owns_everything() -> None:
    assert np.all(compute_owners([("solo", 7)], 4096) == 0)
    table = OwnershipTable.build([("draining", 0), ("solo", 7)], 4096)
    assert table.buckets_of("solo") == frozenset(range(4096))
    assert table.buckets_of("draining") == frozenset()
    assert table.buckets_of("stranger") == frozenset()


def test_bucket_count_edges() -> None:
    one = compute_owners(names(5), 1)
    assert one.shape == (1,) and 0 <= one[0] < 5
    big = compute_owners(names(5), 65536)
    assert big.shape == (65536,)
    assert set(np.unique(big).tolist()) == set(range(5))
    # The owner of a bucket does not depend on how many buckets there are.
    assert np.array_equal(compute_owners(names(5), 4096), big[:4096])


def test_256_members() -> None:
    members = [(f"host{i:03d}.example", 1 + i % 3) for i in range(MAX_NODES)]
    owners = compute_owners(members, 65536)
    assert owners.min() >= 0 and owners.max() < MAX_NODES
    assert len(np.unique(owners)) == MAX_NODES
    assert 2**ownership.TAG_BITS >= MAX_NODES  # indices must fit in the hash tag


def test_table_api() -> None:
    table = OwnershipTable.build([("b", 1), ("a", 1), ("c", 0)], 1024)
    assert table.node_ids == ("a", "b", "c")
    counts = table.counts()
    assert counts["c"] == 0 and counts["a"] + counts["b"] == 1024
    assert table.buckets_of("a") == owned_by(table.owners, 0)
    assert table.buckets_of("a") | table.buckets_of("b") == frozenset(range(1024))
    assert {table.owner_of(b) for b in table.buckets_of("b")} == {"b"}
    assert table == OwnershipTable.build([("a", 1), ("b", 1), ("c", 0)], 1024)
    assert len({table, OwnershipTable.build([("a", 1), ("b", 1), ("c", 0)], 1024)}) == 1
    with pytest.raises(ConfigError):
        table.owner_of(1024)
    with pytest.raises(ConfigError):
        table.moved_from(OwnershipTable.build([("a", 1)], 512))


def test_weights_of_view_treats_draining_as_zero() -> None:
    view = [Member("b", 1, 5, draining=True), Member("a", 1, 3, draining=False)]
    assert weights_of(view) == (("a", 3), ("b", 0))


@pytest.mark.parametrize(
    ("members", "buckets", "seed"),
    [
        ([("a", 1), ("a", 2)], 16, 0),
        ([("a", -1)], 16, 0),
        ([("a", 1001)], 16, 0),
        ([("a", 1.0)], 16, 0),
        ([("a", True)], 16, 0),
        ([("", 1)], 16, 0),
        ([("bad id", 1)], 16, 0),
        ([(3, 1)], 16, 0),
        (names(MAX_NODES + 1), 16, 0),
        ([("a", 1)], 0, 0),
        ([("a", 1)], 65537, 0),
        ([("a", 1)], 16, -1),
        ([("a", 1)], 16, 2**64),
    ],
)
def test_invalid_input_raises_config_error(
    members: list[tuple[str, int]], buckets: int, seed: int
) -> None:
    with pytest.raises(ConfigError):
        compute_owners(members, buckets, seed)

"""Ownership table: which node accepts NEW connections for each bucket.

The kernel maps a client address to a bucket ``b`` in ``0..B-1``. Every node computes
the owner of every bucket from the agreed membership alone (node IDs and integer
weights), so nodes that agree on the view agree on every owner, bit for bit.

Scheme: weighted rendezvous hashing (an exponential race) in integers only.

* Node key: ``blake2b(seed || node_id, digest_size=8)``, two 32-bit halves ``a``, ``x``.
  Hash of bucket ``b``: ``fmix32((fmix32(b) + a) ^ x)`` (murmur3's finaliser; uint32
  arithmetic wraps the same way on every CPU and numpy). Its top 24 bits are ``h``; the
  low 8 bits are replaced by ``255 - index`` (index in the members sorted by node ID),
  so that one running max picks the largest ``h`` and, on a tie, the smallest node ID.
* Cost: ``C = (L(h) << 20) // weight``, ``L(h)`` being ``-ln((h + 1) / 2**24)`` in Q32,
  linearly interpolated in a 4097-entry table built with an exact integer series.
  ``-ln(u) / weight`` is exponential with rate ``weight``: shares follow weights.
* Owner: the member with weight > 0 and the smallest ``(C, -tagged hash)``; none
  (NO_OWNER) if no weight is positive. Weight 0 (draining) owns nothing.

Why L2 holds exactly: a node's key for a bucket depends only on that node (ID, weight,
index order) and the seed, never on who else is a member, and sorting keeps the relative
order of the others. So removing a node moves only the buckets it won, and adding one
moves only the buckets it now wins. ``L`` is non-increasing in ``h`` and ``C`` in the
weight, so raising (lowering) one node's weight only moves buckets to (from) it; the
table's approximation of ``ln`` only nudges shares, it cannot break L2. No float takes
part: a float ``log`` may differ in its last bit between builds, and two nodes that
disagree on one owner would both answer the same SYN. (``weight`` virtual voters per node
would be exact too, but would cost a pass per unit of weight: up to 256 000 passes.)

Cost: one hash pass per member with weight > 0 (about twelve uint32 vector operations over
``B``). Within one weight ``C`` is monotone in ``h``, so each group of equal weights is
reduced by a plain running max; only the group winners pay the transform and the merge.
Equal weights, the common case, skip the transform entirely. With ``G`` distinct weights,
the groups are merged heaviest first, and a group's winner pays the transform (about
fifteen uint64 operations) only in the slices of 64 buckets where it could still beat the
slice's largest best cost: a bound from a precomputed floor table, never an
approximation of the result (buckets it lets through are compared exactly, the others
would lose). As the merged weight grows, the light groups reach few buckets; at N = 256
with all weights distinct under a tenth of the (group, bucket) pairs pay. Total
``O(N * B)`` time for the hashes plus a few cheap passes per group, ``O(B)`` memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache

import numpy as np
from numpy.typing import NDArray

from lbd.protocol.errors import ConfigError
from lbd.protocol.messages import MAX_NODES, MAX_WEIGHT, NODE_ID_PATTERN, Member

DEFAULT_BUCKETS = 4096
MAX_BUCKETS = 65536
MAX_SEED = 2**64 - 1
NO_OWNER = -1

MemberWeights = tuple[tuple[str, int], ...]
Owners = NDArray[np.int16]
U32 = NDArray[np.uint32]
U64 = NDArray[np.uint64]

TAG_BITS = 8  # low hash bits that carry 255 - index; MAX_NODES must fit (a test checks)
_TAG_MASK = (1 << TAG_BITS) - 1
_LOG_BITS = 12  # L is tabulated at u = i / 2**12 and interpolated in between
_FRACTION_BITS = 32 - TAG_BITS - _LOG_BITS
_COST_SHIFT = 20  # fraction bits kept in C after dividing by a weight (at most 2**10)
_SLICE = 64  # buckets per slice; a slice's largest best cost prunes the merge
_DENSE_SHARE = 0.5  # above this share of candidate buckets, merge them all (no scatter)
_CHUNK = 8192  # the dense merge runs by chunks so that its temporaries stay in cache
_LIMIT_SHIFT = 22  # the floor table has one entry per 2**22 of L (Q32): about 17 000
_GUARD = 32 + 64  # the series run in Q96 so that truncating their terms is harmless


def _ln2_q96() -> int:
    ln2, j = 0, 1
    while term := (1 << _GUARD) // (j << j):  # ln 2 = sum 1 / (j 2**j)
        ln2, j = ln2 + term, j + 1
    return ln2


def _ln_q32(numerator: int, denominator: int, ln2_q96: int) -> int:
    """ln(numerator / denominator) in Q32 (ratio >= 1), with integers only."""
    doublings = 0
    while numerator >= 2 * denominator:  # range reduction to a ratio in [1, 2)
        denominator *= 2
        doublings += 1
    # ln(y) = 2 atanh(z) = 2 sum z**(2j+1) / (2j+1), z = (y - 1) / (y + 1) <= 1/3.
    z_num, z_den = numerator - denominator, numerator + denominator
    power_num, power_den, total, j = z_num, z_den, 0, 0
    while term := (power_num << _GUARD) // (power_den * (2 * j + 1)):
        total += term
        power_num, power_den, j = power_num * z_num * z_num, power_den * z_den * z_den, j + 1
    return (2 * total + doublings * ln2_q96) >> (_GUARD - 32)


@cache  # built on first use: clusters with equal weights never need it
def _neg_log_table() -> U64:
    """T[i] = -ln(i / 2**12) in Q32 for i = 1..4096; T[0] caps u -> 0 at 2 T[1]
    (= -ln 2**-24); T[4097] = 0 is only ever read with a zero interpolation weight."""
    steps = 1 << _LOG_BITS
    ln2 = _ln2_q96()
    table = [_ln_q32(steps, i, ln2) for i in range(1, steps + 1)]
    table = [2 * table[0], *table, 0]
    array = np.array(table, dtype=np.uint64)
    array.setflags(write=False)
    return array


@cache
def _neg_log_drops() -> U64:
    """D[i] = T[i] - T[i + 1] >= 0 (T is non-increasing); D[4097] = 0."""
    table = _neg_log_table()
    drops = np.append(table[:-1] - table[1:], np.uint64(0))
    drops.setflags(write=False)
    return drops


def _fmix32(z: U32, scratch: U32) -> U32:
    """murmur3's 32-bit finaliser, in place: a bijection with full avalanche."""
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        np.right_shift(z, np.uint32(shift), out=scratch)
        z ^= scratch
        z *= np.uint32(multiplier)
    np.right_shift(z, np.uint32(16), out=scratch)
    z ^= scratch
    return z


def _node_key(node_id: str, seed: int) -> tuple[np.uint32, np.uint32]:
    digest = hashlib.blake2b(
        seed.to_bytes(8, "big") + node_id.encode("ascii"), digest_size=8
    ).digest()
    return np.uint32(int.from_bytes(digest[:4], "big")), np.uint32(
        int.from_bytes(digest[4:], "big")
    )


def _tagged_hashes(
    bucket_mix: U32, node_id: str, seed: int, index: int, *, out: U32, scratch: U32
) -> U32:
    """The node's hash of every bucket, its low bits replaced by 255 - index.

    The tag replaces a slow masked copy of the winner's index per node by one max().
    Both key halves take part: only a full 64-bit key collision gives equal hashes.
    """
    key_add, key_xor = _node_key(node_id, seed)
    np.add(bucket_mix, key_add, out=out)
    out ^= key_xor
    _fmix32(out, scratch)
    out &= np.uint32(0xFFFFFFFF ^ _TAG_MASK)
    out |= np.uint32(_TAG_MASK - index)
    return out


def _cost(tagged: U32, weight: int) -> U64:
    """C = (L(h) << 20) // weight; non-increasing in h and in weight. Smaller wins."""
    table, drops = _neg_log_table(), _neg_log_drops()
    position = (tagged >> np.uint32(TAG_BITS)).astype(np.intp)
    position += 1  # h + 1, in [1, 2**24]
    index = position >> _FRACTION_BITS
    position &= (1 << _FRACTION_BITS) - 1  # now the fraction, >= 0
    fraction = position.view(np.uint64)
    # take() with an intp index is several times faster than indexing with uint32, and
    # "clip" skips the bounds check (index <= 4096: the tables have 4098 entries).
    neg_log: U64 = drops.take(index, mode="clip")
    neg_log *= fraction
    neg_log >>= np.uint64(_FRACTION_BITS)
    np.subtract(table.take(index, mode="clip"), neg_log, out=neg_log)
    neg_log <<= np.uint64(_COST_SHIFT)
    neg_log //= np.uint64(weight)
    return neg_log


@cache
def _floor_table() -> U32:
    """F[k]: a tagged hash below which ``L(h) > (k + 1) * 2**22 - 1``; the last is 0.

    With ``j`` the first index where ``T[j] <= limit``: for ``h + 1`` in table cell ``i``,
    ``L(h) >= T[i + 1]``, so ``L(h) <= limit`` needs ``i >= j - 1``, that is
    ``h >= (j - 1) * 2**12 - 1``. Each entry takes the largest limit of its cell, so it
    is a lower bound for every limit in the cell.
    """
    table = _neg_log_table()
    cells = (int(table[0]) >> _LIMIT_SHIFT) + 1  # the last cell reaches past T[0]: floor 0
    limits = (np.arange(1, cells + 1, dtype=np.uint64) << np.uint64(_LIMIT_SHIFT)) - np.uint64(1)
    first = len(table) - np.searchsorted(table[::-1], limits, side="right")
    least_h = np.maximum((first.astype(np.int64) - 1) << _FRACTION_BITS, 1) - 1
    floors: U32 = (least_h << TAG_BITS).astype(np.uint32)
    floors.setflags(write=False)
    return floors


def _hash_floors(ceilings: U64, weight: int) -> U32:
    """Per slice, a tagged hash below which a member of ``weight`` cannot cost <= ceiling.

    C <= c needs ``L(h) << 20 < (c + 1) * weight``, hence ``L(h) <= limit`` with the bound
    ``limit = ((c >> 10) + 1) * weight >> 10`` (no uint64 overflow: weight < 2**10).
    """
    limits = ceilings >> np.uint64(10)
    limits += np.uint64(1)
    limits *= np.uint64(weight)
    limits >>= np.uint64(10 + _LIMIT_SHIFT)
    # "clip" caps the cell at the last one, whose floor is 0: anything may win there.
    floors: U32 = _floor_table().take(limits.astype(np.intp), mode="clip")
    return floors


class _Race:
    """The best (C, tagged hash) so far of every bucket, merged group after group.

    Buckets are padded to whole slices; ``ceilings`` holds an upper bound of each
    slice's best cost. A group's winner that cannot reach its slice's ceiling cannot win
    there, so only the other buckets pay the transform. The ceilings are only refreshed
    when the merged weight has grown by an eighth: stale ones are higher, hence still
    bounds; they only let more buckets through to the exact comparison.
    """

    def __init__(self, padded: int) -> None:
        self.cost = np.full(padded, np.iinfo(np.uint64).max, dtype=np.uint64)
        self.tagged = np.zeros(padded, dtype=np.uint32)
        self.ceilings = np.full(padded // _SLICE, np.iinfo(np.uint64).max, dtype=np.uint64)
        self.mask = np.empty(padded, dtype=np.bool_)
        self.merged_weight = 0
        self.refreshed_at = 0

    def merge(self, group_best: U32, weight: int, members: int) -> None:
        """Per bucket, keep the smaller (C, -tagged hash) of the group's winner and the best."""
        floors = np.repeat(_hash_floors(self.ceilings, weight), _SLICE)
        np.greater_equal(group_best, floors, out=self.mask)
        if np.count_nonzero(self.mask) > len(group_best) * _DENSE_SHARE:  # no gather/scatter
            for start in range(0, len(group_best), _CHUNK):
                part = slice(start, start + _CHUNK)
                _merge_into(group_best[part], weight, self.cost[part], self.tagged[part])
        else:
            candidates = np.flatnonzero(self.mask)
            tagged = group_best.take(candidates, mode="clip")
            cost = _cost(tagged, weight)
            current = self.cost.take(candidates, mode="clip")
            wins = cost < current
            wins |= (cost == current) & (tagged > self.tagged.take(candidates, mode="clip"))
            won = np.flatnonzero(wins)  # then take(): faster than indexing with a mask
            winners = candidates.take(won)
            self.cost[winners] = cost.take(won)
            self.tagged[winners] = tagged.take(won)
        self.merged_weight += weight * members
        if self.merged_weight * 8 >= self.refreshed_at * 9:
            np.max(self.cost.reshape(len(self.ceilings), -1), axis=1, out=self.ceilings)
            self.refreshed_at = self.merged_weight


def _merge_into(tagged: U32, weight: int, best_cost: U64, best: U32) -> None:
    """The merge of every bucket of a chunk, in place."""
    cost = _cost(tagged, weight)
    wins = cost < best_cost
    wins |= (cost == best_cost) & (tagged > best)
    np.copyto(best_cost, cost, where=wins)
    np.copyto(best, tagged, where=wins)


@lru_cache(maxsize=8)  # the core asks again and again for the same few views
def _owners_of_sorted(members: MemberWeights, buckets: int, seed: int) -> Owners:
    groups: dict[int, list[int]] = {}
    for index, (_, weight) in enumerate(members):
        if weight > 0:
            groups.setdefault(weight, []).append(index)
    if not groups:
        owners = np.full(buckets, NO_OWNER, dtype=np.int16)
        owners.setflags(write=False)
        return owners
    # Padded to whole slices; the owner of a bucket does not depend on the others.
    padded = -(-buckets // _SLICE) * _SLICE
    scratch = np.empty(padded, dtype=np.uint32)
    bucket_mix = _fmix32(np.arange(padded, dtype=np.uint32), scratch)
    hashes = np.empty(padded, dtype=np.uint32)
    group_best = np.empty(padded, dtype=np.uint32)
    # A single weight (the common case) needs no transform: its winner is the owner.
    race = _Race(padded) if len(groups) > 1 else None
    # Heaviest first: their small costs let the lighter groups skip most buckets.
    for weight, indices in sorted(groups.items(), reverse=True):
        # Within one weight C is monotone in h, so the group's winner is simply its
        # largest tagged hash.
        for position, index in enumerate(indices):
            out = hashes if position else group_best
            _tagged_hashes(bucket_mix, members[index][0], seed, index, out=out, scratch=scratch)
            if position:
                np.maximum(group_best, hashes, out=group_best)
        if race is not None:
            race.merge(group_best, weight, len(indices))
    best = group_best if race is None else race.tagged
    owners = (_TAG_MASK - (best[:buckets] & np.uint32(_TAG_MASK))).astype(np.int16)
    owners.setflags(write=False)  # shared by the cache: nobody may change it
    return owners


def normalize_members(members: Iterable[tuple[str, int]]) -> MemberWeights:
    """Validate (node_id, weight) pairs and return them sorted by node ID."""
    pairs = tuple((node_id, weight) for node_id, weight in members)
    for node_id, weight in pairs:
        if not isinstance(node_id, str) or not NODE_ID_PATTERN.fullmatch(node_id):
            raise ConfigError(f"invalid node id {node_id!r}")
        if type(weight) is not int or not 0 <= weight <= MAX_WEIGHT:
            raise ConfigError(f"weight of {node_id!r} must be an int in 0..{MAX_WEIGHT}")
    if len(pairs) > MAX_NODES:
        raise ConfigError(f"{len(pairs)} members, at most {MAX_NODES} allowed")
    if len({node_id for node_id, _ in pairs}) != len(pairs):
        raise ConfigError("duplicate node id in members")
    return tuple(sorted(pairs))


def weights_of(view: Iterable[Member]) -> MemberWeights:
    """The (node_id, weight) pairs ownership depends on: a draining member weighs 0."""
    return normalize_members((m.node_id, 0 if m.draining else m.weight) for m in view)


def _check_buckets_seed(buckets: int, seed: int) -> None:
    if type(buckets) is not int or not 1 <= buckets <= MAX_BUCKETS:
        raise ConfigError(f"buckets must be an int in 1..{MAX_BUCKETS}, got {buckets!r}")
    if type(seed) is not int or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an int in 0..2**64-1, got {seed!r}")


def compute_owners(
    members: Sequence[tuple[str, int]], buckets: int = DEFAULT_BUCKETS, seed: int = 0
) -> Owners:
    """Owner of every bucket, as an index into the members sorted by node ID.

    Pure and deterministic; the order of ``members`` does not matter. An entry is
    NO_OWNER (-1) when no member has weight > 0. The array is read-only (cached).
    """
    _check_buckets_seed(buckets, seed)
    return _owners_of_sorted(normalize_members(members), buckets, seed)


def clear_cache() -> None:
    """Forget cached tables (for benchmarks and tests)."""
    _owners_of_sorted.cache_clear()


def owned_by(owners: Owners, index: int) -> frozenset[int]:
    """The buckets whose owner is member ``index``."""
    return frozenset(np.flatnonzero(owners == index).tolist())


@dataclass(frozen=True, slots=True)
class OwnershipTable:
    """Members sorted by node ID and the owner index of every bucket.

    Equality and hashing use (members, buckets, seed), which determine ``owners``.
    """

    members: MemberWeights
    buckets: int
    seed: int
    owners: Owners = field(compare=False, repr=False)

    @classmethod
    def build(
        cls, members: Iterable[tuple[str, int]], buckets: int = DEFAULT_BUCKETS, seed: int = 0
    ) -> OwnershipTable:
        _check_buckets_seed(buckets, seed)
        ordered = normalize_members(members)
        return cls(ordered, buckets, seed, _owners_of_sorted(ordered, buckets, seed))

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(node_id for node_id, _ in self.members)

    def index_of(self, node_id: str) -> int | None:
        for index, (member_id, _) in enumerate(self.members):
            if member_id == node_id:
                return index
        return None

    def buckets_of(self, node_id: str) -> frozenset[int]:
        """The buckets ``node_id`` owns; empty if it is not a member."""
        index = self.index_of(node_id)
        return frozenset() if index is None else owned_by(self.owners, index)

    def owner_of(self, bucket: int) -> str | None:
        """The node ID owning ``bucket``, or None if nobody does."""
        if not 0 <= bucket < self.buckets:
            raise ConfigError(f"bucket {bucket} out of range 0..{self.buckets - 1}")
        index = int(self.owners[bucket])
        return None if index == NO_OWNER else self.members[index][0]

    def counts(self) -> dict[str, int]:
        """Buckets owned per member, 0 included."""
        owned = np.bincount(self.owners[self.owners >= 0], minlength=len(self.members))
        return {node_id: int(n) for (node_id, _), n in zip(self.members, owned, strict=True)}

    def moved_from(self, previous: OwnershipTable) -> frozenset[int]:
        """Buckets whose owner (by node ID, or none) differs between previous and self."""
        if previous.buckets != self.buckets:
            raise ConfigError("tables with different bucket counts cannot be compared")
        # Translate both index spaces into one: positions in the union of node IDs.
        union = sorted(set(previous.node_ids) | set(self.node_ids))
        rank = {node_id: position for position, node_id in enumerate(union)}

        def in_union(table: OwnershipTable) -> NDArray[np.int32]:
            lookup = np.array([rank[n] for n in table.node_ids] + [-1], dtype=np.int32)
            return lookup[table.owners]  # an owner of -1 reads the trailing -1

        return frozenset(np.flatnonzero(in_union(previous) != in_union(self)).tolist())

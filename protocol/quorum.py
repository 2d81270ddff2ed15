"""Quorum arithmetic: the majority rule and the lease deadline a quorum grants.

A base is the set of node IDs of the last agreed view. While a base change is
not yet confirmed (a quorum of the previous base has not adopted it), every
decision needs a quorum of both bases, the way joint consensus does: otherwise
a quorum of the new base and one of the old could be disjoint, and both sides
would serve (the simulator found that split brain).
"""

from __future__ import annotations

from collections.abc import Iterable


def has_quorum(
    present: set[str] | frozenset[str], base: frozenset[str], tie_break: bool = True
) -> bool:
    """Majority of ``base``; an exact half wins only if it holds the smallest ID, and
    only with ``tie_break`` (a node whose base was agreed under other parameters than
    its own never wins by it: it may be the one mistaken node)."""
    if not base:
        return True
    count = len(present & base)
    if 2 * count > len(base):
        return True
    return tie_break and 2 * count == len(base) and min(base) in present


def has_joint_quorum(
    present: set[str] | frozenset[str], bases: Iterable[frozenset[str]], tie_break: bool = True
) -> bool:
    return all(has_quorum(present, base, tie_break) for base in bases)


def lease_deadline(
    anchors: list[tuple[float, str]], base: frozenset[str], lease: float, tie_break: bool = True
) -> float | None:
    """Latest deadline a quorum of ``base`` supports, or None.

    ``anchors`` are (local send time of the newest heartbeat of ours the node
    acknowledges, node ID), our own entry included. Taking anchors newest first
    until they form a quorum gives the best deadline: any quorum with a newer
    oldest anchor would be a subset of that prefix, and quorums are monotone.
    """
    chosen: set[str] = set()
    for sent, node_id in sorted(anchors, reverse=True):
        if node_id not in base:
            continue
        chosen.add(node_id)
        if has_quorum(chosen, base, tie_break):
            return sent + lease
    return None

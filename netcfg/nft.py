"""The data plane on nftables: install the tables, apply ownership + lease atomically.

The rules themselves (and why they are what they are) live in ruleset.py; this
module talks to the kernel through ONE persistent ``nftables.Nftables()``
context. That context matters beyond speed: ``inet lbd`` is created with
``flags owner`` and lives exactly as long as the context's netlink socket, so
the object is kept for the whole life of the daemon (garbage-collecting it
would drop the table). libnftables' socket is not close-on-exec: never
``os.system``/``fork+exec`` from a process holding one, or the child keeps the
table (and so the node's claims) alive; ``subprocess`` closes fds by default.

Each :meth:`NftDataplane.apply` is ONE nft transaction (one netlink batch,
all-or-nothing) that

1. unless the guard is persistent (below), re-asserts the guard table
   (``add``/``flush``/re-add of its ~8 rules, see ``ruleset.guard_commands``):
   after an admin's ``nft flush ruleset`` the guard is back within one apply, so a
   later SIGKILL still fails closed. The guard's
   rule handles therefore change on every apply (compare listings without
   handles). With ``guard_period`` it is re-asserted only when that long has
   passed since the last time (the daemon: once a second), which halves the
   cost of a lease renewal;
2. deletes/adds only the buckets that changed since the last successful apply
   (the kernel set is only ever changed by this object: other processes get
   EPERM on an owner table, so the shadow copy cannot drift), or flushes the set
   and re-adds what stays when that is smaller;
3. refreshes the lease (add, delete, add with timeout) or removes it, and
   rewrites the ``live`` chain with the lease's absolute deadline (``meta time``):
   a transaction that reaches the kernel late (a paused process, a slow claim)
   starts its relative timeout late, but never moves that deadline.

Text commands rather than JSON: libnftables 1.0.6's JSON parser reads element
timeouts as whole seconds (a fraction is silently dropped), and leases are
sub-second. Measured here, text costs the same for small changes (0.09 ms for
one element) and ~15 % more for huge ones (32768 elements: 118 ms vs 101 ms).

Persistent guard (``persist=True``, what the daemon asks for). On kernels with
``NFT_TABLE_F_PERSIST`` (Linux >= 6.9) the guard is created *owner + persist* on
the netlink socket of this object's libnftables context: while the daemon lives,
no other process can change or delete it (EPERM, and ``nft flush ruleset`` skips
owner tables); when the daemon dies the kernel keeps it, orphaned, and the next
daemon adopts it. So an admin's flush followed by a SIGKILL leaves the node closed,
with no window at all, and no apply needs to re-assert the guard. nft 1.0.6 can
neither write ``persist`` nor adopt an orphan (the kernel wants OWNER|PERSIST in one
NEWTABLE message), so that one message is sent by :func:`claim_persistent` on a
duplicate of libnftables' own socket (found by :func:`new_context`), and only the
chains and rules go through libnftables, without any ``add table`` statement (the
kernel refuses a table message that leaves out PERSIST). On an older kernel the guard
stays a plain table (``persistent`` False) and is re-asserted as described above
and, in the daemon, within milliseconds of an nft event (daemon/kernelwatch.py).
``LBD_TABLE_PERSIST=0`` in the environment asks for that behaviour on any kernel.

Measured apply() latency (bench/dataplane.py, median, busy 2-core machine):
moving 1 bucket 0.4-0.6 ms, 100 buckets 0.6-0.8 ms, at B=4096 and 65536 alike
(the guard re-assert is ~0.2 ms of that); claiming all 4096 buckets 13 ms, all
65536 ~250 ms; releasing everything is a flush: 2 ms / 30 ms.
"""

from __future__ import annotations

import errno
import itertools
import json
import operator
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence, Set
from dataclasses import dataclass, replace
from typing import Any

from lbd.netcfg import netlink as nl
from lbd.netcfg.ruleset import (
    DEFAULT_MARK,
    DEFAULT_MARK_MASK,
    GUARD_PRIORITY,
    GUARD_TABLE,
    OWNER_PRIORITY,
    OWNER_TABLE,
    PROBE_NS,
    Balance,
    RulesetSpec,
    element_commands,
    guard_commands,
    lease_commands,
    live_commands,
    owner_table_commands,
)
from lbd.protocol.errors import LbdError

__all__ = ["ApplyStats", "NftDataplane", "NftError", "claim_persistent", "new_context"]


class NftError(LbdError):
    """libnftables refused a command; the message is nft's own."""


# LBD_TABLE_PERSIST=0 in the environment: plain tables, as on a kernel < 6.9.
PERSIST_ENV = "LBD_TABLE_PERSIST"
_SEQ = itertools.count(int(time.time()) & 0x3FFFFFFF)


def _netfilter_fds() -> set[int]:
    """This process' NETLINK_NETFILTER sockets (file descriptors)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            copy = os.dup(int(name))
        except (OSError, ValueError):
            continue  # closed meanwhile
        try:
            with socket.socket(fileno=copy) as sock:  # closes the copy
                if sock.family == socket.AF_NETLINK and sock.proto == nl.NETLINK_NETFILTER:
                    found.add(int(name))
        except OSError:
            os.close(copy)  # not a socket
    return found


def new_context() -> tuple[Any, socket.socket | None]:
    """A libnftables context and a duplicate of its netlink socket (same netlink port:
    the kernel cannot tell our messages from libnftables' own), or None when the
    socket cannot be told apart (it is found as the one NETLINK_NETFILTER socket that
    the context's creation added). Call it from one thread at a time."""
    try:
        import nftables  # noqa: PLC0415 - Debian's binding, only on real nodes
    except ImportError as exc:
        raise NftError("the nftables Python binding is missing (Debian: python3-nftables)") from exc
    before = _netfilter_fds()
    ctx = nftables.Nftables()
    added = _netfilter_fds() - before
    if len(added) != 1:
        return ctx, None
    # Blocking, as libnftables keeps it (O_NONBLOCK would be shared through the dup).
    return ctx, socket.socket(fileno=os.dup(added.pop()))


def claim_persistent(sock: socket.socket, family: str, name: str) -> bool:
    """Make ``family name`` an owner + persist table of ``sock``'s netlink port: create
    it, adopt a dead owner's orphan, or replace a plain table of that name (one
    transaction, so nothing is lost if the kernel refuses). False when the kernel has
    no NFT_TABLE_F_PERSIST (< 6.9): the table is then as it was. NftError otherwise
    (EPERM: a live process owns it)."""
    if os.environ.get(PERSIST_ENV) == "0":
        return False  # as on a kernel without the flag (tests; an escape hatch)
    flags = nl.NFT_TABLE_F_OWNER | nl.NFT_TABLE_F_PERSIST

    def batch(*parts: tuple[int, int | None]) -> list[int]:
        seq = next(_SEQ)
        msgs = [
            nl.table_message(op, family, name, fl, seq=seq + 1 + i)
            for i, (op, fl) in enumerate(parts)
        ]
        try:
            return nl.exchange(sock, nl.table_batch(msgs, seq), len(msgs))
        except (OSError, nl.NetlinkError) as exc:
            raise NftError(f"{family} {name}: netlink: {exc}") from None

    codes = batch((nl.NFT_MSG_NEWTABLE, flags))
    if codes == [0]:
        return True
    if codes[0] != errno.EOPNOTSUPP:
        raise NftError(f"{family} {name}: {os.strerror(codes[0])}")
    # A plain table is in the way, or this kernel has no PERSIST: try to replace it.
    codes = batch((nl.NFT_MSG_DELTABLE, None), (nl.NFT_MSG_NEWTABLE, flags))
    if not any(codes):
        return True
    if set(codes) <= {0, errno.ENOENT, errno.EOPNOTSUPP}:
        return False
    raise NftError(f"{family} {name}: {os.strerror(max(codes))}")


@dataclass(frozen=True, slots=True)
class ApplyStats:
    """What the last :meth:`NftDataplane.apply` sent, and how long it took."""

    added: int
    removed: int
    pending: int
    """Buckets left for the next apply (``claim_chunk``)."""
    elements_sent: int
    lease_ms: int | None
    until_ns: int | None
    """The absolute deadline (CLOCK_REALTIME) the kernel was given, if any."""
    guard: bool
    commands: int
    seconds: float


class NftDataplane:
    """Owner table + persistent guard table for one node. Not thread-safe."""

    def __init__(
        self,
        vips: Sequence[str],
        buckets: int,
        seed: int,
        *,
        prefix4: int = 32,
        prefix6: int = 128,
        balance: str | Sequence[str] = "all",
        mark: int = DEFAULT_MARK,
        mark_mask: int = DEFAULT_MARK_MASK,
        table: str = OWNER_TABLE,
        guard_table: str = GUARD_TABLE,
        owner_priority: int = OWNER_PRIORITY,
        guard_priority: int = GUARD_PRIORITY,
        exempt_loopback: bool = True,
        guard_period: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        persist: bool = False,
        claim_chunk: int | None = None,
    ) -> None:
        """``persist``: make the guard owner + persist where the kernel can (module doc);
        ``persistent`` then says whether it is. ``claim_chunk``: add at most this many
        buckets per apply (the rest stays ``pending`` for the next one): a claim of
        65536 buckets is one 250-430 ms transaction, which would stall the caller."""
        if not 0 <= guard_period <= 3600:
            raise ValueError("guard_period must be between 0 and 3600 seconds")
        if claim_chunk is not None and claim_chunk < 1:
            raise ValueError("claim_chunk must be at least 1")
        self.claim_chunk = claim_chunk
        self.spec = RulesetSpec.build(
            vips,
            buckets=buckets,
            seed=seed,
            prefix4=prefix4,
            prefix6=prefix6,
            balance=Balance.parse(balance),
            mark=mark,
            mark_mask=mark_mask,
            table=table,
            guard_table=guard_table,
            owner_priority=owner_priority,
            guard_priority=guard_priority,
            exempt_loopback=exempt_loopback,
        )
        self.guard_period = guard_period
        self._clock = clock
        self._guard_due = float("-inf")
        self._nft: Any = None
        self._sock: socket.socket | None = None
        self._owned: frozenset[int] = frozenset()
        self._queue: tuple[int, ...] = ()
        """What a chunked claim still has to add, in order."""
        self._queue_goal: frozenset[int] = frozenset()
        self._checked: tuple[object, frozenset[int]] = (None, frozenset())
        self._installed = False
        self.persist = persist
        self.persistent = False
        self.deadline_checked = False
        """Whether the kernel also checks each lease's absolute deadline (install())."""
        self.last_apply_stats: ApplyStats | None = None

    # ------------------------------------------------------------------ kernel

    def _context(self) -> Any:
        if self._nft is None:
            nft, self._sock = new_context()
            nft.set_json_output(True)
            nft.set_handle_output(True)
            self._nft = nft
        return self._nft

    def _run(self, commands: Iterable[str]) -> str:
        """Run commands as ONE transaction (one batch); raise NftError on failure."""
        text = "\n".join(commands)
        if not text:
            return ""
        rc, out, err = self._context().cmd(text)
        if rc != 0:
            raise NftError((err or f"nft returned {rc}").strip())
        return str(out)

    # ------------------------------------------------------------------ API

    @property
    def installed(self) -> bool:
        """True between :meth:`install` and :meth:`remove`/:meth:`close`."""
        return self._installed

    @property
    def portid(self) -> int | None:
        """The netlink port of our libnftables socket (the port nft events name), if known."""
        if self._sock is None:
            return None
        try:
            port: int = self._sock.getsockname()[0]
        except OSError:
            return None
        return port or None

    @property
    def owned(self) -> frozenset[int]:
        """Buckets the kernel holds for this node (as of the last apply)."""
        return self._owned

    @property
    def pending(self) -> frozenset[int]:
        """Buckets the last apply asked for but left to the next (``claim_chunk``)."""
        return frozenset(self._queue)

    @property
    def pending_count(self) -> int:
        return len(self._queue)

    def _target(self, owned: Set[int]) -> frozenset[int]:
        """``owned`` checked (O(buckets)), or as checked before: a chunked claim passes
        the same frozenset again and again, and most applies only renew the lease."""
        if owned is self._checked[0]:
            return self._checked[1]
        if owned == self._owned:
            return self._owned
        # operator.index: numpy integers are fine, floats and strings are not.
        target = frozenset(operator.index(b) for b in owned)
        bad = [b for b in target if not 0 <= b < self.spec.buckets]
        if bad:
            raise ValueError(f"buckets out of range 0..{self.spec.buckets - 1}: {sorted(bad)[:5]}")
        if isinstance(owned, frozenset):  # immutable: safe to know again by identity
            self._checked = (owned, target)
        return target

    def install(self) -> None:
        """Create both tables: owning nothing, no lease, i.e. closed.

        Converges over leftovers: a previous run's guard is rewritten in place
        (it is what kept the node closed meanwhile), a dead process's owner table
        is already gone. A LIVE process's owner table makes this fail with EPERM
        (two daemons on one node must never both claim buckets). Calling it
        again in the same process replaces our own owner table atomically.

        With ``persist`` it takes three transactions, and a SIGKILL between any two
        still leaves a guard with its rules: (1) the owner table and a plain copy of the
        guard, ``<guard>_boot``; (2) the guard claimed owner + persist
        (:func:`claim_persistent`: empty if new or replaced); (3) its chains and rules,
        and the copy deleted.
        """
        if not self.persist:
            self._run(guard_commands(self.spec) + owner_table_commands(self.spec, self._installed))
        else:
            boot = replace(self.spec, guard_table=f"{self.spec.guard_table}_boot")
            self._run(guard_commands(boot) + owner_table_commands(self.spec, self._installed))
            self._context()
            self.persistent = self._sock is not None and claim_persistent(
                self._sock, "inet", self.spec.guard_table
            )
            self._run([*self._guard_commands(), f"delete table inet {boot.guard_table}"])
        self._installed = True
        self._owned, self._queue = frozenset(), ()
        self._guard_due = self._clock() + self.guard_period
        self.deadline_checked = self._probe_deadline()

    def _probe_deadline(self) -> bool:
        """Write ``live`` with the deadline PROBE_NS and read it back: True if this
        nft encodes sub-second deadlines as ``live_commands`` expects. The probe
        never matches a packet, and the chain is left empty (no lease)."""
        try:
            self._run(live_commands(self.spec, True, PROBE_NS))
            rules = [o["rule"] for o in self._chain_objects("live") if "rule" in o]
        except NftError:
            return False
        finally:
            self._run(live_commands(self.spec, False))
        # nft lists the constant as a local date in whole seconds: 512 ns is the epoch.
        epoch = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(0))
        return (
            len(rules) == 1
            and {"match": {"op": "<", "left": {"meta": {"key": "time"}}, "right": epoch}}
            in rules[0]["expr"]
        )

    def _chain_objects(self, chain: str) -> list[dict[str, Any]]:
        rc, out, err = self._context().cmd(f"list chain inet {self.spec.table} {chain}")
        if rc != 0:
            raise NftError((err or f"nft returned {rc}").strip())
        try:
            return [o for o in json.loads(out)["nftables"] if "metainfo" not in o]
        except (ValueError, KeyError, TypeError) as exc:
            raise NftError(f"unreadable listing of chain {chain}: {exc}") from None

    def apply(self, owned: Set[int], lease_ms: int | None, *, until_ns: int | None = None) -> None:
        """Make the kernel hold exactly ``owned`` and a lease of ``lease_ms`` (None: none).

        ``until_ns`` is the same lease's end on the wall clock (``time.time_ns()``),
        taken when ``lease_ms`` was: the kernel then refuses new flows after it even
        if this transaction reaches the kernel late (see ruleset.live_commands).
        Without it, the deadline is ``lease_ms`` from now. One atomic transaction
        carrying only the changed buckets; see module doc.
        """
        if not self._installed:
            raise NftError("apply() before install()")
        target = self._target(owned)
        if lease_ms is not None:
            # A fractional lease is rounded down: a shorter lease is the safe side.
            lease_ms = int(lease_ms)
            if not 1 <= lease_ms <= 86_400_000:
                raise ValueError(f"lease_ms must be in 1..86400000, not {lease_ms}")
            if until_ns is None:
                until_ns = time.time_ns() + lease_ms * 1_000_000
        if not self.deadline_checked or lease_ms is None:
            until_ns = None
        if self._queue and target is self._queue_goal:
            # The next part of the same claim: the kernel holds goal - queue.
            remove: frozenset[int] = frozenset()
            ordered = self._queue
        else:
            remove = self._owned - target
            ordered = tuple(sorted(target - self._owned))
        chunk = self.claim_chunk or len(ordered)
        # Releases all go now (break before make); a claim may come in parts:
        # holding a subset of what the core allows is always safe.
        add, queue = frozenset(ordered[:chunk]), ordered[chunk:]
        kept = (self._owned - remove) | add
        now = self._clock()
        guard = not self.persistent and now >= self._guard_due
        cmds = guard_commands(self.spec) if guard else []
        elem_cmds, sent = element_commands(self.spec, add, remove, kept)
        cmds += elem_cmds
        cmds += lease_commands(self.spec, lease_ms, until_ns)
        start = time.perf_counter()
        self._run(cmds)
        elapsed = time.perf_counter() - start
        self._owned = kept
        self._queue, self._queue_goal = queue, target
        if guard:
            self._guard_due = now + self.guard_period
        self.last_apply_stats = ApplyStats(
            added=len(add),
            removed=len(remove),
            pending=len(queue),
            elements_sent=sent,
            lease_ms=lease_ms,
            until_ns=until_ns,
            guard=guard,
            commands=len(cmds),
            seconds=elapsed,
        )

    def _guard_commands(self) -> list[str]:
        """The guard's chains and rules; no ``add table`` once it is persistent (the
        kernel refuses a table message without PERSIST for it)."""
        cmds = guard_commands(self.spec)
        return [c for c in cmds if not c.startswith("add table ")] if self.persistent else cmds

    def reassert_guard(self) -> None:
        """Write the guard again now (after someone deleted or changed it)."""
        if not self._installed:
            raise NftError("reassert_guard() before install()")
        self._run(self._guard_commands())
        self._guard_due = self._clock() + self.guard_period

    def remove(self, guard: bool = True) -> None:
        """Delete the owner table and, if ``guard``, the guard table.

        The guard goes only on a graceful stop, and only after the VIP address
        has been removed from the node: without any table a node holding the VIP
        would accept every client (fail open, two answers per SYN). After a
        crash the guard must stay: it is what keeps the node closed. On an
        orderly stop it must go, or the node would silently drop the VIP's NEW
        traffic forever, a trap for an admin who has uninstalled lbd.
        """
        cmds = []
        if self._installed:
            cmds.append(f"delete table inet {self.spec.table}")
        if guard and self.persistent:
            cmds.append(f"delete table inet {self.spec.guard_table}")  # ours: it is there
        elif guard:
            # "add" first so that the delete cannot fail on an absent table.
            cmds += [f"add table inet {self.spec.guard_table}",
                     f"delete table inet {self.spec.guard_table}"]  # fmt: skip
        self._run(cmds)
        self._installed = False
        self._owned, self._queue = frozenset(), ()
        if guard:
            self.persistent = False

    def close(self) -> None:
        """Drop the libnftables context: the kernel removes the owner table (and a
        persistent guard stays, orphaned, for the next daemon to adopt)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._nft = None
        self._installed = False
        self._owned, self._queue = frozenset(), ()

    # ------------------------------------------------------------------ listing

    def ruleset(self) -> dict[str, list[dict[str, Any]]]:
        """JSON listing of both tables: {"owner": [...], "guard": [...]} (nft objects).

        A missing table lists as []. (JSON, not text: text listing of a set typed
        after ``jhash`` segfaults nft 1.0.6; ours are plain integers, but the JSON
        form is what tests and the daemon's status want anyway.)
        """
        result: dict[str, list[dict[str, Any]]] = {}
        for key, table in (("owner", self.spec.table), ("guard", self.spec.guard_table)):
            rc, out, _err = self._context().cmd(f"list table inet {table}")
            objs = json.loads(out)["nftables"] if rc == 0 and out else []
            result[key] = [o for o in objs if "metainfo" not in o]
        return result

    def ruleset_text(self) -> str:
        """``nft list table`` text of both tables (what an admin would see)."""
        nft = self._context()
        nft.set_json_output(False)
        nft.set_handle_output(False)
        try:
            parts = []
            for table in (self.spec.table, self.spec.guard_table):
                rc, out, err = nft.cmd(f"list table inet {table}")
                parts.append(out if rc == 0 else f"# inet {table}: {err.strip()}\n")
            return "".join(parts)
        finally:
            nft.set_json_output(True)
            nft.set_handle_output(True)

    def kernel_owned(self) -> frozenset[int]:
        """The owned set as the kernel lists it (for checks; costs a netlink dump)."""
        for obj in self.ruleset()["owner"]:
            s = obj.get("set")
            if s and s.get("name") == "owned":
                return frozenset(int(e) for e in s.get("elem", []))
        return frozenset()

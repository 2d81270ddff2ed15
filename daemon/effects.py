"""How the daemon carries out the core's actions: the ``driver.Effects`` side of Service.

The driver (``protocol/driver.py``) hands each step's events and actions, in the
core's order, to these methods: events to the journal (``record``), the quorum base
to disk in a thread (``persist_base``; the driver holds what follows until it is
stored), the owner set and lease to the kernel (``apply_kernel``) and heartbeats to
the peers (``transmit``). Ownership tables are built in a thread of their own
(``build_table``): a view of 256 members with distinct weights takes ~70 ms to
build, which on the loop would hold up heartbeats; in the thread the loop waits at
most one GIL switch interval (5 ms; ``bench/ownership.py --loop-lag``).

``apply_kernel`` gives nft the lease as a relative timeout and as an absolute
deadline; a claim larger than ``service.CLAIM_CHUNK`` buckets goes in parts, one per
turn of the loop, so heartbeats go out between them. In multicast mode each apply
also makes the node the ARP/ND responder for as long as its lease if it owns bucket
0 (``macmode.ANCHOR_BUCKET``), and withdraws that otherwise. If the kernel refuses an
apply, or the base cannot be stored, the daemon stops (exit 1): its owner table goes
with its netlink socket and the guard keeps the node closed (S2).

``EffectsMixin`` is a part of ``Service`` (``service.py``), split off to keep each
module readable; it uses the attributes declared below, which Service sets up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import functools
import socket
import time
from pathlib import Path
from typing import Any

from lbd.daemon.config import DaemonConfig
from lbd.daemon.heartbeat import send_from
from lbd.daemon.notify import ERR, WARNING, LogSink, named
from lbd.daemon.snapshot import Tally
from lbd.daemon.statedir import save_quorum_base
from lbd.netcfg.macmode import ANCHOR_BUCKET, MacMode
from lbd.netcfg.nft import NftDataplane
from lbd.protocol import events as ev
from lbd.protocol.driver import Driver
from lbd.protocol.errors import LbdError
from lbd.protocol.membership import Node
from lbd.protocol.ownership import Owners, compute_owners


class EffectsMixin:
    """The ``driver.Effects`` methods of Service, and the kernel's apply statistics."""

    # Set up by Service (service.py).
    config: DaemonConfig
    address: str
    sink: LogSink
    core: Node
    driver: Driver
    _state_dir: Path
    _nft: NftDataplane | None
    _macmode: MacMode | None
    _sock: socket.socket | None
    _leaving: bool
    tally: Tally
    """What happened (slices moved, applies and their cost): snapshot.py."""

    # Failures counted so that only the first and every 1000th is logged.
    _answer_errors = 0
    _send_errors = 0
    _applied: ev.ApplyKernel | None = None
    """The last ApplyKernel carried out (a chunked claim continues it)."""
    _claim_due = False
    """The rest of a chunked claim is already due in the loop's next turn."""
    _table_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lbd-table")
    """Ownership tables are built here, one at a time (a class attribute: one per
    process, its thread started on first use)."""
    _table_wanted: ev.BuildTable | None = None
    _table_building = False

    def _finish(self, code: int) -> None:
        """Stop the daemon with exit ``code`` (Service's)."""
        raise NotImplementedError

    def _stepped(self) -> None:
        """After a step the driver carried out (Service's)."""
        raise NotImplementedError

    def record(self, events: list[ev.Event]) -> None:
        """One step's events to the journal (before its actions run)."""
        core = self.core
        fields = {"SLICES": str(len(core.held)), "VIEW": core.digest()}
        self.tally.record(events)
        for event in events:
            self.sink.event(named(event, core.name_of), fields)

    def persist_base(self, action: ev.PersistBase) -> None:
        """Written in a thread (fsync must not stall the loop); the driver holds
        everything after it (the claim and the heartbeat that advertise the base)
        until ``_persisted``."""
        future = asyncio.get_running_loop().run_in_executor(
            None,
            functools.partial(
                save_quorum_base,
                self._state_dir,
                action.base,
                action.epoch,
                action.previous,
                params=action.params,
                credentials=action.credentials,
            ),
        )
        future.add_done_callback(self._persisted)

    def _persisted(self, future: asyncio.Future[None]) -> None:
        if future.cancelled():
            return  # the loop is closing
        exc = future.exception()
        if exc is not None:
            self.driver.persisted(False)
            self._persist_failed(exc)
        elif self.driver.persisted(True) and self._leaving and self.driver.left:
            self._finish(0)  # the leave waited for its last base to be stored

    def _persist_failed(self, exc: BaseException) -> None:
        """Stop before the heartbeat (and any claim) that needed the base on disk: a
        restart on an older base than the peers confirmed could make this node a
        stale quorum (S1). The driver already dropped what waited."""
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        self.sink.emit(
            ERR,
            f"cannot store the quorum base in {self._state_dir}: {reason}; "
            "stopping (a restart must not forget it)",
            "PersistFailed",
        )
        if self._nft is not None:
            self._nft.close()  # the owner table goes with our netlink socket: closed
            self._nft = None
        self._finish(1)

    def apply_kernel(self, action: ev.ApplyKernel) -> bool:
        return self._apply(action)

    def _apply(self, action: ev.ApplyKernel) -> bool:
        if self._nft is None:
            return False  # already failed and stopping
        lease_ms = until_ns = None
        if action.lease_until is not None:
            # The wall clock first: a pause between the two readings can only make
            # the absolute deadline earlier. Rounded down: never past the core's.
            wall = time.time_ns()
            left = action.lease_until - time.monotonic()
            lease_ms, until_ns = max(0, int(left * 1000)), wall + int(left * 1e9)
        try:
            # A lease already over is no lease: owned buckets without one accept nothing.
            self._nft.apply(action.owned, lease_ms or None, until_ns=until_ns)
        except (LbdError, ValueError) as exc:
            self.sink.emit(ERR, f"kernel refused the ruleset, stopping: {exc}", "KernelApplyFailed")
            # The owner table goes with our netlink socket; the guard keeps us closed.
            self._nft.close()
            self._nft = None
            self._finish(1)
            return False
        stats = self._nft.last_apply_stats
        if stats is not None:
            self.tally.applied(stats.seconds)
        self._applied = action
        if self._nft.pending_count and not self._claim_due:
            # The rest of a big claim in the loop's next turn: heartbeats go between.
            self._claim_due = True
            asyncio.get_running_loop().call_soon(self._continue_claim)
        if self._macmode is not None:
            self._answer(lease_ms if ANCHOR_BUCKET in self._nft.owned and lease_ms else None)
        return True

    def _continue_claim(self) -> None:
        """Apply the last applied action again: its next part of the claim, with its
        own deadline (the driver has moved on only if it applied a newer one)."""
        self._claim_due = False
        if self._nft is not None and self._nft.pending_count and self._applied is not None:
            self._apply(self._applied)

    def _answer(self, lease_ms: int | None) -> None:
        """Be the ARP/ND responder for ``lease_ms`` or stop. Not a safety matter (a
        gap only delays address resolution; two answers would be identical), so a
        failure is logged, not fatal."""
        if self._macmode is None:
            return
        try:
            self._macmode.answer(lease_ms)
        except LbdError as exc:
            if self._answer_errors % 1000 == 0:
                self.sink.emit(
                    ERR,
                    f"cannot update the ARP/ND responder: {exc} ({self._answer_errors + 1} so far)",
                )
            self._answer_errors += 1

    def build_table(self, action: ev.BuildTable) -> None:
        """In the table thread; only the newest request waits behind a running build
        (an older one is for a view the core no longer wants: it asks again if so)."""
        self._table_wanted = action
        if not self._table_building:
            self._start_table_build()

    def _start_table_build(self) -> None:
        action, self._table_wanted = self._table_wanted, None
        if action is None:
            self._table_building = False
            return
        self._table_building = True
        future = asyncio.get_running_loop().run_in_executor(
            self._table_thread, compute_owners, action.weights, action.buckets, action.seed
        )
        future.add_done_callback(functools.partial(self._table_built, action))

    def _table_built(self, action: ev.BuildTable, future: asyncio.Future[Owners]) -> None:
        if future.cancelled():
            return  # the loop is closing
        self._start_table_build()
        # An exception here would be a bug in the pure core's own function: the
        # loop's handler logs it as InternalError and stops the daemon.
        if self.driver.table_built(action.weights, future.result(), time.monotonic()):
            self._stepped()

    def transmit(self, data: bytes) -> None:
        if self._sock is None:
            return
        targets = [self.config.group] if self.config.multicast else []
        targets += [peer for peer in self.config.peers if peer != self.address]
        for target in targets:
            try:
                send_from(self._sock, self.address, (target, self.config.port), data)
            except OSError as exc:
                # Heartbeats are lossy by design; a full buffer or a down link must
                # not stop the loop. Log the first and then every 1000th failure.
                if self._send_errors % 1000 == 0:
                    self.sink.emit(
                        WARNING,
                        f"heartbeat to {target} not sent: "
                        f"{errno.errorcode.get(exc.errno or 0, exc)} "
                        f"({self._send_errors + 1} so far)",
                    )
                self._send_errors += 1

    def kernel_stats(self) -> dict[str, Any]:
        """Kernel transactions so far (owner set and lease changes) and their cost."""
        tally = self.tally
        return {
            "applies": tally.applies,
            "mean_apply_ms": round(1000 * tally.apply_seconds / tally.applies, 3)
            if tally.applies
            else None,
            "last_apply_ms": None
            if tally.apply_last is None
            else round(1000 * tally.apply_last, 3),
            "max_apply_ms": round(1000 * tally.apply_max, 3),
            "apply_seconds": tally.histogram(),
            "claim_pending": self._nft.pending_count if self._nft is not None else 0,
            "deadline_checked": self._nft is not None and self._nft.deadline_checked,
        }

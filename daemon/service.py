"""The asyncio shell around the pure core: sockets, one timer, kernel, signals.

Theory of operation
-------------------
Start-up, in this order (each step fails closed):

1. take the instance lock (``flock`` on ``state_dir/lbd.lock``): a second daemon on
   the host refuses to start instead of fighting over the tables;
2. ``NftDataplane.install()``: the guard drops NEW connections to the VIPs and the
   owner table holds nothing, so the node is closed *before* it holds a VIP;
3. with ``mac_mode = "multicast"`` or ``"flood"``: ``MacMode.apply()`` (join the cluster MAC, the
   persistent ``lbd_mac`` tables: ARP/ND rewrite, silent on ARP/NS until chosen as
   responder; recorded in ``state_dir/macmode.json``), so the VIP never resolves
   to a node's own MAC; then ``LinkSetup.apply()``, run in a child process
   (``netcfg/linkproc.py``): VIPs and sysctls (recorded in ``state_dir/link.json``);
4. the heartbeat socket and the control socket;
5. the core (``lbd.protocol.membership.Node``). Only now does the node speak.

Steady state: every input (datagrams, timer, signal, control command) is one core
call handed to the driver (``protocol/driver.py``, the one the simulator proves):
it logs the step's events, then carries out the core's actions *in order* (break
before make; nothing after a PersistBase until its fsync, done in a thread, is
through) through the ``Effects`` methods (``effects.py``), and says when to wake next.
The single timer is armed at that deadline. While the core is quiet
(``quiet_until``: the cluster is settled) the socket is not watched: the wake-up
reads everything queued, with kernel arrival times (``heartbeat.py``), in one
call, so a settled daemon wakes once per interval. A control query catches up first.
In multicast mode each ApplyKernel also makes the node the ARP/ND responder for
as long as its lease, if it owns bucket 0 (``macmode.ANCHOR_BUCKET``), and
withdraws that otherwise. If the kernel refuses an apply (or the base cannot be
stored), the driver stops, the daemon transmits nothing more and exits 1: its
owner table vanishes with its netlink socket and the guard keeps the node closed
(S2); peers see it die.

SIGTERM/SIGINT: ``core.leave()`` (drain through the handoff, then announce the
leave); once ``has_left`` (or after ``leave_timeout`` + 1 s) the owner table is
deleted, the VIPs and sysctls restored, the lbd_mac tables and cluster MAC removed,
then the guard removed; exit 0.
SIGHUP: reload the config and key file (see ``reload``) without dropping slices.

The only children are the link helper's, started with ``close_fds``: the
libnftables socket is not close-on-exec, and a child holding it would keep the
owner table (and so the node's claims) alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from lbd.daemon import control, healthlink, metrics_http
from lbd.daemon.config import CLUSTER_MAC_MODES, DaemonConfig, load_config, load_keyring
from lbd.daemon.effects import EffectsMixin
from lbd.daemon.healthlink import HealthLink
from lbd.daemon.heartbeat import StampedReader, heartbeat_socket
from lbd.daemon.kernelwatch import KernelWatch
from lbd.daemon.notify import (
    ERR,
    INFO,
    NOTICE,
    WARNING,
    LogSink,
    Notifier,
    describe_loop_error,
)
from lbd.daemon.snapshot import Tally
from lbd.daemon.statedir import (
    StartupError,
    acquire_lock,
    load_base_agreement,
    load_quorum_base,
    next_incarnation,
)
from lbd.netcfg.hbfilter import HeartbeatFilter, interface_networks
from lbd.netcfg.linkproc import LinkProcess
from lbd.netcfg.macmode import MacMode
from lbd.netcfg.nft import NftDataplane
from lbd.protocol.driver import Datagram, Driver
from lbd.protocol.errors import LbdError
from lbd.protocol.membership import Node
from lbd.protocol.messages import wire_id
from lbd.protocol.wire import Codec, Keyring

RECV_BATCH = 64
DROP_LOG_EVERY = 10.0
LEAVE_GRACE = 1.0
# Kernels without persistent tables (< 6.9): an apply re-asserts the guard at most
# this often, besides the event listener (kernelwatch.py) that rewrites it at once.
GUARD_PERIOD = 1.0
# Buckets added per kernel transaction (~14 ms here): a claim of 65536 in one would
# hold the loop for 250-430 ms, longer than the fast profile's dead_after.
CLAIM_CHUNK = 4096
# Settings a reload cannot change on a running node (they shape the cluster or the
# kernel state): changing them needs a restart, and a reload says so.
RESTART_KEYS = ("cluster", "interface", "address", "vips", "node_id", "buckets", "seed",
                "quorum", "timers", "timer_profile", "group", "port", "multicast",
                "mac_mode", "cluster_mac", "balance", "prefix4", "prefix6", "control_socket",
                "state_dir", "bootstrap_expect", "checks", "track_interface", "agent",
                "check_user", "check_allow_root", "all_unhealthy",
                "metrics_listen")  # fmt: skip
# A problem that lasts (a stranger's datagrams, a mismatched peer) is logged again at
# most this often, with what was heard since.
PROBLEM_LOG_EVERY = 30.0


class Service(EffectsMixin):
    """One running daemon. ``await run()`` returns the process exit code."""

    def __init__(
        self,
        cfg: DaemonConfig,
        config_path: Path,
        keyring: Keyring,
        *,
        node_id: str,
        ifindex: int,
        address: str,
        sink: LogSink,
        notifier: Notifier,
    ) -> None:
        self.config = cfg
        self.config_path = config_path
        self.keyring = keyring
        self.node_id = node_id
        self.ifindex = ifindex
        self.address = address
        self.sink = sink
        self.notifier = notifier
        self.ready = False
        self.started_at = time.monotonic()
        self.tally = Tally()  # what happened, beside the core's counters (snapshot.py)
        self._metrics: metrics_http.MetricsServer | None = None
        self.core: Node
        self.driver: Driver
        self._lock_fd: int | None = None
        self._nft: NftDataplane | None = None
        self._link: LinkProcess | None = None
        self._macmode: MacMode | None = None
        self._kernelwatch: KernelWatch | None = None
        self.healthlink: HealthLink | None = None
        # Why the node drains: "operator" (lbd-cli, config), "kernel: ..." (one per
        # kernel fault, kernelwatch.py), "health" and "agent" (healthlink.py). It
        # drains while any holds: none undoes another.
        self.drain_reasons: set[str] = set()
        # The shell's problems (the core has its own): key -> one line for lbd-cli status.
        self.shell_problems: dict[str, str] = {}
        self.hbfilter: HeartbeatFilter | None = None
        self._sock: socket.socket | None = None
        self._reader: StampedReader
        self._watching = False
        self._backlog = False
        self._control: control.ControlServer | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._done: asyncio.Future[int] | None = None
        self._leaving = False
        self._drops_logged = (0, 0.0)
        self._problems_logged: dict[str, tuple[float, int]] = {}
        self._status_key: tuple[Any, ...] = ()

    # ------------------------------------------------------------ life cycle

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        loop.set_exception_handler(self._on_loop_error)
        cfg = self.config
        state_dir = Path(cfg.state_dir)
        self._lock_fd = acquire_lock(state_dir)
        try:
            await self._start(state_dir)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.begin_leave)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
            self._watchdog()
            return await self._done
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self._stop()
            os.close(self._lock_fd)

    async def _start(self, state_dir: Path) -> None:
        cfg = self.config
        # First, before anything touches the kernel: a corrupt record stops us here.
        base, epoch, previous = load_quorum_base(state_dir)
        base_params, base_credentials = load_base_agreement(state_dir)
        self._nft = NftDataplane(
            list(cfg.vips),
            cfg.buckets,
            cfg.seed,
            prefix4=cfg.prefix4,
            prefix6=cfg.prefix6,
            balance=list(cfg.balance),
            guard_period=GUARD_PERIOD,
            persist=True,
            claim_chunk=CLAIM_CHUNK,
        )
        try:
            self._nft.install()
        except LbdError as exc:
            self._nft = None
            raise StartupError(f"cannot install the nftables rules: {exc}") from None
        if not self._nft.deadline_checked:
            self.sink.emit(
                WARNING,
                "this nft cannot give the kernel a lease's absolute "
                "deadline: leases rest on their relative timeout alone, which "
                "a paused daemon can stretch",
                "LeaseDeadlineUnchecked",
            )
        multicast = cfg.mac_mode in CLUSTER_MAC_MODES  # multicast or flood: own MACs kept
        cluster_mac = cfg.effective_cluster_mac()
        if multicast and cluster_mac is not None:
            self._macmode = MacMode(
                cfg.interface,
                list(cfg.vips),
                cluster_mac,
                state_file=state_dir / "macmode.json",
                persist=True,
            )
            try:
                await asyncio.to_thread(self._macmode.apply)
            except LbdError as exc:
                raise StartupError(
                    f"cannot set up cluster MAC {cluster_mac} on {cfg.interface}: {exc}"
                ) from None
        # In multicast mode the node keeps its own MAC (no shared-MAC IPv6 sysctls).
        self._link = LinkProcess(
            cfg.interface,
            list(cfg.vips),
            cluster_mac=None if multicast else cluster_mac,
            state_file=state_dir / "link.json",
        )
        try:
            # A child process (pyroute2 stays out of the daemon); waited for off the loop.
            await asyncio.to_thread(self._link.apply)
        except LbdError as exc:
            raise StartupError(f"cannot set up {cfg.interface}: {exc}") from None
        # Heartbeats only from the segment or the peers, of a valid size, before the
        # socket exists (netcfg/hbfilter.py; an owner table, gone with the process).
        try:
            hbfilter = HeartbeatFilter(
                cfg.interface, cfg.port, interface_networks(self.ifindex), cfg.peers
            )
            hbfilter.install()
        except (LbdError, OSError, ValueError) as exc:
            raise StartupError(f"cannot install the heartbeat filter: {exc}") from None
        self.hbfilter = hbfilter
        try:
            self._sock = heartbeat_socket(cfg, self.ifindex, self.address)
        except LbdError as exc:
            raise StartupError(str(exc)) from None
        self._reader = StampedReader(self._sock)
        self._control = control.ControlServer(
            cfg.control_socket, lambda request: control.dispatch(self, request)
        )
        try:
            await self._control.start()
        except OSError as exc:
            raise StartupError(f"control socket {cfg.control_socket}: {exc.strerror}") from None
        incarnation = next_incarnation(state_dir)
        self.sink.context["NODE"] = self.node_id
        mode = (
            f"{cfg.mac_mode} cluster MAC {cluster_mac}"
            if multicast
            else f"shared MAC {cluster_mac or '(as configured)'}"
        )
        self.sink.emit(
            INFO,
            f"rules installed on {cfg.interface} for "
            f"{', '.join(cfg.vips)} ({mode}); joining cluster {cfg.cluster!r} as "
            f"{self.node_id} from {self.address} (incarnation {incarnation})",
            "Started",
        )
        now = time.monotonic()
        self._state_dir = state_dir
        # The core knows this node by its 4-byte wire ID; names are for people.
        self.core = Node(
            cfg.core_config(),
            Codec(cfg.cluster, self.keyring),
            wire_id(self.node_id),
            incarnation,
            now,
            weight=cfg.weight,
            draining=cfg.draining,
            base=base,
            epoch=epoch,
            previous_base=previous,
            name=self.node_id,
            base_params=base_params,
            base_credentials=base_credentials,
            defer_tables=True,
        )  # built in a thread (effects.build_table)
        self.driver = Driver(self.core, self)
        self._process()
        self.drain_reasons = {"operator"} if cfg.draining else set()
        # Watched kernel state (S5): VIPs, link, MAC, tables, sysctls (kernelwatch.py).
        self._kernelwatch = KernelWatch(self)
        try:
            self._kernelwatch.start()
        except LbdError as exc:
            raise StartupError(f"cannot watch the kernel state: {exc}") from None
        if healthlink.wanted(self):  # checks, tracked interfaces, the load agent
            self.healthlink = HealthLink(self)
            await self.healthlink.start()
        self._metrics = await metrics_http.serve(self)

    async def _stop(self) -> None:
        """Undo in the safe order; every step is attempted even if one fails."""
        if self._kernelwatch is not None:  # first: it must not put back what we remove
            await self._kernelwatch.stop()
        if self.healthlink is not None:
            await self.healthlink.stop()
        if self._timer is not None:
            self._timer.cancel()
        if self._sock is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
        if self.hbfilter is not None:
            with contextlib.suppress(LbdError):  # an owner table: gone with us anyway
                self.hbfilter.remove()
        if self._control is not None:
            await self._control.close()
        if self._metrics is not None:
            await self._metrics.close()
        # Owner table first (nothing claimed), then the VIPs, then, only once the
        # VIPs are gone, the guard: a VIP without any table would accept everyone.
        nft = self._nft
        try:
            if nft is not None:
                nft.remove(guard=False)
            if self._link is not None:
                await asyncio.to_thread(self._link.restore)
            if self._macmode is not None:  # only once the VIPs are gone
                await asyncio.to_thread(self._macmode.restore)
            if nft is not None:
                nft.remove(guard=True)
        except LbdError as exc:
            self.sink.emit(ERR, f"stop: cleanup incomplete (guard kept, node closed): {exc}")
        self.notifier.close()

    def _finish(self, code: int) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(code)

    def begin_leave(self) -> None:
        """SIGTERM: hand the slices over, then stop (a second signal stops at once)."""
        if self._leaving:
            self.sink.emit(WARNING, "second stop signal: stopping without waiting")
            self._finish(0)
            return
        self._leaving = True
        self.notifier.stopping("leaving: handing slices over")
        self.sink.emit(NOTICE, "stop requested: leaving the cluster gracefully")
        now = time.monotonic()
        self.core.leave(now)
        timeout = self.config.timers.leave_timeout + LEAVE_GRACE
        asyncio.get_running_loop().call_later(timeout, self._leave_timed_out)
        self._process()

    def _leave_timed_out(self) -> None:
        if not self.core.has_left:
            self.sink.emit(WARNING, "leave not confirmed in time; stopping anyway")
        self._finish(0)

    # ------------------------------------------------------------ inputs

    def _on_readable(self) -> None:
        self._input(None)

    def catch_up(self) -> None:
        """Read what waits in the socket now (before answering a query)."""
        if self._sock is not None and not self._watching:  # else read on arrival
            self._on_readable()

    def _on_timer(self) -> None:
        self._timer = None
        self._input(time.monotonic())

    def _input(self, timer_due: float | None) -> None:
        """What waits in the socket (first: a deadline must not pass over an
        arrival) and the timer if due: one core step through the driver."""
        batch: list[Datagram] = []
        if self._sock is not None:
            batch, self._backlog = self._reader.read(RECV_BATCH)
        if self.driver.feed(batch, timer_due):
            self._stepped()

    def set_draining(
        self, draining: bool, why: str, reason: str = "operator", log: bool = True
    ) -> None:
        """Add or end one drain ``reason``; the node drains while any holds, so an
        operator's undrain never ends a kernel fault's drain, nor the reverse."""
        if draining:
            self.drain_reasons.add(reason)
        else:
            self.drain_reasons.discard(reason)
        if bool(self.drain_reasons) != self.core.draining:
            self.core.set_draining(bool(self.drain_reasons), time.monotonic())
            if log:
                state = "draining" if self.core.draining else "taking new connections again"
                self.sink.emit(NOTICE, f"{state} ({why})", "DrainChanged")
            self._process()

    def reload(self) -> None:
        """SIGHUP: key rotation, weight, drain flag and peers; other changes need a restart.

        The key file is taken as it is: a rotation's three steps (``ROTATION_STEPS``)
        are each one reload on every node, so the running keys are never kept
        behind the operator's back (that sealed with a key peers did not accept yet).
        """
        self.notifier.reloading()
        old = self.config
        try:
            new = load_config(self.config_path)
            ring = load_keyring(new.key_file)
        except LbdError as exc:
            self.sink.emit(ERR, f"reload failed, running config kept: {exc}", "ReloadFailed")
            self.notifier.send("READY=1")
            return
        ignored = [key for key in RESTART_KEYS if getattr(new, key) != getattr(old, key)]
        if ring.fingerprints != self.keyring.fingerprints:
            self.keyring = ring
            self.core.set_codec(Codec(old.cluster, ring))
            self.sink.emit(
                NOTICE,
                "keys reloaded: sealing with "
                f"{ring.current_fingerprint.hex()}, accepting "
                f"{', '.join(fp.hex() for fp in ring.fingerprints)}",
                "Reloaded",
            )
        now = time.monotonic()
        if new.weight != old.weight and self.healthlink is not None:
            self.healthlink.monitor.set_weight(new.weight)  # scaled by the agent
        elif new.weight != old.weight:
            self.core.set_weight(new.weight, now)
        if new.draining != old.draining:
            self.set_draining(new.draining, "config reload")
        self.config = replace(new, **{key: getattr(old, key) for key in RESTART_KEYS})
        if self.hbfilter is not None and new.peers != old.peers:
            try:
                self.hbfilter.update(peers=new.peers)
            except LbdError as exc:
                self.sink.emit(ERR, f"heartbeat filter kept the old peers: {exc}")
        note = f"; needs a restart, ignored: {', '.join(ignored)}" if ignored else ""
        self.sink.emit(WARNING if ignored else INFO, f"configuration reloaded{note}", "Reloaded")
        self._process()
        self.notifier.send("READY=1")

    # ------------------------------------------------------------ outputs

    def _process(self) -> None:
        """After a direct core call (leave, drain, weight, ...): the driver logs its
        events and carries out its actions in order; then ``_stepped``."""
        if self.driver.process():
            self._stepped()

    def _stepped(self) -> None:
        """After a step the driver carried out: status, the leave's end, the timer."""
        core = self.core
        self._log_drops()
        if not self.ready and core.agreed and not self._leaving:
            self.ready = True
            self.notifier.ready(self._status_text())
        else:
            # Formatted only when one of its inputs changed (most steps change none).
            key = (
                self._leaving,
                core.quorum_ok,
                core.draining,
                core.agreed,
                len(core.held),
                core.view,
                tuple(self.problems(time.monotonic())),
            )
            if key != self._status_key:
                self._status_key = key
                self.notifier.status(self._status_text())
        if self._leaving and self.driver.left:
            self._finish(0)
            return
        if self.healthlink is not None:
            self.healthlink.after_step()  # peers' health came with their heartbeats
        self._arm_timer()

    def _arm_timer(self) -> None:
        """The single timer at the driver's deadline; the socket watched unless the
        core is quiet (then read at the timer, once per interval)."""
        wake = self.driver.wakeup(self._backlog)
        deadline = wake.deadline
        self._watch(wake.watch)
        if self._timer is not None:
            if deadline is not None and self._timer.when() == deadline:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            # The default loop's clock is time.monotonic(), the core's clock.
            self._timer = asyncio.get_running_loop().call_at(deadline, self._on_timer)

    def _watch(self, on: bool) -> None:
        if on == self._watching or self._sock is None:
            return
        loop = asyncio.get_running_loop()
        if on:
            loop.add_reader(self._sock.fileno(), self._on_readable)
        else:
            loop.remove_reader(self._sock.fileno())
        self._watching = on

    def _log_drops(self) -> None:
        self._log_lasting_problems()
        c = self.core.counters
        dropped = c.malformed + c.forged + c.replayed
        logged, at = self._drops_logged
        now = time.monotonic()
        if dropped > logged and now - at >= DROP_LOG_EVERY:
            self._drops_logged = (dropped, now)
            self.sink.emit(
                WARNING,
                f"dropped {dropped - logged} bad datagrams (total: "
                f"{c.malformed} malformed, {c.forged} forged, {c.replayed} "
                "replayed)",
                "DatagramsDropped",
                {
                    "MALFORMED": str(c.malformed),
                    "FORGED": str(c.forged),
                    "REPLAYED": str(c.replayed),
                },
            )

    def _log_lasting_problems(self) -> None:
        """Strangers we keep hearing are logged again, rate-limited (the core reports
        each one once, when first heard): an operator who looks later still finds it."""
        now = time.monotonic()
        for address, reason, count in self.core.strangers:
            at, logged = self._problems_logged.get(address, (now, count))
            if address not in self._problems_logged:
                self._problems_logged[address] = (now, count)  # the core's event said it
            elif count > logged and now - at >= PROBLEM_LOG_EVERY:
                self._problems_logged[address] = (now, count)
                self.sink.emit(
                    ERR,
                    f"hearing {count - logged} more datagrams from {address} "
                    f"that fail {reason} ({count} so far)",
                    "StrangerHeard",
                    {"OTHER_ADDRESS": address, "COUNT": str(count)},
                )

    def problems(self, now: float) -> list[str]:
        """The core's problems, then the shell's (kernel state: kernelwatch.py)."""
        health = self.healthlink.problems() if self.healthlink is not None else []
        return self.core.problems(now) + list(self.shell_problems.values()) + health

    def _status_text(self) -> str:
        core = self.core
        if self._leaving:
            return f"leaving: {len(core.held)} slices left"
        problems = self.problems(time.monotonic())
        if problems:
            more = f" (+{len(problems) - 1} more: lbd-cli status)" if len(problems) > 1 else ""
            return f"{len(core.held)}/{core.config.buckets} slices; {problems[0]}{more}"
        if not core.quorum_ok:
            return f"no quorum: view {core.digest()}, serving nothing soon"
        state = "draining" if core.draining else "serving" if core.agreed else "joining"
        return (
            f"{state} {len(core.held)}/{core.config.buckets} slices, view "
            f"{core.digest()} ({len(core.view)} members)"
        )

    def _watchdog(self) -> None:
        if getattr(self, "_loop_failed", False):  # set by _on_loop_error; no attr before
            return
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        # Pinged from the event loop itself: a stuck loop stops the pings.
        self.notifier.watchdog()
        asyncio.get_running_loop().call_later(interval, self._watchdog)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An exception escaped a callback (socket reader, timer, ...): stop, exit 1.

        asyncio's default handler only logs it, and the callback's work dies with
        it: the timer is never re-armed, heartbeats stop, yet the watchdog pings on
        and systemd sees a healthy daemon. Exiting instead lets systemd restart us;
        the owner table vanishes with our netlink socket and the guard keeps the
        node closed meanwhile (S2). The watchdog pings stop at once, so a cleanup
        that hangs is killed by systemd too.
        """
        self._loop_failed = True
        try:
            line, detail = describe_loop_error(context)
            self.sink.emit(ERR, line, "InternalError", {"TRACEBACK": detail})
        finally:  # whatever happens to the log line, the daemon must not stay half-alive
            self._finish(1)

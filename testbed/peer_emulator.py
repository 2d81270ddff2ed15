"""Many lbd peers in one process, for measuring one real daemon in a large cluster.

    python -m lbd.testbed.peer_emulator --config NODE.toml --count 31 --first-address 192.0.2.20

32 real daemons do not fit on a 2-core machine (each one's wake-ups cost more
than the cores give), so ``bench/cost.py`` measures ONE real daemon in a cluster
whose other members are emulated here: ``--count`` instances of the real core
(``lbd.protocol.membership.Node``) with real keys and codecs, sharing one
heartbeat socket in one namespace, each sending from its own address (added to
the interface by the caller) through ``IP_PKTINFO``. They hear each other
in-process (multicast loop is off, as in the daemon) and the real daemon over the
wire, so the daemon sees ``count`` live peers that ack, agree on views and hold
leases exactly as daemons would; only their kernel applies are skipped (they
serve no traffic). Each core is driven by ``protocol/driver.py``, the daemon's and
the simulator's driver, with effects that send and skip the kernel. Runs until
SIGTERM; prints a JSON summary on stdout then.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ipaddress
import json
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lbd.daemon import heartbeat
from lbd.daemon.config import DaemonConfig, load_config, load_keyring
from lbd.protocol import events as ev
from lbd.protocol.driver import Driver
from lbd.protocol.errors import LbdError
from lbd.protocol.membership import Node
from lbd.protocol.messages import Heartbeat, Member
from lbd.protocol.params import digest_params
from lbd.protocol.wire import Codec

RECV_BATCH = 256


def send_from(sock: socket.socket, cfg: DaemonConfig, address: str, data: bytes) -> bool:
    """One heartbeat to the group from ``address``, as the daemon sends; whether sent."""
    try:
        heartbeat.send_from(sock, address, (cfg.group, cfg.port), data)
    except OSError:
        return False  # lossy by design, as in the daemon
    return True


class EmulatedShell:
    """One emulated peer's effects (``protocol.driver.Effects``): its heartbeats are
    queued for the wire and the other cores; it has no disk and no kernel."""

    def __init__(self, emulator: Emulator, index: int) -> None:
        self.emulator = emulator
        self.index = index
        self.driver: Driver | None = None

    def record(self, events: list[ev.Event]) -> None:
        pass  # nobody reads an emulated peer's log

    def persist_base(self, action: ev.PersistBase) -> None:
        assert self.driver is not None
        self.driver.persisted(True)  # no state dir: stored at once

    def apply_kernel(self, action: ev.ApplyKernel) -> bool:
        return True  # they serve no traffic: skipped

    def transmit(self, data: bytes) -> None:
        self.emulator.pending.append((self.index, data))

    def build_table(self, action: ev.BuildTable) -> None:
        raise RuntimeError("emulated cores build their own tables (no defer_tables)")


async def until_sigterm(
    sock: socket.socket, on_readable: Callable[[], None], start: Callable[[], None]
) -> float:
    """Read ``sock`` with ``on_readable``, call ``start``, run until SIGTERM; CPU seconds."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    loop.add_reader(sock.fileno(), on_readable)
    started = time.process_time()
    start()
    await stop
    return round(time.process_time() - started, 2)


class Emulator:
    """``count`` cores on one socket; datagrams between them never leave the process.

    Each datagram is authenticated and decoded once, then handed to every core
    (``Node.receive_message``); each core has its own timer. Without both, one
    process could not keep 31 cores on time.
    """

    def __init__(self, config: Path, count: int, first_address: str, prefix: str) -> None:
        self.cfg = load_config(config)
        keyring = load_keyring(self.cfg.key_file)
        first = ipaddress.IPv4Address(first_address)
        self.addresses = [str(first + i) for i in range(count)]
        now = time.monotonic()
        incarnation = time.time_ns() // 1_000_000
        self.codec = Codec(self.cfg.cluster, keyring)
        self.cores = [
            Node(
                self.cfg.core_config(),
                Codec(self.cfg.cluster, keyring),
                f"{prefix}{i:02d}",
                incarnation,
                now,
            )
            for i in range(count)
        ]
        self.drivers: list[Driver] = []
        for index, core in enumerate(self.cores):
            shell = EmulatedShell(self, index)
            shell.driver = Driver(core, shell)
            self.drivers.append(shell.driver)
        self.ifindex = socket.if_nametoindex(self.cfg.interface)
        self.sock = heartbeat.heartbeat_socket(self.cfg, self.ifindex, self.addresses[0])
        self.reader = heartbeat.StampedReader(self.sock)
        self.pending: collections.deque[tuple[int, bytes]] = collections.deque()
        self.timers: list[asyncio.TimerHandle | None] = [None] * count
        self.drain_scheduled = False
        self.stats = {"received": 0, "sent": 0, "local_deliveries": 0, "undecodable": 0}

    def on_readable(self) -> None:
        for data, source, _arrived in self.reader.read(RECV_BATCH)[0]:
            self.stats["received"] += 1
            self.deliver(data, source, None)
        self.drain()

    def deliver(self, data: bytes, address: str, sender: int | None) -> None:
        try:
            message = self.codec.open(data)
        except LbdError:
            self.stats["undecodable"] += 1
            return
        now = time.monotonic()
        for index, core in enumerate(self.cores):
            if index != sender:
                core.receive_message(message, address, now)
                self.collect(index)

    def on_timer(self, index: int) -> None:
        self.timers[index] = None
        self.drivers[index].feed([], time.monotonic())
        self.arm(index)
        self.drain()

    def drain(self) -> None:
        """Send the queued heartbeats, each also to every other core (in-process).

        Only what is queued now: the deliveries queue prompted answers, and looping
        until none is left could keep the event loop (timers, the socket, SIGTERM)
        waiting for good; the rest goes in the loop's next round.
        """
        for _ in range(len(self.pending)):
            sender, data = self.pending.popleft()
            self.send(sender, data)
            self.stats["local_deliveries"] += len(self.cores) - 1
            self.deliver(data, self.addresses[sender], sender)
        if self.pending and not self.drain_scheduled:
            self.drain_scheduled = True
            asyncio.get_running_loop().call_soon(self.drain_later)

    def drain_later(self) -> None:
        self.drain_scheduled = False
        self.drain()

    def collect(self, index: int) -> None:
        """Carry out a core's step (heartbeats queued, kernel skipped); re-arm its timer."""
        self.drivers[index].process()
        self.arm(index)

    def arm(self, index: int) -> None:
        """The core's timer. The shared socket is read at once for every core, as a
        socket with a backlog is: a core's quiet window does not apply."""
        deadline = self.drivers[index].wakeup(backlog=True).deadline
        timer = self.timers[index]
        if timer is not None:
            if deadline is not None and timer.when() == deadline:
                return
            timer.cancel()
            self.timers[index] = None
        if deadline is not None:
            self.timers[index] = asyncio.get_running_loop().call_at(deadline, self.on_timer, index)

    def send(self, sender: int, data: bytes) -> None:
        self.stats["sent"] += send_from(self.sock, self.cfg, self.addresses[sender], data)

    def start(self) -> None:
        for index in range(len(self.cores)):
            self.on_timer(index)

    async def run(self) -> dict[str, object]:
        cpu_s = await until_sigterm(self.sock, self.on_readable, self.start)
        return {
            **self.stats,
            "cores": len(self.cores),
            "views": sorted({len(c.view) for c in self.cores}),
            "agreed": sum(c.agreed for c in self.cores),
            "cpu_s": cpu_s,
        }


class ScriptedPeers:
    """``count`` peers that behave as an established, agreed cluster, without cores.

    Full cores cost O(N) per step and every core steps on every heartbeat: at
    N = 32 emulating 31 of them needs more than 2 cores (O(N^3) in all). These
    peers instead share one small state: a view of themselves plus every real
    node heard (after ``join_holddown``, until ``dead_after`` of silence), acks of
    each member's latest sequence, ``agreed`` once every real node advertises that
    view, and the newest quorum base anyone advertised (they start as an agreed
    cluster of their own at epoch 1). Each sends one real, sealed heartbeat per
    interval, all in one burst as the heartbeat wave has them (their smallest ID
    paces the cluster when it sorts before the real node's). They do not prompt,
    so joining takes an interval longer than with real peers; the steady state is
    what is measured.
    """

    def __init__(self, config: Path, count: int, first_address: str, prefix: str) -> None:
        self.cfg = load_config(config)
        self.codec = Codec(self.cfg.cluster, load_keyring(self.cfg.key_file))
        self.timers = self.cfg.core_config().timers
        self.params = digest_params(self.cfg.core_config().agreed_values())
        first = ipaddress.IPv4Address(first_address)
        incarnation = time.time_ns() // 1_000_000
        self.own = [Member(f"{prefix}{i:02d}", incarnation, 100, False) for i in range(count)]
        self.addresses = {m.node_id: str(first + i) for i, m in enumerate(self.own)}
        self.seqs = {m.node_id: 0 for m in self.own}
        self.real: dict[str, tuple[Heartbeat, float, float]] = {}  # id: (last, first, last heard)
        self.epoch = 1
        self.base = tuple(sorted(m.node_id for m in self.own))
        self.sock = heartbeat.heartbeat_socket(
            self.cfg, socket.if_nametoindex(self.cfg.interface), self.addresses[self.own[0].node_id]
        )
        self.reader = heartbeat.StampedReader(self.sock)
        self.next_sender = 0
        self.stats = {"received": 0, "sent": 0, "undecodable": 0}

    def on_readable(self) -> None:
        for data, _source, _arrived in self.reader.read(RECV_BATCH)[0]:
            self.stats["received"] += 1
            try:
                message = self.codec.open(data)
            except LbdError:
                self.stats["undecodable"] += 1
                continue
            if message.sender in self.seqs:
                continue
            if isinstance(message, Heartbeat):
                now = time.monotonic()
                known = self.real.get(message.sender)
                first = known[1] if known and known[0].incarnation == message.incarnation else now
                self.real[message.sender] = (message, first, now)
                self.epoch, self.base = max((self.epoch, self.base), (message.epoch, message.base))
            else:
                self.real.pop(message.sender, None)

    def view(self, now: float) -> tuple[Member, ...]:
        members = list(self.own)
        for node_id, (hb, first, last) in list(self.real.items()):
            if now - last >= self.timers.dead_after:
                del self.real[node_id]
            elif now - first >= self.timers.join_holddown:
                members.append(Member(node_id, hb.incarnation, hb.weight, hb.draining))
        return tuple(sorted(members, key=lambda m: m.node_id))

    def send_wave(self) -> None:
        """Every peer's heartbeat, pacer first, as the protocol's heartbeat wave sends
        them (the smallest ID paces; the others answer it at once)."""
        asyncio.get_running_loop().call_later(self.timers.interval, self.send_wave)
        for _ in self.own:
            self.send_next()

    def send_next(self) -> None:
        """The next emulated peer's heartbeat."""
        now = time.monotonic()
        sender = self.own[self.next_sender]
        self.next_sender = (self.next_sender + 1) % len(self.own)
        view = self.view(now)
        real_in_view = [self.real[m.node_id][0] for m in view if m.node_id in self.real]
        acks = tuple(
            0
            if m.node_id == sender.node_id
            else self.seqs[m.node_id]
            if m.node_id in self.seqs
            else self.real[m.node_id][0].seq
            for m in view
        )
        self.seqs[sender.node_id] += 1
        message = Heartbeat(
            sender=sender.node_id,
            incarnation=sender.incarnation,
            seq=self.seqs[sender.node_id],
            weight=sender.weight,
            draining=sender.draining,
            view=view,
            acks=acks,
            agreed=all(hb.view == view for hb in real_in_view),
            held=self.cfg.buckets // len(view),
            epoch=self.epoch,
            base=self.base,
            params=self.params,
        )
        self.stats["sent"] += send_from(
            self.sock, self.cfg, self.addresses[sender.node_id], self.codec.seal(message)
        )

    async def run(self) -> dict[str, object]:
        cpu_s = await until_sigterm(self.sock, self.on_readable, self.send_wave)
        return {
            **self.stats,
            "peers": len(self.own),
            "real_nodes": len(self.real),
            "epoch": self.epoch,
            "cpu_s": cpu_s,
        }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--first-address", required=True)
    parser.add_argument("--prefix", default="emu")
    parser.add_argument(
        "--scripted",
        action="store_true",
        help="scripted peers (see ScriptedPeers) instead of full cores",
    )
    args = parser.parse_args()
    kind = ScriptedPeers if args.scripted else Emulator
    emulator = kind(args.config, args.count, args.first_address, args.prefix)
    print(json.dumps(asyncio.run(emulator.run())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""systemd integration written by hand: sd_notify and the native journal protocol.

No python3-systemd dependency: both are datagrams on AF_UNIX sockets.

* ``Notifier`` sends ``READY=1``, ``STATUS=...``, ``STOPPING=1`` and ``WATCHDOG=1``
  to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). Without
  the variable every call is a no-op. ``watchdog_interval()`` is half of
  ``$WATCHDOG_USEC`` (when ``$WATCHDOG_PID`` is unset or ours).
* ``LogSink`` writes one log entry either as a native journal datagram (fields
  ``MESSAGE``, ``PRIORITY``, ``MESSAGE_ID``, ``SYSLOG_IDENTIFIER`` and our own upper-case
  fields such as ``NODE``, ``SLICES``, ``VIEW``) or as a plain text line on stderr.
  The journal is used when ``$LBD_JOURNAL_SOCKET`` names a socket (tests), or when
  ``$JOURNAL_STREAM`` says stderr is connected to the journal (systemd sets it for
  services) and /run/systemd/journal/socket exists. A foreground ``lbd run`` in a
  terminal thus logs text even on a systemd host.

Native encoding (systemd.journal-fields / "Native Journal Protocol"): ``NAME=value\\n``
for a value without newline; otherwise ``NAME\\n``, the value length as a 64-bit
little-endian integer, the raw value, ``\\n``.

``MESSAGE_IDS`` gives every event kind a fixed 128-bit ID, so ``journalctl -u lbd
MESSAGE_ID=<id>`` finds, say, every member death. The IDs never change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from lbd.protocol import events as ev

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "lbd"

# Priorities of syslog(3).
ERR, WARNING, NOTICE, INFO, DEBUG = 3, 4, 5, 6, 7

MESSAGE_IDS: dict[str, str] = {
    "MemberJoined": "5b0bdffb7f944429a6c9c92a7e326891",
    "MemberRestarted": "22aaeb4a58d244bebeca3fab3820849e",
    "MemberSuspected": "bc9ec1a9963f463f8c5e67520f036fd8",
    "MemberDead": "56b2ecb8c8e34ccda2a35a8ae06570e5",
    "MemberLeft": "70fce55313a14a90ae8304625d1c51b9",
    "ViewChanged": "f1d9f0b8549e4f199790db0129edac54",
    "ViewAgreed": "e4dc2aa08cd6482096e503c64b8fd640",
    "BucketsReleased": "ed7bd313f83c4345a24a8bdd960566ca",
    "BucketsGained": "a38c80cd85284f3bac2414cfa1ad8455",
    "QuorumLost": "9dd8f270183943b9b02b2276c75db765",
    "QuorumRegained": "8fc216bb527e471abc5b5a12a7b7e617",
    "LeaseLapsed": "9f5595016d054cf4b6104a790a404f02",
    "DuplicateNodeId": "92d71a160588456fbd5601d073389d39",
    "LeftCluster": "1a24d95377434f0296870a81a55fa016",
    "BaseChanged": "6c1f0e2b9a7d4c58b3e4f2a1d0c9b8a7",
    "StrangerHeard": "67a029c2e87c4112a731034c3c4335e3",
    "ParameterMismatch": "6f8ee292fe394f6c844d54fc455c7b42",
    "PersistFailed": "276c6db12cb5409da48e04bc26720aa7",
    "MemberRefused": "8e258e2d42454393a50d71796f7bb12c",
    # Daemon-level kinds (not core events).
    "Started": "54983ca1994249a688ec37ae6c57c75f",
    "Stopped": "f9cc1b427af240aab605be0b463e5c15",
    "Reloaded": "b141f50493fa4d27ac6700b3f4cde86c",
    "ReloadFailed": "318a6d6b8f5347898edc77cea6cdb8a4",
    "DatagramsDropped": "83d35c0516dd4550a695a8dda58fff5f",
    "KernelApplyFailed": "a36cc16b8ec44d0f89a1d32fb38012f0",
    "LeaseDeadlineUnchecked": "7210f81a4f0e49a0bb0c2be79f7619b0",
    "DrainChanged": "2084d21f0b104a6fb3b6d09702612176",
    "InternalError": "59ffb843a98148ea886cb658b8ea1c36",
    # Watched kernel state (daemon/kernelwatch.py): what changed under lbd, and after.
    "VipRemoved": "6ed3e1ce510b4150a7a2bb24c385382e",
    "LinkDown": "8a9d7cd9917a4ddca9fc0b2e9ba56018",
    "MacChanged": "27dd21e74b344b3194fc074a6317830c",
    "TablesChanged": "1d12bf90122f4bc68f4cbc2358450199",
    "SysctlChanged": "6e3c95e838fb4b3683f759dc690bd1fe",
    "ClusterMacLeft": "a679dd36246f4ffbb729209d64279838",
    "KernelStateRestored": "7852e9383aea482b84821feb4a0e95aa",
    # Service health (daemon/healthlink.py).
    "CheckFailed": "f9977e921e7a4d3fa5936d1f86891830",
    "CheckRecovered": "6ee85b3dbd994dff96f055beccde6394",
    "EveryNodeUnhealthy": "baf572615f494c65a60a9ae73a56b2ef",
    "WeightChanged": "6ffb16fdb6ce4f1ca5b43d0d1a9ea29f",
    "KernelRestoreFailed": "827e7df3e6ec43f5a73fcc822ca2dbdd",
    "MetricsUnavailable": "1af957746e3c490c815e3bc732db4d08",
}

EVENT_PRIORITY: dict[type, int] = {
    ev.MemberDead: WARNING,
    ev.MemberSuspected: NOTICE,
    ev.QuorumLost: WARNING,
    ev.LeaseLapsed: ERR,
    ev.DuplicateNodeId: ERR,
    ev.StrangerHeard: ERR,
    ev.ParameterMismatch: ERR,
    ev.MemberRefused: ERR,
    ev.ViewChanged: NOTICE,
    ev.ViewAgreed: NOTICE,
}


def describe(event: ev.Event) -> tuple[str, dict[str, str]]:
    """A human sentence and the structured fields (besides NODE/SLICES/VIEW) of an event."""
    match event:
        case ev.MemberJoined(node_id, incarnation) | ev.MemberRestarted(node_id, incarnation):
            verb = "joined" if isinstance(event, ev.MemberJoined) else "restarted"
            return (
                f"member {node_id} {verb} (incarnation {incarnation})",
                {"PEER": node_id, "INCARNATION": str(incarnation)},
            )
        case ev.MemberSuspected(node_id, silent) | ev.MemberDead(node_id, silent):
            verb = "suspected" if isinstance(event, ev.MemberSuspected) else "declared dead"
            return (
                f"member {node_id} {verb} after {silent * 1000:.0f} ms",
                {"PEER": node_id, "SILENT_MS": f"{silent * 1000:.0f}"},
            )
        case ev.MemberLeft(node_id):
            return f"member {node_id} left the cluster", {"PEER": node_id}
        case ev.ViewChanged(members, digest):
            return (
                f"view {digest} adopted: {', '.join(members)}",
                {"MEMBERS": " ".join(members), "NEW_VIEW": digest},
            )
        case ev.ViewAgreed(members, digest, owned):
            return (
                f"view {digest} agreed by all {len(members)} members; own {owned} slices",
                {"MEMBERS": " ".join(members), "NEW_VIEW": digest},
            )
        case ev.BucketsReleased(count, owned):
            return f"released {count} slices, holding {owned}", {"COUNT": str(count)}
        case ev.BucketsGained(count, owned):
            return f"gained {count} slices, holding {owned}", {"COUNT": str(count)}
        case ev.QuorumLost(heard, of):
            return (
                f"quorum lost: hear {heard} of {of}; lease will lapse",
                {"HEARD": str(heard), "OF": str(of)},
            )
        case ev.QuorumRegained(heard, of):
            return f"quorum regained: hear {heard} of {of}", {"HEARD": str(heard), "OF": str(of)}
        case ev.LeaseLapsed(dropped):
            return (f"lease lapsed: dropped all {dropped} slices", {"COUNT": str(dropped)})
        case ev.DuplicateNodeId(node_id, incarnation, "", peer, ours):
            return (
                f"node ID {node_id} is also used by another process (peer {peer} lists it "
                f"with incarnation {incarnation}; ours {ours}): serving nothing while it "
                "speaks; give each node its own node_id (cloned /etc/machine-id?)",
                {"PEER": node_id, "INCARNATION": str(incarnation), "OTHER_ADDRESS": peer},
            )
        case ev.DuplicateNodeId(node_id, incarnation, address, "", ours):
            return (
                f"node ID {node_id} is also used by the process at {address} "
                f"(incarnation {incarnation}; ours {ours}): serving nothing while both "
                "speak; give each node its own node_id (cloned /etc/machine-id?)",
                {"PEER": node_id, "INCARNATION": str(incarnation), "OTHER_ADDRESS": address},
            )
        case ev.DuplicateNodeId(node_id, incarnation, address, also_at, ours):
            return (
                f"node ID {node_id} is used by two processes: at {also_at} (incarnation "
                f"{ours}) and at {address} (incarnation {incarnation}); fix node_id",
                {"PEER": node_id, "INCARNATION": str(incarnation), "OTHER_ADDRESS": address},
            )
        case ev.StrangerHeard(address, reason):
            return (
                f"hearing datagrams from {address} that fail {reason}",
                {"OTHER_ADDRESS": address},
            )
        case ev.ParameterMismatch(node_id, address, ()):
            return (
                f"node {node_id} at {address} now agrees on every parameter",
                {"PEER": node_id, "OTHER_ADDRESS": address},
            )
        case ev.ParameterMismatch(node_id, address, fields):
            return (
                f"node {node_id} at {address} disagrees on {', '.join(fields)}: not "
                "admitted (every node must have the same value; fix one config)",
                {"PEER": node_id, "OTHER_ADDRESS": address, "FIELDS": " ".join(fields)},
            )
        case ev.MemberRefused(node_id, limit):
            return (
                f"node {node_id} not admitted: the view holds {limit} members, the most allowed",
                {"PEER": node_id},
            )
        case ev.LeftCluster(node_id):
            return f"node {node_id} left the cluster gracefully", {}
        case ev.BaseChanged(base, epoch):
            return (
                f"quorum base {epoch}: {', '.join(base) or '(none)'}",
                {"BASE": " ".join(base), "EPOCH": str(epoch)},
            )
    return repr(event), {}


def named(event: ev.Event, name_of: Callable[[str], str]) -> ev.Event:
    """``event`` with node names instead of wire IDs, for people (logs, journal)."""
    changes: dict[str, object] = {}
    for field in ("node_id", "members", "base", "previous"):
        value = getattr(event, field, None)
        if isinstance(value, str):
            changes[field] = name_of(value)
        elif isinstance(value, tuple):
            changes[field] = tuple(name_of(v) for v in value)
    if not changes:
        return event
    replaced: ev.Event = dataclasses.replace(event, **changes)  # type: ignore[arg-type]
    return replaced


def describe_loop_error(context: Mapping[str, object]) -> tuple[str, str]:
    """An asyncio exception-handler ``context`` as one log line (what, and the
    innermost frame that raised it: what a bug report needs) and the detail for
    the journal's TRACEBACK field."""
    import traceback  # noqa: PLC0415 - only ever needed on the way out

    exc = context.get("exception")
    if isinstance(exc, BaseException):
        what = f"{type(exc).__name__}: {exc}"
        frames = traceback.extract_tb(exc.__traceback__)
        where = (
            f"{frames[-1].name} at {Path(frames[-1].filename).name}:{frames[-1].lineno}"
            if frames
            else "the event loop"
        )
        detail = "".join(traceback.format_exception(exc))
    else:
        what, where, detail = str(context.get("message", "unknown error")), "asyncio", ""
    origin = str(context.get("message", ""))
    source = context.get("handle") or context.get("future")
    if source is not None:
        origin += f" ({source!r})"
    line = " ".join(f"internal error, stopping: {what} (in {where})".split())
    return line, f"{origin}\n{detail}".strip()


def encode_journal(fields: Mapping[str, str | bytes]) -> bytes:
    """One native-protocol datagram for ``fields`` (names upper-case, validated)."""
    out = bytearray()
    for name, value in fields.items():
        if (
            not name
            or not name.replace("_", "A").isalnum()
            or not name.isupper()
            or name[0] == "_"
            or name[0].isdigit()
        ):
            raise ValueError(f"bad journal field name {name!r}")
        data = value.encode() if isinstance(value, str) else value
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


def decode_journal(datagram: bytes) -> dict[str, bytes]:
    """Inverse of encode_journal (for tests and debugging)."""
    fields: dict[str, bytes] = {}
    pos = 0
    while pos < len(datagram):
        end = datagram.index(b"\n", pos)
        line = datagram[pos:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            pos = end + 1
        else:
            name = line
            (size,) = struct.unpack_from("<Q", datagram, end + 1)
            start = end + 9
            value = datagram[start : start + size]
            pos = start + size + 1
        fields[name.decode()] = value
    return fields


def _address(path: str) -> str | bytes:
    # "@name" is the abstract namespace (sd_notify accepts both forms).
    return b"\0" + path[1:].encode() if path.startswith("@") else path


class Notifier:
    """sd_notify(3) over $NOTIFY_SOCKET; silent no-op when not under systemd."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.path = env.get("NOTIFY_SOCKET") or None
        self._watchdog_usec = 0
        pid = env.get("WATCHDOG_PID")
        if env.get("WATCHDOG_USEC", "").isdigit() and (pid is None or pid == str(os.getpid())):
            self._watchdog_usec = int(env["WATCHDOG_USEC"])
        self._sock: socket.socket | None = None
        self._last_status: str | None = None
        if self.path:
            # Non-blocking: a full receive queue drops a message instead of
            # stalling the event loop that keeps the heartbeats going.
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the timeout), or None."""
        return self._watchdog_usec / 2e6 if self._watchdog_usec else None

    def send(self, text: str) -> bool:
        if self._sock is None or self.path is None:
            return False
        try:
            self._sock.sendto(text.encode(), _address(self.path))
        except OSError:
            return False  # systemd gone or socket full: never fatal for the daemon
        return True

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self._last_status = status
        self.send(f"STOPPING=1\nSTATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def journal_wanted(env: Mapping[str, str]) -> str | None:
    """The journal socket to log to, or None for plain stderr (see module doc)."""
    explicit = env.get("LBD_JOURNAL_SOCKET")
    if explicit:
        return explicit
    stream = env.get("JOURNAL_STREAM", "")
    if stream and Path(JOURNAL_SOCKET).exists():
        with contextlib.suppress(OSError, ValueError):
            dev, ino = (int(x) for x in stream.split(":"))
            st = os.fstat(sys.stderr.fileno())
            if (st.st_dev, st.st_ino) == (dev, ino):
                return JOURNAL_SOCKET
    return None


class LogSink:
    """Where log entries go: the native journal or stderr text lines."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.journal_path = journal_wanted(env)
        self._sock: socket.socket | None = None
        if self.journal_path:
            # Non-blocking, as for sd_notify: a stuck journal must not stall the loop
            # (an entry that cannot be queued goes to stderr instead).
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
        self.context: dict[str, str] = {}
        """Fields added to every entry (NODE=...)."""

    def emit(
        self,
        priority: int,
        message: str,
        kind: str | None = None,
        fields: Mapping[str, str] | None = None,
    ) -> None:
        extra = {**self.context, **(fields or {})}
        if self._sock is not None and self.journal_path is not None:
            entry: dict[str, str | bytes] = {
                "MESSAGE": message,
                "PRIORITY": str(priority),
                "SYSLOG_IDENTIFIER": IDENTIFIER,
            }
            if kind is not None:
                entry["LBD_EVENT"] = kind
                if kind in MESSAGE_IDS:
                    entry["MESSAGE_ID"] = MESSAGE_IDS[kind]
            entry.update(extra)
            try:
                self._sock.sendto(encode_journal(entry), self.journal_path)
                return
            except (OSError, ValueError):
                pass  # journal unavailable or entry too large: fall back to stderr
        level = {ERR: "error", WARNING: "warning", NOTICE: "notice", INFO: "info"}.get(
            priority, "debug"
        )
        with contextlib.suppress(OSError):
            sys.stderr.write(f"lbd: {level}: {message}\n")
            sys.stderr.flush()

    def event(self, event: ev.Event, fields: Mapping[str, str]) -> None:
        message, extra = describe(event)
        priority = EVENT_PRIORITY.get(type(event), INFO)
        self.emit(priority, message, type(event).__name__, {**fields, **extra})

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class SinkHandler(logging.Handler):
    """Routes Python logging (netcfg's warnings, ours) into the same LogSink."""

    def __init__(self, sink: LogSink) -> None:
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        priority = (
            ERR
            if record.levelno >= logging.ERROR
            else WARNING
            if record.levelno >= logging.WARNING
            else INFO
            if record.levelno >= logging.INFO
            else DEBUG
        )
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        kind = getattr(record, "kind", None)
        fields = getattr(record, "fields", None)
        self.sink.emit(priority, message, kind, fields)

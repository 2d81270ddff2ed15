"""The daemon's state directory: the instance lock, the incarnation, the quorum base.

Everything here outlives a run (``state_dir``, README "State files"): the lock
keeps a second daemon off the host, the incarnation grows across restarts, and
the quorum base (with the parameters and credentials it was agreed under) is
stored atomically and durably before anything that advertises it (the driver
orders that, ``protocol/driver.py``).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from lbd.daemon.config import ConfigFileError
from lbd.netcfg.statefile import RecordError, load_record, save_record
from lbd.protocol.errors import LbdError
from lbd.protocol.messages import WIRE_ID_PATTERN, wire_id


class StartupError(LbdError):
    """The daemon cannot start (lock held, kernel refused the rules, ...)."""


def acquire_lock(state_dir: Path) -> int:
    """flock the instance lock file; returns its fd (kept open for the process' life)."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    path = state_dir / "lbd.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StartupError(
            f"another lbd is already running here (pid {holder} holds {path})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def next_incarnation(state_dir: Path) -> int:
    """A number larger than any earlier run's: max(stored + 1, milliseconds since epoch)."""
    path = state_dir / "incarnation"
    try:
        stored = int(path.read_text().strip())
    except (OSError, ValueError):
        stored = 0
    value = max(stored + 1, time.time_ns() // 1_000_000)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, path)
    return value


def _node_ids(value: object) -> tuple[str, ...] | None:
    """The wire IDs of a stored base. Records written before wire IDs hold node names:
    they are mapped to the names' wire IDs (sorted again, as bases are)."""
    if isinstance(value, list) and all(isinstance(member, str) for member in value):
        return tuple(sorted({m if WIRE_ID_PATTERN.fullmatch(m) else wire_id(m) for m in value}))
    return None


def load_quorum_base(state_dir: Path) -> tuple[tuple[str, ...], int, tuple[str, ...] | None]:
    """(base, epoch, previous base while the change is unconfirmed) the previous run
    persisted, or none (a first start)."""
    path = state_dir / "quorum-base.json"
    try:
        saved = load_record(path, 1)
    except RecordError as exc:
        # Never a silent first start: this node may belong to a live cluster whose
        # base it no longer knows. The operator decides (see README "State files").
        raise ConfigFileError(
            path,
            None,
            f"corrupt quorum base ({exc}); if this node's "
            "cluster state is lost, delete the file: the node then starts "
            "as a new node and joins through bootstrap",
        ) from None
    if saved is not None:
        base, epoch = _node_ids(saved.get("base")), saved.get("epoch")
        previous = saved.get("previous")
        if (
            base is not None
            and isinstance(epoch, int)
            and (previous is None or _node_ids(previous) is not None)
        ):
            return base, epoch, None if previous is None else _node_ids(previous)
        raise ConfigFileError(
            path,
            None,
            "corrupt quorum base (fields of the wrong type); "
            "if this node's cluster state is lost, delete the file: the "
            "node then starts as a new node and joins through bootstrap",
        )
    return (), 0, None


def save_quorum_base(
    state_dir: Path,
    base: tuple[str, ...],
    epoch: int,
    previous: tuple[str, ...] | None,
    *,
    params: bytes | None = None,
    credentials: bytes | None = None,
) -> None:
    """Atomic and durable: a restart must never see half a base, nor an older one."""
    save_record(
        state_dir / "quorum-base.json",
        {
            "version": 1,
            "base": list(base),
            "epoch": epoch,
            "previous": None if previous is None else list(previous),
            "params": None if params is None else params.hex(),
            "credentials": None if credentials is None else credentials.hex(),
        },
    )


def load_base_agreement(state_dir: Path) -> tuple[bytes | None, bytes | None]:
    """The parameter digests and the credentials digest the stored base was agreed
    under (None: not recorded). Call after ``load_quorum_base`` (it refuses a corrupt
    record)."""
    try:
        saved = load_record(state_dir / "quorum-base.json", 1) or {}
    except RecordError:
        return None, None
    out: list[bytes | None] = []
    for key in ("params", "credentials"):
        text = saved.get(key)
        try:
            out.append(bytes.fromhex(text) if isinstance(text, str) else None)
        except ValueError:
            out.append(None)
    return out[0], out[1]

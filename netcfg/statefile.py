"""Small JSON records in the state dir, written atomically and durably (tmp + fsync +
rename + fsync of the directory).

The link and MAC-mode setup record what they changed before changing it, so a
restarted daemon restores the original values; a half-written record would
lose exactly that, hence the atomic write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lbd.protocol.errors import LbdError


class RecordError(LbdError):
    """A record exists but cannot be read or is of another version."""


def load_record(path: Path, version: int) -> dict[str, Any] | None:
    """The record at ``path``, None if there is none; RecordError if unusable."""
    if not path.exists():
        return None
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RecordError(f"unreadable {path}: {exc}") from None
    if not isinstance(loaded, dict) or loaded.get("version") != version:
        raise RecordError(f"{path} is not a v{version} record")
    return loaded


def save_record(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` atomically; key order is kept (callers may rely on it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as fh:
        json.dump(record, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    # The rename is durable only once the directory is: without this, a power loss
    # right after can bring back the old record (or none) while peers acted on ours.
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

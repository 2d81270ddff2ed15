"""A Unix datagram socket that a thread reads as fast as datagrams come.

The daemons send their sd_notify messages and native journal entries as
datagrams (``NOTIFY_SOCKET``, ``LBD_JOURNAL_SOCKET``); a socket's queue holds
only about ten, so a test or bench that read it only now and then would lose
some. Each datagram is taken on arrival, with its CLOCK_MONOTONIC time (the
clock of the bed's faults and client load).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path


class DatagramSink:
    """Binds ``path`` and keeps every datagram sent to it until ``close``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)  # how soon the thread sees close()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def take(self, arrived: float, data: bytes) -> None:
        """Keep one datagram; a subclass may decode it instead (on the reading thread)."""
        self.received.append(data)

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.take(time.monotonic(), data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()

"""Replay protection: each sender's datagrams must come newer than the last one taken.

A sealed datagram is self-contained, so the codec (``wire.py``) cannot tell a
replay from the original: the caller passes every opened message through a
ReplayGuard.
"""

from __future__ import annotations

from collections import OrderedDict

from lbd.protocol.errors import ConfigError, ReplayError


class ReplayGuard:
    """Rejects datagrams older than the newest one accepted from each sender.

    Call ``check`` only with messages that ``Codec.open`` returned: it records
    what it accepts, so unauthenticated input could poison it. A sender's
    datagrams are ordered by (incarnation, seq); a higher incarnation (a
    restarted node) resets its sequence. The guard is only as good as its
    memory: a sender that was forgotten or evicted (the least recently updated
    goes once ``max_senders`` are tracked) can be replayed once more.
    """

    __slots__ = ("_latest", "_max_senders")

    def __init__(self, max_senders: int = 1024) -> None:
        if type(max_senders) is not int or max_senders < 1:
            raise ConfigError("max_senders must be a positive int")
        self._max_senders = max_senders
        # sender -> (incarnation, seq) last accepted; order = least recently updated first.
        self._latest: OrderedDict[str, tuple[int, int]] = OrderedDict()

    def check(self, sender: str, incarnation: int, seq: int) -> None:
        """Record (incarnation, seq) for sender, or raise ReplayError if not newer."""
        latest = self._latest.get(sender)
        if latest is not None:
            latest_incarnation, latest_seq = latest
            if incarnation < latest_incarnation:
                raise ReplayError(f"stale incarnation {incarnation} from {sender}")
            if incarnation == latest_incarnation and seq <= latest_seq:
                raise ReplayError(f"replayed seq {seq} from {sender}")
            self._latest.move_to_end(sender)
        elif len(self._latest) >= self._max_senders:
            self._latest.popitem(last=False)
        self._latest[sender] = (incarnation, seq)

    def forget(self, sender: str) -> None:
        """Drop what is known of sender (a no-op for an unknown one).

        Its old datagrams are then accepted once more, so forget a sender only
        when it is gone for good (not merely because it sent a Leave).
        """
        self._latest.pop(sender, None)

    def __len__(self) -> int:
        return len(self._latest)

    def __contains__(self, sender: object) -> bool:
        return sender in self._latest

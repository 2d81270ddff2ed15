"""The cluster key, and the second key accepted while a rotation is under way.

Every datagram names the key that sealed it by a 4-byte fingerprint (``wire.py``
puts it in the header), so a receiver holding two keys tries only the right one.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from lbd.protocol.errors import ConfigError

KEY_LEN = 32
FINGERPRINT_LEN = 4
_KEY_ID_DOMAIN = b"lbd-key-id"


def key_fingerprint(key: bytes) -> bytes:
    """The 4-byte ID that tells receivers which key sealed a datagram."""
    return hashlib.sha256(_KEY_ID_DOMAIN + key).digest()[:FINGERPRINT_LEN]


def _check_key(key: object, what: str) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_LEN:
        raise ConfigError(f"{what} key must be {KEY_LEN} bytes")
    return key


class Keyring:
    """The cluster key, plus a second accepted key while a rotation is under way.

    Datagrams are always sealed with ``current``; ones sealed with either key are
    opened. A rotation without a gap has three steps, each taken on every node
    before the next: ``Keyring(old, new)`` (accept the new key), ``Keyring(new,
    old)`` (seal with it), ``Keyring(new)``. Sealing with a key that a peer does
    not accept yet makes that peer declare us dead.
    """

    __slots__ = ("_aead_by_fingerprint", "_current", "_current_fingerprint", "_previous")

    def __init__(self, current: bytes, previous: bytes | None = None) -> None:
        self._current = _check_key(current, "current")
        self._previous = None if previous is None else _check_key(previous, "previous")
        self._current_fingerprint = key_fingerprint(current)
        self._aead_by_fingerprint: dict[bytes, ChaCha20Poly1305] = {}
        if self._previous is not None and self._previous != current:
            previous_fingerprint = key_fingerprint(self._previous)
            if previous_fingerprint == self._current_fingerprint:
                # 1 in 2**32: receivers could not tell the keys apart.
                raise ConfigError("current and previous keys share a fingerprint; pick a new key")
            self._aead_by_fingerprint[previous_fingerprint] = ChaCha20Poly1305(self._previous)
        self._aead_by_fingerprint[self._current_fingerprint] = ChaCha20Poly1305(current)

    @property
    def current(self) -> bytes:
        return self._current

    @property
    def previous(self) -> bytes | None:
        return self._previous

    @property
    def current_fingerprint(self) -> bytes:
        return self._current_fingerprint

    @property
    def previous_fingerprint(self) -> bytes | None:
        """The other accepted key's fingerprint (None: only one key)."""
        others = [fp for fp in self._aead_by_fingerprint if fp != self._current_fingerprint]
        return others[0] if others else None

    @property
    def fingerprints(self) -> list[bytes]:
        """Every accepted key's fingerprint, the sealing one first."""
        return sorted(self._aead_by_fingerprint, key=lambda fp: fp != self._current_fingerprint)

    def rotated(self, new_current: bytes) -> Keyring:
        """A keyring sealing with new_current and still opening the old current."""
        return Keyring(new_current, self._current)

    def sealing_aead(self) -> ChaCha20Poly1305:
        return self._aead_by_fingerprint[self._current_fingerprint]

    def opening_aead(self, fingerprint: bytes) -> ChaCha20Poly1305 | None:
        return self._aead_by_fingerprint.get(fingerprint)

    def __repr__(self) -> str:
        # Never print key material, only the fingerprints.
        held = ", ".join(fp.hex() for fp in self._aead_by_fingerprint)
        return f"Keyring(current={self._current_fingerprint.hex()}, opens=[{held}])"

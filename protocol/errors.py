"""The one exception family of lbd: every foreseeable failure is an LbdError."""


class LbdError(Exception):
    """Base of every error lbd raises on purpose."""


class DecodeError(LbdError):
    """A datagram is malformed: wrong size, version, type or field values."""


class AuthError(DecodeError):
    """A datagram failed authentication: wrong key, wrong cluster, tampered."""


class ReplayError(DecodeError):
    """A datagram is authentic but old: stale incarnation or repeated sequence."""


class ConfigError(LbdError):
    """A configuration value is missing, of the wrong type or out of range."""

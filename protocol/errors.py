"""The one exception family of lbd: every foreseeable failure is an LbdError."""


class LbdError(Exception):
    """Base of every error lbd raises on purpose."""


class DecodeError(LbdError):
    """A datagram is malformed: wrong size, version, type or field values."""


class AuthError(DecodeError):
    """A datagram failed authentication: wrong key, wrong cluster, tampered."""


class VersionError(DecodeError):
    """A datagram of lbd, but of another wire version: a node running another release."""


class ReplayError(DecodeError):
    """A datagram is authentic but old: stale incarnation or repeated sequence."""


class ConfigError(LbdError):
    """A configuration value is missing, of the wrong type or out of range.

    ``key`` (optional) names the setting at fault, e.g. "timers.lease"; then str()
    is the key followed by ``problem``, and callers that report the key apart
    (daemon/config.py) use the two attributes instead of parsing the text.
    """

    def __init__(self, problem: str, *, key: str | None = None) -> None:
        super().__init__(f"{key} {problem}" if key else problem)
        self.key = key
        self.problem = problem

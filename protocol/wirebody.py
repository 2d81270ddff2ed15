"""A heartbeat's or leave's body: the msgpack array of its fields <-> the message.

The body is ``[2, sender, incarnation, seq]`` for a Leave, ``[1, sender,
incarnation, seq, weight, draining, view, acks, agreed, held, epoch, base,
params, name, health]`` for a Heartbeat. ``sender`` and ``name`` are str, the flags
bools, the numbers ints; ``view``, ``acks`` and ``base`` are bins laid out as
``wirebins.py`` says, ``params`` the per-field digests of the parameters every
node must agree on (``params.py``). ``name`` is the sender's node name, or
empty; when given, ``sender`` must be ``wire_id(name)``. ``health`` is 0..7, the
``messages.HEALTH_*`` flags.

Limits: incarnations (the sender's, every view member's, a Leave's) are
0..2**48-1 (``MAX_INCARNATION``); seq (1..) and acks are 0..2**40-1
(``MAX_SEQ``); epoch 0..2**63-1; held 0..65536.

``message_from_body`` validates strictly: whatever it is given, it returns a
valid Heartbeat/Leave or raises DecodeError. ``body_of`` is its inverse for
valid messages (the envelope, ``wire.py``, checks one against the other).
"""

from __future__ import annotations

from lbd.protocol.errors import DecodeError
from lbd.protocol.messages import (
    HEALTH_MAX,
    MAX_NODES,
    MAX_WEIGHT,
    Heartbeat,
    Leave,
    Message,
    MessageType,
    validate_node_id,
    wire_id,
)
from lbd.protocol.params import valid_params_blob
from lbd.protocol.wirebins import (
    MAX_INCARNATION,
    MAX_SEQ,
    pack_acks,
    pack_base,
    pack_view,
    remember,
    unpack_acks,
    unpack_base,
    unpack_view,
)

MAX_COUNTER = 2**63 - 1  # epoch: fits a signed 64-bit int everywhere
MAX_HELD = 65536  # buckets a node can hold at most (the largest bucket count)
HEARTBEAT_FIELDS = 15
_LEAVE_FIELDS = 4

# Valid names and their wire IDs: every sender's, so as many as a cluster has nodes.
_NAMED: dict[str, str] = {}


def body_of(message: Message) -> tuple[object, ...]:
    """The body array of message; ValueError if a binary field cannot hold it."""
    if isinstance(message, Heartbeat):
        view = pack_view(message.view)
        return (
            MessageType.HEARTBEAT.value,
            message.sender,
            message.incarnation,
            message.seq,
            message.weight,
            message.draining,
            view,
            pack_acks(message.acks),
            message.agreed,
            message.held,
            message.epoch,
            pack_base(message.base, message.view),
            message.params,
            message.name,
            message.health,
        )
    if isinstance(message, Leave):
        return (MessageType.LEAVE.value, message.sender, message.incarnation, message.seq)
    raise ValueError(f"cannot seal {type(message).__name__}: not a Heartbeat or Leave")


# --- decoding and validation ------------------------------------------------
# Exact type checks (``type(x) is int``) on purpose: bool is an int subclass and
# must not pass as a number, nor a number as a bool.


def _bounded(value: object, what: str, maximum: int, minimum: int = 0) -> int:
    if type(value) is not int or not minimum <= value <= maximum:
        raise DecodeError(f"{what} must be an int in {minimum}..{maximum}")
    return value


def _flag(value: object, what: str) -> bool:
    if type(value) is not bool:
        raise DecodeError(f"{what} must be a bool")
    return value


def _node_id(value: object, what: str) -> str:
    if type(value) is not str:
        # Checked here so that the error never carries a big repr of junk.
        raise DecodeError(f"{what} must be a string")
    return validate_node_id(value)


def _bin(value: object, what: str) -> bytes:
    if type(value) is not bytes:
        raise DecodeError(f"{what} must be a bin")
    return value


def message_from_body(body: object) -> Message:
    """The valid Heartbeat or Leave that body (an unpacked msgpack value) spells."""
    if type(body) is not tuple or not body:
        raise DecodeError("body must be a non-empty array")
    kind = body[0]
    if type(kind) is int and kind == MessageType.HEARTBEAT:
        return _heartbeat(body)
    if type(kind) is int and kind == MessageType.LEAVE:
        return _leave(body)
    raise DecodeError("unknown message type")


def _leave(body: tuple[object, ...]) -> Leave:
    if len(body) != _LEAVE_FIELDS:
        raise DecodeError(f"leave must have {_LEAVE_FIELDS} fields")
    return Leave(
        sender=_node_id(body[1], "sender"),
        incarnation=_bounded(body[2], "incarnation", MAX_INCARNATION),
        seq=_bounded(body[3], "seq", MAX_SEQ, minimum=1),
    )


def _heartbeat(body: tuple[object, ...]) -> Heartbeat:
    if len(body) != HEARTBEAT_FIELDS:
        raise DecodeError(f"heartbeat must have {HEARTBEAT_FIELDS} fields")
    sender = _node_id(body[1], "sender")
    name = _name(body[13], sender)
    packed_view = _bin(body[6], "view")
    view, ids = unpack_view(packed_view)
    if sender not in ids:
        raise DecodeError("view must contain the sender")
    return Heartbeat(
        sender,
        _bounded(body[2], "incarnation", MAX_INCARNATION),
        _bounded(body[3], "seq", MAX_SEQ, minimum=1),
        _bounded(body[4], "weight", MAX_WEIGHT),
        _flag(body[5], "draining"),
        view,
        unpack_acks(_bin(body[7], "acks"), len(view)),
        _flag(body[8], "agreed"),
        _bounded(body[9], "held", MAX_HELD),
        _bounded(body[10], "epoch", MAX_COUNTER),
        unpack_base(_bin(body[11], "base"), packed_view, view),
        _params(body[12]),
        name,
        _bounded(body[14], "health", HEALTH_MAX),
    )


def _name(value: object, sender: str) -> str:
    if type(value) is not str:
        raise DecodeError("name must be a string")
    if value:
        known = _NAMED.get(value)
        if known is None:
            known = remember(_NAMED, validate_node_id(value), wire_id(value), MAX_NODES)
        if known != sender:
            raise DecodeError("sender must be the wire id of the name")
    return value


def _params(value: object) -> bytes:
    if type(value) is not bytes or not valid_params_blob(value):
        raise DecodeError("params must be a bin of whole parameter digests")
    return value

"""
The sevpn wire protocol, version 1: bytes in, messages out, and back.

Pure code: no reactor, no I/O.  See docs/protocol.md for the specification;
this module is its only implementation.

Every message on the TLS stream is::

    length:u32  type:u8  body[length]

``length`` counts the body only and is bounded by L{MAX_BODY}; anything
larger, an unknown type, or a body of the wrong shape is a L{ProtocolError}
that ends the connection.

Handshake messages (HELLO, WELCOME, REFUSED, GOODBYE) carry a UTF-8 JSON
object, so later versions add keys without breaking older peers (unknown
keys are ignored).  Each is a small class here (L{Hello}, L{Welcome},
L{Refused}, L{Goodbye}) that validates itself when decoded, so no other
module reads a handshake as a dict.  The data-path messages are fixed
binary layouts:

    DATA    first_seq:u64 ack:u64 then frames, each  len:u32 frame[len]
    ACK     ack:u64
    NULL    ack:u64 padding     (the keepalive; random padding, ~50 bytes)

Sequence numbers count data frames per direction from 1; ``ack`` is the
highest sequence number the sender has received and delivered.  They are
what session resumption uses to resend exactly what the peer lacks.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import FrozenSet, List, Optional, Sequence, Tuple, Union

MAGIC = b"SEVPN"
VERSION = 1

HELLO = 1
WELCOME = 2
REFUSED = 3
DATA = 4
ACK = 5
NULL = 6
GOODBYE = 7
#: Only inside a UDP channel's datagrams (see L{Probe}), never on the TLS stream.
PROBE = 8

#: The handshake messages: after one, L{Decoder.feed} stops (see there).
HANDSHAKE = frozenset({HELLO, WELCOME, REFUSED, GOODBYE})

NAMES = {
    HELLO: "HELLO",
    WELCOME: "WELCOME",
    REFUSED: "REFUSED",
    DATA: "DATA",
    ACK: "ACK",
    NULL: "NULL",
    GOODBYE: "GOODBYE",
    PROBE: "PROBE",
}

#: Handshake feature: data frames carry a 10-byte virtio_net_hdr and may be
#: 64 KiB kernel super-frames (see L{sevpn.offload}).
FEATURE_OFFLOAD = "vnet-hdr"
#: Handshake feature: the peer is another hub's cascade (a whole LAN behind
#: one session), allowed only for users the hub's operator marked so.
FEATURE_CASCADE = "cascade"
#: Handshake feature: a UDP channel beside the link carries frames while it
#: works (the welcome says where; see L{sevpn.channel}).
FEATURE_UDP = "udp"


#: The largest body accepted.  A DATA message batches frames up to
#: L{MAX_BATCH} bytes; a single frame may be a 64 KiB offload super-frame.
MAX_BODY = 1 << 20
#: The most frame bytes a sender puts into one DATA message.  A message is
#: forwarded only once whole, so this is also the store-and-forward delay
#: of every hop under load: two super-frames.
MAX_BATCH = 128 * 1024
#: The largest single Ethernet frame (a 64 KiB GSO super-frame, its
#: Ethernet header and a virtio-net header fit).
MAX_FRAME = 65536 + 64
#: The smallest frame carried: an Ethernet header.
MIN_FRAME = 14
#: The largest JSON handshake body.
MAX_JSON = 16 * 1024
#: The largest message accepted before the handshake is over: a hello.
MAX_HELLO = MAX_JSON + 6

_HEADER = struct.Struct("!IB")
_U64 = struct.Struct("!Q")
_DATA = struct.Struct("!QQ")
_LEN = struct.Struct("!I")

HEADER_SIZE = _HEADER.size
Buffer = Union[bytes, bytearray, memoryview]


class ProtocolError(Exception):
    """
    The peer sent something that is not sevpn protocol version 1.  The
    message is a sentence for the log; the connection must end.
    """


def encode(kind: int, body: Buffer = b"") -> bytes:
    """Frame one message."""
    return _HEADER.pack(len(body), kind) + body


# -- names -------------------------------------------------------------------

#: Virtual hub, user and account names: letters, digits, '.', '_' and '-',
#: up to 64 characters, starting with a letter or digit.  Matched whole
#: (C{\Z}: a trailing newline is not part of a name).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


def valid_name(name: object) -> bool:
    """Whether C{name} is a usable virtual hub, user or account name."""
    return isinstance(name, str) and NAME_PATTERN.match(name) is not None


# -- handshake messages --------------------------------------------------------

#: The largest password a hello may carry (characters).
MAX_PASSWORD = 1024
#: The most features a handshake may list.
MAX_FEATURES = 32
#: Longest free text (a refusal's or goodbye's reason) kept from the peer.
MAX_REASON = 200
#: The largest sequence number: frame numbers are u64.
MAX_SEQ = (1 << 64) - 1


class Refusal:
    """
    Why a hub turns a card away: the C{code} of a REFUSED message.

    A card treats a refusal as final (it stops and says why) unless the
    code is in L{RETRY_LATER}: then it is an outage, retried with backoff.
    Codes a card does not know are final refusals, shown with the hub's
    message.
    """

    #: Unknown user, wrong password, disabled user, unknown virtual hub,
    #: revoked certificate: one answer for all, so a guesser learns nothing.
    AUTH_FAILED = "auth-failed"
    #: The hello is incomplete or malformed.
    BAD_HELLO = "bad-hello"
    #: The hub has reached its session limit.
    HUB_FULL = "hub-full"
    #: The user has reached their session limit.
    TOO_MANY_SESSIONS = "too-many-sessions"
    #: Too many failed logins from this address for this user.
    THROTTLED = "throttled"
    #: The hello asks for a cascade, and the user is not a cascade user.
    CASCADE_NOT_ALLOWED = "cascade-not-allowed"

    RETRY_LATER = frozenset({HUB_FULL, TOO_MANY_SESSIONS, THROTTLED})

    MESSAGES = {
        AUTH_FAILED: "the user name or password is wrong",
        BAD_HELLO: "the hello message is incomplete",
        HUB_FULL: "the hub has reached its session limit; try again later",
        TOO_MANY_SESSIONS: "this user has reached its session limit; try again later",
        THROTTLED: "too many failed logins; try again later",
        CASCADE_NOT_ALLOWED: "this user may not connect a cascade (the hub's operator can allow it with "
        "'sevpn hub cascade allow USER')",
    }


def _text(value: object, what: str, limit: int) -> str:
    """A string field from the peer, encodable and bounded, or L{ProtocolError}."""
    if not isinstance(value, str):
        raise ProtocolError(f"{what} is not a string")
    if len(value) > limit:
        raise ProtocolError(f"{what} is longer than {limit} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(f"{what} is not valid Unicode text")
    return value


def _count(value: object, what: str) -> int:
    """A frame count from the peer: an integer (not a boolean) in u64 range."""
    if type(value) is not int or not 0 <= value <= MAX_SEQ:
        raise ProtocolError(f"{what} is not a frame count")
    return value


def _features(value: object) -> FrozenSet[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list) or len(value) > MAX_FEATURES:
        raise ProtocolError("'features' is not a short list")
    return frozenset(f for f in value if isinstance(f, str) and len(f) <= 64)


def quote(text: object, limit: int = 64) -> str:
    """
    Untrusted text for a log line: printable, quoted, and cut, so a peer
    can neither forge log lines nor flood the log.
    """
    text = str(text)
    cut = len(text) > limit
    text = repr(text[:limit])
    return text + "..." if cut else text


def _json_body(kind: int, body: Buffer) -> dict:
    if len(body) > MAX_JSON:
        raise ProtocolError(f"{NAMES[kind]} body of {len(body)} bytes is too large")
    try:
        obj = json.loads(bytes(body).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError(f"{NAMES[kind]} body is not valid JSON")
    if not isinstance(obj, dict):
        raise ProtocolError(f"{NAMES[kind]} body is not a JSON object")
    return obj


def _encode_json(kind: int, obj: dict, prefix: bytes = b"") -> bytes:
    return encode(kind, prefix + json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8"))


@dataclass(frozen=True)
class Resume:
    """A card's request to take its held session back."""

    session: str
    token: str
    #: The last frame the card received from the hub.
    received: int

    @classmethod
    def from_json(cls, obj: object) -> "Resume":
        """Decode and check the hello's C{resume} object."""
        if not isinstance(obj, dict):
            raise ProtocolError("'resume' is not an object")
        return cls(
            _text(obj.get("session"), "'resume.session'", 64),
            _text(obj.get("token"), "'resume.token'", 64),
            _count(obj.get("received"), "'resume.received'"),
        )

    def to_json(self) -> dict:
        """The C{resume} object of a hello."""
        return {"session": self.session, "token": self.token, "received": self.received}


@dataclass(frozen=True)
class Hello:
    """
    The card's first message: who it is, where it wants to go, what it
    can do, and the session it wants back, if any.  A card that logs in
    with a client certificate sends no password.
    """

    hub: str
    user: str
    password: Optional[str] = None
    #: The card's own MAC, as text (informative: the switch learns MACs).
    mac: Optional[str] = None
    features: FrozenSet[str] = frozenset()
    resume: Optional[Resume] = None

    kind = HELLO

    def encode(self) -> bytes:
        """The HELLO message: magic, version, the JSON body."""
        obj: dict = {"hub": self.hub, "user": self.user, "features": sorted(self.features)}
        if self.password is not None:
            obj["password"] = self.password
        if self.mac is not None:
            obj["mac"] = self.mac
        if self.resume is not None:
            obj["resume"] = self.resume.to_json()
        return _encode_json(HELLO, obj, MAGIC + bytes([VERSION]))

    @classmethod
    def decode(cls, body: Buffer) -> "Hello":
        """
        Check the magic and version, then every field.  A body that is not
        a hello at all is a L{ProtocolError}; a hello whose fields are
        wrong is a L{BadHello} (the hub answers it with a refusal).
        """
        body = bytes(body)
        if body[: len(MAGIC)] != MAGIC:
            raise ProtocolError("the peer's hello does not start with the sevpn magic")
        version = body[len(MAGIC) : len(MAGIC) + 1]
        if version != bytes([VERSION]):
            raise ProtocolError(
                f"the peer speaks protocol version {version[0] if version else '?'}, "
                f"this hub speaks {VERSION}"
            )
        obj = _json_body(HELLO, body[len(MAGIC) + 1 :])
        try:
            hub, user = obj.get("hub"), obj.get("user")
            if not valid_name(hub) or not valid_name(user):
                raise ProtocolError("the hello's virtual hub or user name is not a valid name")
            password = obj.get("password")
            if password is not None:
                password = _text(password, "'password'", MAX_PASSWORD)
            mac = obj.get("mac")
            if mac is not None:
                mac = _text(mac, "'mac'", 17)
            resume = obj.get("resume")
            return cls(
                hub, user, password, mac, _features(obj.get("features")),
                Resume.from_json(resume) if resume is not None else None,
            )
        except ProtocolError as e:
            raise BadHello(str(e))


class BadHello(ProtocolError):
    """A well-framed hello with fields that are missing or wrong."""


@dataclass(frozen=True)
class Welcome:
    """The hub's yes: the session, its resume token, and what was agreed."""

    session: str
    token: str
    resumed: bool
    #: The last frame the hub received from the card (for resending).
    received: int
    hub: str
    resume_window: float
    features: FrozenSet[str] = frozenset()
    #: With L{FEATURE_UDP}: the hub's UDP port and this link's channel id.
    udp_port: Optional[int] = None
    udp_channel: Optional[int] = None

    kind = WELCOME

    def encode(self) -> bytes:
        """The WELCOME message."""
        obj = {
            "session": self.session, "token": self.token, "resumed": self.resumed,
            "received": self.received, "hub": self.hub, "resume_window": self.resume_window,
            "features": sorted(self.features),
        }
        if self.udp_port is not None:
            obj["udp"] = {"port": self.udp_port, "channel": f"{self.udp_channel:016x}"}
        return _encode_json(WELCOME, obj)

    @classmethod
    def decode(cls, body: Buffer) -> "Welcome":
        """Decode and check a WELCOME body (a L{ProtocolError} if it is wrong)."""
        obj = _json_body(WELCOME, body)
        resumed = obj.get("resumed")
        window = obj.get("resume_window", 0)
        if type(resumed) is not bool:
            raise ProtocolError("the hub's welcome does not say whether the session was resumed")
        if type(window) not in (int, float) or not 0 <= window <= 86400:
            raise ProtocolError("the hub's welcome has no valid resume window")
        features = _features(obj.get("features"))
        return cls(
            _text(obj.get("session"), "the welcome's session id", 64),
            _text(obj.get("token"), "the welcome's token", 64),
            resumed,
            _count(obj.get("received"), "the welcome's 'received' count"),
            _text(obj.get("hub"), "the welcome's virtual hub", 64),
            float(window),
            features,
            *_udp(obj.get("udp"), FEATURE_UDP in features),
        )


def _udp(value: object, offered: bool) -> Tuple[Optional[int], Optional[int]]:
    """A welcome's UDP port and channel id: checked when the hub offers UDP, else ignored."""
    if not offered:
        return None, None
    if not isinstance(value, dict):
        raise ProtocolError("the hub's welcome offers UDP without its port and channel")
    port, channel = value.get("port"), value.get("channel")
    if type(port) is not int or not 0 < port < 65536:
        raise ProtocolError("the hub's welcome has no valid UDP port")
    if not isinstance(channel, str) or re.fullmatch(r"[0-9a-f]{16}", channel) is None or int(channel, 16) == 0:
        raise ProtocolError("the hub's welcome has no valid UDP channel id")
    return port, int(channel, 16)


@dataclass(frozen=True)
class Refused:
    """The hub's no; L{Refusal} has the codes."""

    code: str
    message: str

    kind = REFUSED

    @classmethod
    def of(cls, code: str) -> "Refused":
        """The refusal for C{code}, with its sentence."""
        return cls(code, Refusal.MESSAGES[code])

    @property
    def retry_later(self) -> bool:
        """Whether the card treats it as an outage and retries."""
        return self.code in Refusal.RETRY_LATER

    def encode(self) -> bytes:
        """The REFUSED message."""
        return _encode_json(REFUSED, {"code": self.code, "message": self.message})

    @classmethod
    def decode(cls, body: Buffer) -> "Refused":
        """Decode a REFUSED body, keeping what it can of a malformed one."""
        obj = _json_body(REFUSED, body)
        code = obj.get("code")
        message = obj.get("message")
        code = code if isinstance(code, str) else ""
        message = message if isinstance(message, str) and message else Refusal.MESSAGES.get(code, "refused")
        return cls(code[:64], message[:MAX_REASON])


@dataclass(frozen=True)
class Goodbye:
    """A clean end: the sender holds no resume for this session."""

    reason: str

    kind = GOODBYE

    def encode(self) -> bytes:
        """The GOODBYE message."""
        return _encode_json(GOODBYE, {"reason": self.reason})

    @classmethod
    def decode(cls, body: Buffer) -> "Goodbye":
        """Decode a GOODBYE body (its reason, cut)."""
        reason = _json_body(GOODBYE, body).get("reason")
        return cls(reason[:MAX_REASON] if isinstance(reason, str) else "")


def encode_frames(frames: Sequence[Buffer]) -> bytes:
    """Concatenate frames as ``len:u32 frame`` records: a DATA payload."""
    pack = _LEN.pack
    parts: List[Buffer] = []
    append = parts.append
    for frame in frames:
        append(pack(len(frame)))
        append(frame)
    return b"".join(parts)


def data_header(first_seq: int, ack: int, payload_len: int) -> bytes:
    """The message header and fixed DATA fields for a payload."""
    return _HEADER.pack(payload_len + _DATA.size, DATA) + _DATA.pack(first_seq, ack)


def encode_data(first_seq: int, ack: int, payload: Buffer) -> bytes:
    """A whole DATA message: header, numbers and payload."""
    return data_header(first_seq, ack, len(payload)) + payload


def encode_ack(ack: int) -> bytes:
    """An ACK message."""
    return encode(ACK, _U64.pack(ack))


def encode_null(ack: int, padding: bytes) -> bytes:
    """A NULL message (the keepalive) carrying an ack and padding."""
    return encode(NULL, _U64.pack(ack) + padding)


def decode_ack(body: Buffer) -> int:
    """The ack of an ACK or NULL body."""
    if len(body) < _U64.size:
        raise ProtocolError("ACK or NULL message shorter than its 8-byte ack")
    return _U64.unpack_from(body)[0]


def decode_data(body: memoryview) -> Tuple[int, int, List[memoryview]]:
    """
    Split a DATA body into its first sequence number, its ack and its
    frames (memoryviews into C{body}: valid only while the body is).
    """
    if len(body) < _DATA.size:
        raise ProtocolError("DATA message shorter than its header")
    first_seq, ack = _DATA.unpack_from(body)
    frames = iter_frames(body[_DATA.size :])
    if frames and (first_seq == 0 or first_seq + len(frames) - 1 > MAX_SEQ):
        raise ProtocolError(
            f"DATA message numbers its {len(frames)} frames from {first_seq}, outside 1..2^64-1"
        )
    return first_seq, ack, frames


def iter_frames(payload: memoryview) -> List[memoryview]:
    """The frames of a DATA payload, validated."""
    frames = []
    pos = 0
    end = len(payload)
    unpack = _LEN.unpack_from
    while pos < end:
        if end - pos < 4:
            raise ProtocolError("DATA message ends inside a frame length")
        (n,) = unpack(payload, pos)
        pos += 4
        if n < MIN_FRAME or n > MAX_FRAME:
            raise ProtocolError(f"DATA message carries a frame of {n} bytes")
        if pos + n > end:
            raise ProtocolError("DATA message ends inside a frame")
        frames.append(payload[pos : pos + n])
        pos += n
    return frames


class Decoder:
    """
    Cuts a byte stream into messages.

    L{feed} returns the complete messages as ``(type, body)`` pairs whose
    bodies are memoryviews into an internal buffer; they stay valid until
    the next call to L{feed}.  It stops after a handshake message, whose
    handling may change how what follows is read; feeding C{b""} goes on.  Buffering is bounded by C{max_body}: a link
    starts at L{MAX_HELLO} (nobody may make the hub buffer a megabyte
    before logging in) and raises it to L{MAX_BODY} once the peer is known.
    """

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self._buffer = bytearray()
        #: The largest body accepted now.
        self.max_body = max_body

    def pending(self) -> int:
        """Bytes received but not yet part of a complete message."""
        return len(self._buffer)

    def feed(self, data: bytes) -> List[Tuple[int, memoryview]]:
        """Add C{data}; the complete messages, up to the first handshake message."""
        buf = self._buffer
        if buf:
            buf += data
            source: Union[bytes, bytearray] = buf
        else:
            source = data
        view = memoryview(source)
        messages = []
        pos = 0
        end = len(source)
        unpack = _HEADER.unpack_from
        max_body = self.max_body
        while end - pos >= HEADER_SIZE:
            length, kind = unpack(source, pos)
            if kind not in NAMES:
                raise ProtocolError(f"unknown message type {kind}")
            if length > max_body:
                raise ProtocolError(
                    f"{NAMES[kind]} message of {length} bytes exceeds the {max_body}-byte limit"
                )
            stop = pos + HEADER_SIZE + length
            if stop > end:
                break
            messages.append((kind, view[pos + HEADER_SIZE : stop]))
            pos = stop
            if kind in HANDSHAKE:
                # What follows may be read under other limits once this is
                # handled (a welcome lifts the hello-sized one): stop here,
                # the caller feeds again (with b"") for the rest.
                break
        if not messages:
            # Nothing was handed out, so the buffer may simply grow.
            if source is data:
                self._buffer = bytearray(data)
            return messages
        # What is left over must outlive this call, so it moves into a fresh
        # buffer; the bodies handed out stay views of the old one.
        self._buffer = bytearray(view[pos:]) if pos < end else bytearray()
        return messages


# -- the UDP channel -----------------------------------------------------------
#
# A channel's datagram carries exactly one message in this framing: DATA,
# ACK or PROBE (see sevpn.datagram for the sealing around it).

_PROBE = struct.Struct("!QBQ")


@dataclass(frozen=True)
class Probe:
    """
    A UDP channel's liveness probe, or its answer (C{reply}).  C{hearing}:
    the sender receives the peer's datagrams (its side of the channel is
    up); C{token} is echoed in the answer; C{ack} as in an ACK.
    """

    ack: int
    token: int
    reply: bool = False
    hearing: bool = False

    kind = PROBE
    REPLY = 1
    HEARING = 2

    def encode(self) -> bytes:
        flags = (self.REPLY if self.reply else 0) | (self.HEARING if self.hearing else 0)
        return encode(PROBE, _PROBE.pack(self.ack, flags, self.token))

    @classmethod
    def decode(cls, body: Buffer) -> "Probe":
        if len(body) != _PROBE.size:
            raise ProtocolError(f"PROBE message of {len(body)} bytes, not {_PROBE.size}")
        ack, flags, token = _PROBE.unpack_from(body)
        return cls(ack, token, bool(flags & cls.REPLY), bool(flags & cls.HEARING))


#: What a channel's datagram may carry.
DATAGRAM_KINDS = frozenset({DATA, ACK, PROBE})


def decode_datagram(plaintext: Buffer) -> Tuple[int, memoryview]:
    """The one message of an opened datagram: its type and body."""
    if len(plaintext) < HEADER_SIZE:
        raise ProtocolError("a datagram shorter than a message header")
    length, kind = _HEADER.unpack_from(plaintext)
    if kind not in DATAGRAM_KINDS:
        raise ProtocolError(f"a datagram carries a {NAMES.get(kind, kind)} message")
    if length != len(plaintext) - HEADER_SIZE:
        raise ProtocolError("a datagram's message length does not match the datagram")
    return kind, memoryview(plaintext)[HEADER_SIZE:]

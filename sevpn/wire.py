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
keys are ignored).  The data-path messages are fixed binary layouts:

    DATA    first_seq:u64 ack:u64 then frames, each  len:u32 frame[len]
    ACK     ack:u64
    NULL    ack:u64 padding     (the keepalive; random padding, ~50 bytes)

Sequence numbers count data frames per direction from 1; ``ack`` is the
highest sequence number the sender has received and delivered.  They are
what session resumption uses to resend exactly what the peer lacks.
"""

from __future__ import annotations

import json
import struct
from typing import List, Sequence, Tuple, Union

MAGIC = b"SEVPN"
VERSION = 1

HELLO = 1
WELCOME = 2
REFUSED = 3
DATA = 4
ACK = 5
NULL = 6
GOODBYE = 7

NAMES = {
    HELLO: "HELLO",
    WELCOME: "WELCOME",
    REFUSED: "REFUSED",
    DATA: "DATA",
    ACK: "ACK",
    NULL: "NULL",
    GOODBYE: "GOODBYE",
}

#: Handshake feature: data frames carry a 10-byte virtio_net_hdr and may be
#: 64 KiB kernel super-frames (see L{sevpn.offload}).
FEATURE_OFFLOAD = "vnet-hdr"


def offers(handshake: dict, feature: str) -> bool:
    """Whether a HELLO or WELCOME lists C{feature}."""
    features = handshake.get("features")
    return isinstance(features, list) and feature in features

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


def encode_json(kind: int, obj: dict) -> bytes:
    body = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")
    if kind == HELLO:
        body = MAGIC + bytes([VERSION]) + body
    return encode(kind, body)


def decode_json(kind: int, body: Buffer) -> dict:
    """Decode a handshake body; HELLO also carries the magic and version."""
    body = bytes(body)
    if kind == HELLO:
        if body[: len(MAGIC)] != MAGIC:
            raise ProtocolError("the peer's hello does not start with the sevpn magic")
        version = body[len(MAGIC) : len(MAGIC) + 1]
        if version != bytes([VERSION]):
            raise ProtocolError(
                f"the peer speaks protocol version {version[0] if version else '?'}, "
                f"this hub speaks {VERSION}"
            )
        body = body[len(MAGIC) + 1 :]
    if len(body) > MAX_JSON:
        raise ProtocolError(f"{NAMES[kind]} body of {len(body)} bytes is too large")
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"{NAMES[kind]} body is not valid JSON")
    if not isinstance(obj, dict):
        raise ProtocolError(f"{NAMES[kind]} body is not a JSON object")
    return obj


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
    return data_header(first_seq, ack, len(payload)) + payload


def encode_ack(ack: int) -> bytes:
    return encode(ACK, _U64.pack(ack))


def encode_null(ack: int, padding: bytes) -> bytes:
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
    if first_seq == 0 and frames:
        raise ProtocolError("DATA message with sequence number 0")
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
    the next call to L{feed}.  Buffering is bounded by L{MAX_BODY}.
    """

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self._buffer = bytearray()
        self._max_body = max_body

    def pending(self) -> int:
        """Bytes received but not yet part of a complete message."""
        return len(self._buffer)

    def feed(self, data: bytes) -> List[Tuple[int, memoryview]]:
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
        max_body = self._max_body
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
        if not messages:
            # Nothing was handed out, so the buffer may simply grow.
            if source is data:
                self._buffer = bytearray(data)
            return messages
        # What is left over must outlive this call, so it moves into a fresh
        # buffer; the bodies handed out stay views of the old one.
        self._buffer = bytearray(view[pos:]) if pos < end else bytearray()
        return messages

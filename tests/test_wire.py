"""The wire codec: round trips, and every kind of bad input refused."""

import json
import struct

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sevpn import wire

frames_st = st.lists(st.binary(min_size=wire.MIN_FRAME, max_size=2000), min_size=0, max_size=20)


class RoundTrip(SynchronousTestCase):
    @given(frames_st, st.integers(1, 2**63), st.integers(0, 2**63))
    @settings(max_examples=200, deadline=None)
    def test_data(self, frames, first, ack):
        message = wire.encode_data(first, ack, wire.encode_frames(frames))
        [(kind, body)] = wire.Decoder().feed(message)
        self.assertEqual(kind, wire.DATA)
        got_first, got_ack, got = wire.decode_data(body)
        self.assertEqual((got_first, got_ack), (first, ack))
        self.assertEqual([bytes(f) for f in got], frames)

    @given(st.lists(st.binary(min_size=wire.MIN_FRAME, max_size=300), min_size=1, max_size=10),
           st.lists(st.integers(1, 97), min_size=1, max_size=40))
    @settings(max_examples=100, deadline=None)
    def test_any_split(self, frames, cuts):
        """However TCP splits the stream, the same messages come out."""
        stream = b"".join(wire.encode_data(i + 1, i, wire.encode_frames([f])) for i, f in enumerate(frames))
        stream += wire.encode_ack(7) + wire.encode_null(9, b"p" * 30)
        decoder = wire.Decoder()
        got = []
        pos = 0
        for cut in cuts * 1000:
            if pos >= len(stream):
                break
            for kind, body in decoder.feed(stream[pos:pos + cut]):
                got.append((kind, bytes(body)))
            pos += cut
        self.assertEqual(decoder.pending(), 0)
        self.assertEqual([k for k, _ in got], [wire.DATA] * len(frames) + [wire.ACK, wire.NULL])
        self.assertEqual([bytes(wire.decode_data(memoryview(b))[2][0]) for k, b in got[:-2]], frames)
        self.assertEqual(wire.decode_ack(got[-2][1]), 7)
        self.assertEqual(wire.decode_ack(got[-1][1]), 9)

    def test_handshake_messages(self):
        messages = [
            wire.Hello("DEFAULT", "alice", "pw", "02:00:00:00:00:01", frozenset([wire.FEATURE_OFFLOAD]),
                       wire.Resume("ab12", "dG9rZW4=", 7)),
            wire.Hello("LAB", "bob"),
            wire.Welcome("ab12", "dG9rZW4=", True, 3, "DEFAULT", 60.0, frozenset([wire.FEATURE_OFFLOAD])),
            wire.Refused.of(wire.Refusal.THROTTLED),
            wire.Goodbye("the hub is shutting down"),
        ]
        for message in messages:
            [(kind, body)] = wire.Decoder().feed(message.encode())
            self.assertEqual(kind, message.kind)
            self.assertEqual(type(message).decode(body), message)

    def test_refusals_retry_later(self):
        self.assertTrue(wire.Refused.of(wire.Refusal.THROTTLED).retry_later)
        self.assertTrue(wire.Refused.of(wire.Refusal.HUB_FULL).retry_later)
        self.assertFalse(wire.Refused.of(wire.Refusal.AUTH_FAILED).retry_later)
        self.assertFalse(wire.Refused("from-the-future", "no").retry_later)

    def test_null_size(self):
        """A keepalive is about 50 bytes on the wire, as SoftEther's NULL packets are."""
        self.assertEqual(len(wire.encode_null(1, b"\0" * 37)), 50)

    def test_large_frame(self):
        """A 64 KiB offload super-frame fits the length prefix."""
        big = b"\x02" * (wire.MAX_FRAME)
        [(kind, body)] = wire.Decoder().feed(wire.encode_data(1, 0, wire.encode_frames([big])))
        self.assertEqual(bytes(wire.decode_data(body)[2][0]), big)


def decode_all(data: bytes) -> None:
    """Decode every message of C{data} as a receiver would."""
    for kind, body in wire.Decoder().feed(data):
        if kind == wire.DATA:
            wire.decode_data(body)
        elif kind in (wire.ACK, wire.NULL):
            wire.decode_ack(body)
        elif kind == wire.HELLO:
            wire.Hello.decode(body)
        elif kind == wire.WELCOME:
            wire.Welcome.decode(body)
        elif kind == wire.REFUSED:
            wire.Refused.decode(body)
        else:
            wire.Goodbye.decode(body)


class BadInput(SynchronousTestCase):
    def assertRefused(self, data, fragment):
        e = self.assertRaises(wire.ProtocolError, decode_all, data)
        self.assertIn(fragment, str(e))

    def test_garbage_instead_of_hello(self):
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "unknown message type")

    def test_unknown_type(self):
        self.assertRefused(struct.pack("!IB", 0, 99), "unknown message type 99")

    def test_oversized(self):
        self.assertRefused(struct.pack("!IB", wire.MAX_BODY + 1, wire.DATA), "exceeds")

    def test_hello_without_magic(self):
        self.assertRefused(wire.encode(wire.HELLO, b'{"a":1}'), "magic")

    def test_hello_wrong_version(self):
        self.assertRefused(wire.encode(wire.HELLO, wire.MAGIC + b"\x09{}"), "version 9")

    def test_json_not_object(self):
        self.assertRefused(wire.encode(wire.WELCOME, b"[1,2]"), "not a JSON object")
        self.assertRefused(wire.encode(wire.WELCOME, b"\xff\xfe"), "not valid JSON")

    def test_truncated_frame(self):
        payload = struct.pack("!I", 100) + b"x" * 50
        self.assertRefused(wire.encode_data(1, 0, payload), "ends inside a frame")

    def test_truncated_length(self):
        self.assertRefused(wire.encode_data(1, 0, b"\x00\x00"), "ends inside a frame length")

    def test_runt_and_giant_frames(self):
        self.assertRefused(wire.encode_data(1, 0, struct.pack("!I", 5) + b"x" * 5), "frame of 5 bytes")
        self.assertRefused(wire.encode_data(1, 0, struct.pack("!I", wire.MAX_FRAME + 1)), "frame of")

    def test_short_data_and_ack(self):
        self.assertRefused(wire.encode(wire.DATA, b"\0" * 5), "shorter than its header")
        self.assertRefused(wire.encode(wire.ACK, b"\0" * 3), "shorter than its 8-byte ack")

    def test_sequence_numbers_out_of_range(self):
        one = wire.encode_frames([b"x" * 20])
        self.assertRefused(wire.encode_data(0, 0, one), "outside 1..2^64-1")
        self.assertRefused(wire.encode_data(2**64 - 1, 0, one * 2), "outside 1..2^64-1")
        [(_, body)] = wire.Decoder().feed(wire.encode_data(2**64 - 1, 0, one))
        self.assertEqual(wire.decode_data(body)[0], 2**64 - 1)  # the last number there is

    def test_hello_fields(self):
        def hello(**fields):
            obj = {"hub": "DEFAULT", "user": "alice", "password": "pw"}
            obj.update(fields)
            return wire.MAGIC + b"\x01" + json.dumps(obj).encode()

        wire.Hello.decode(hello())
        for bad, fragment in [
            (dict(hub="DEFAULT\n"), "not a valid name"),
            (dict(user="a" * 65), "not a valid name"),
            (dict(user=None), "not a valid name"),
            (dict(password=7), "'password' is not a string"),
            (dict(password="\ud800"), "not valid Unicode"),
            (dict(password="x" * 2000), "longer than"),
            (dict(resume={"session": "a", "token": "b", "received": True}), "not a frame count"),
            (dict(resume={"session": "a", "token": "b", "received": -1}), "not a frame count"),
            (dict(resume={"session": "a", "token": "b", "received": 2**64}), "not a frame count"),
            (dict(resume=[]), "not an object"),
            (dict(features="vnet-hdr"), "features"),
        ]:
            e = self.assertRaises(wire.BadHello, wire.Hello.decode, hello(**bad))
            self.assertIn(fragment, str(e), bad)

    def test_deeply_nested_json(self):
        body = wire.MAGIC + b"\x01" + b"[" * 5000 + b"]" * 5000
        self.assertRefused(wire.encode(wire.HELLO, body), "not valid JSON")

    def test_welcome_fields(self):
        good = {"session": "s", "token": "t", "resumed": False, "received": 0, "hub": "DEFAULT", "resume_window": 60}
        wire.Welcome.decode(json.dumps(good).encode())
        for key, value in [("resumed", 1), ("received", True), ("received", -1), ("resume_window", "60"),
                           ("session", None)]:
            bad = dict(good, **{key: value})
            self.assertRaises(wire.ProtocolError, wire.Welcome.decode, json.dumps(bad).encode())

    def test_hello_sized_limit_before_login(self):
        decoder = wire.Decoder(wire.MAX_HELLO)
        e = self.assertRaises(wire.ProtocolError, decoder.feed, struct.pack("!IB", 1 << 20, wire.HELLO))
        self.assertIn("exceeds", str(e))

    @given(st.binary(max_size=300))
    @settings(max_examples=300, deadline=None)
    def test_fuzz(self, data):
        """Random bytes either decode or raise ProtocolError, nothing else."""
        try:
            decode_all(data)
        except wire.ProtocolError:
            pass


class UdpChannel(SynchronousTestCase):
    """The UDP channel's part of the protocol: the welcome's offer, probes, datagram messages."""

    GOOD = {"session": "s", "token": "t", "resumed": False, "received": 0, "hub": "DEFAULT", "resume_window": 60}

    def test_welcome_offer_round_trip(self):
        welcome = wire.Welcome("s", "t", False, 0, "DEFAULT", 60.0, frozenset({wire.FEATURE_UDP}),
                               udp_port=5555, udp_channel=0xFEDCBA9876543210)
        kind, body = wire.Decoder().feed(welcome.encode())[0]
        self.assertEqual(wire.Welcome.decode(body), welcome)
        self.assertIn(b'"channel":"fedcba9876543210"', welcome.encode())  # text: JSON numbers lose bits

    def test_offer_checked_only_when_udp_is_listed(self):
        with_udp = dict(self.GOOD, features=["udp"], udp={"port": 5555, "channel": "00000000000000ff"})
        self.assertEqual(wire.Welcome.decode(json.dumps(with_udp).encode()).udp_channel, 255)
        # an old hub: no feature, anything under "udp" is ignored
        old = dict(self.GOOD, udp="whatever")
        welcome = wire.Welcome.decode(json.dumps(old).encode())
        self.assertEqual((welcome.udp_port, welcome.udp_channel), (None, None))
        for udp in (None, "x", {"port": 0, "channel": "00000000000000ff"}, {"port": 65536, "channel": "ff" * 8},
                    {"port": True, "channel": "ff" * 8}, {"port": 5555, "channel": "0" * 16},
                    {"port": 5555, "channel": "ff"}, {"port": 5555, "channel": "FF" * 8},
                    {"port": 5555, "channel": 255}, {"port": 5555}):
            bad = dict(self.GOOD, features=["udp"], udp=udp)
            self.assertRaises(wire.ProtocolError, wire.Welcome.decode, json.dumps(bad).encode())

    def test_probe_round_trip(self):
        for probe in (wire.Probe(7, 1), wire.Probe(0, 2, reply=True), wire.Probe(wire.MAX_SEQ, 3, hearing=True),
                      wire.Probe(1, 4, reply=True, hearing=True)):
            kind, body = wire.decode_datagram(probe.encode())
            self.assertEqual(kind, wire.PROBE)
            self.assertEqual(wire.Probe.decode(body), probe)
        self.assertRaises(wire.ProtocolError, wire.Probe.decode, b"\x00" * 16)

    def test_datagram_messages(self):
        data = wire.encode_data(1, 0, wire.encode_frames([b"e" * 60]))
        self.assertEqual(wire.decode_datagram(data)[0], wire.DATA)
        self.assertEqual(wire.decode_datagram(wire.encode_ack(3))[0], wire.ACK)
        for bad in (b"", b"\x00\x00", data[:-1], data + b"x", wire.Goodbye("x").encode(),
                    wire.encode_null(0, b"pad"), wire.encode(99, b"")):
            self.assertRaises(wire.ProtocolError, wire.decode_datagram, bad)

    def test_a_probe_on_the_tls_stream_is_not_data(self):
        [(kind, _)] = wire.Decoder().feed(wire.Probe(0, 1).encode())
        self.assertEqual(kind, wire.PROBE)  # known, and the link refuses it as unexpected

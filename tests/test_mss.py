"""MSS clamping of TCP SYNs, checksums checked by an implementation of our own here."""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sevpn import datagram, mss

SRC4, DST4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
SRC6, DST6 = bytes.fromhex("20010db8000000000000000000000001"), bytes.fromhex("20010db8000000000000000000000002")
ETH = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01"


def internet_checksum(data: bytes) -> int:
    """RFC 1071, word by word, the plain way (independent of sevpn's)."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_segment(options: bytes, flags: int = 0x02, payload: bytes = b"") -> bytes:
    offset = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", 40000, 80, 1000, 0, offset << 4, flags, 64240, 0, 0) + options + payload


def with_checksum(pseudo: bytes, segment: bytes) -> bytes:
    value = internet_checksum(pseudo + segment)
    return segment[:16] + struct.pack("!H", value) + segment[18:]


def syn4(options: bytes, flags: int = 0x02, vlan: bool = False) -> bytes:
    segment = tcp_segment(options, flags)
    pseudo = SRC4 + DST4 + struct.pack("!BBH", 0, 6, len(segment))
    segment = with_checksum(pseudo, segment)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(segment), 1, 0x4000, 64, 6, 0, SRC4, DST4)
    ip = ip[:10] + struct.pack("!H", internet_checksum(ip)) + ip[12:]
    link = ETH + (b"\x81\x00\x00\x05" if vlan else b"") + b"\x08\x00"
    return link + ip + segment


def syn6(options: bytes) -> bytes:
    segment = tcp_segment(options)
    pseudo = SRC6 + DST6 + struct.pack("!I", len(segment)) + b"\x00\x00\x00\x06"
    segment = with_checksum(pseudo, segment)
    ip = struct.pack("!IHBB16s16s", 0x60000000, len(segment), 6, 64, SRC6, DST6)
    return ETH + b"\x86\xdd" + ip + segment


def tcp_of(frame: bytes, offset: int = 0):
    """(pseudo-header, TCP segment) of an IPv4 or IPv6 frame."""
    frame = frame[offset:]
    l3 = 14
    ethertype = frame[12:14]
    if ethertype == b"\x81\x00":
        l3, ethertype = 18, frame[16:18]
    if ethertype == b"\x08\x00":
        ip = frame[l3 : l3 + 20]
        segment = frame[l3 + 20 :]
        return ip[12:20] + struct.pack("!BBH", 0, 6, len(segment)), segment
    ip = frame[l3 : l3 + 40]
    segment = frame[l3 + 40 :]
    return ip[8:40] + struct.pack("!I", len(segment)) + b"\x00\x00\x00\x06", segment


def mss_of(segment: bytes):
    pos, end = 20, (segment[12] >> 4) * 4
    while pos < end:
        kind = segment[pos]
        if kind == 0:
            return None
        if kind == 1:
            pos += 1
            continue
        if kind == 2:
            return struct.unpack("!H", segment[pos + 2 : pos + 4])[0]
        pos += segment[pos + 1]
    return None


MSS = b"\x02\x04\x05\xb4"  # 1460
SACK_TS = b"\x04\x02\x08\x0a" + bytes(8)
WSCALE = b"\x01\x03\x03\x07"


class Clamp(SynchronousTestCase):
    LIMITS = mss.limits(datagram.room(4))

    def assertClamped(self, frame, want, offset=0):
        out = mss.clamp(frame, offset, *self.LIMITS)
        pseudo, segment = tcp_of(out, offset)
        self.assertEqual(mss_of(segment), want)
        self.assertEqual(internet_checksum(pseudo + segment), 0, "the TCP checksum is wrong")
        self.assertEqual(len(out), len(frame))
        return out

    def test_limits_fit_a_datagram(self):
        mss4, mss6 = self.LIMITS
        # IP + TCP headers, Ethernet with a VLAN tag, a virtio-net header,
        # the frame's length, the DATA header: one datagram's plaintext
        self.assertLessEqual(mss4 + 40 + 18 + 10 + 4 + 21, datagram.room(4))
        self.assertLessEqual(mss6 + 60 + 18 + 10 + 4 + 21, datagram.room(4))
        self.assertEqual(self.LIMITS, (1347, 1327))

    def test_ipv4_syn(self):
        frame = syn4(MSS + SACK_TS + WSCALE)
        self.assertEqual(internet_checksum(b"".join(tcp_of(frame))), 0)  # the test's own frame is right
        out = self.assertClamped(frame, 1347)
        self.assertEqual(out[14:34], frame[14:34])  # the IP header is not touched

    def test_ipv4_syn_ack_and_vlan(self):
        self.assertClamped(syn4(MSS + WSCALE, flags=0x12), 1347)
        self.assertClamped(syn4(MSS, vlan=True), 1347)

    def test_ipv6_syn(self):
        self.assertClamped(syn6(MSS + SACK_TS), 1327)

    def test_option_at_an_odd_offset(self):
        # NOP, MSS: the MSS value straddles two checksum words
        self.assertClamped(syn4(b"\x01" + MSS + b"\x01\x01\x01"), 1347)
        self.assertClamped(syn6(b"\x01\x01\x01" + MSS + b"\x01\x01\x01\x01\x01"), 1327)

    def test_smaller_mss_and_other_frames_untouched(self):
        for frame in (
            syn4(b"\x02\x04\x04\x00"),  # 1024: already small
            syn4(MSS, flags=0x10),  # an ACK, not a SYN
            syn4(WSCALE),  # a SYN without MSS
            syn4(b"\x00" + MSS[:3]),  # end of options first
            ETH + b"\x08\x06" + bytes(28),  # ARP
            ETH + b"\x08\x00" + bytes(10),  # too short
        ):
            self.assertIs(mss.clamp(frame, 0, *self.LIMITS), frame)

    def test_udp_and_fragments_untouched(self):
        frame = bytearray(syn4(MSS))
        frame[14 + 9] = 17  # UDP
        self.assertEqual(mss.clamp(bytes(frame), 0, *self.LIMITS), bytes(frame))
        frame = bytearray(syn4(MSS))
        frame[14 + 6 : 14 + 8] = b"\x00\x10"  # fragment offset 16: no TCP header here
        self.assertEqual(mss.clamp(bytes(frame), 0, *self.LIMITS), bytes(frame))

    def test_behind_a_virtio_header(self):
        frame = syn4(MSS + WSCALE)
        # checksum done (flags 0): corrected as usual
        self.assertClamped(bytes(10) + frame, 1347, offset=10)
        # checksum left to the kernel (NEEDS_CSUM): the field holds the
        # pseudo-header sum only and must stay as it is
        partial = b"\x01" + bytes(9) + frame
        out = mss.clamp(partial, 10, *self.LIMITS)
        _, segment = tcp_of(out, 10)
        self.assertEqual(mss_of(segment), 1347)
        self.assertEqual(out[10 + 34 + 16 : 10 + 34 + 18], frame[34 + 16 : 34 + 18])

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=120), st.sampled_from([0, 10]))
    def test_garbage_never_raises(self, tail, offset):
        for head in (bytes(offset) + syn4(b"")[:34], bytes(offset) + syn6(b"")[:54]):
            frame = head + tail
            out = mss.clamp(frame, offset, *self.LIMITS)
            self.assertEqual(len(out), len(frame))

    @settings(max_examples=200, deadline=None)
    @given(st.integers(min_value=1348, max_value=65535), st.integers(min_value=0, max_value=3))
    def test_checksum_right_for_any_mss_and_place(self, value, nops):
        self.assertClamped(syn4(b"\x01" * nops + b"\x02\x04" + struct.pack("!H", value) + b"\x01" * (4 - nops)),
                           1347)

"""
Offload super-frames: header validation, checksum completion and TCP
segmentation in software, checked against an independent checksum.
"""

import array
import struct
import sys

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sevpn import offload as vnet
from tests.support import frame, mac

HDR = ("<" if sys.byteorder == "little" else ">") + "BBHHHH"


def rfc1071(data: bytes) -> int:
    """A straightforward RFC 1071 checksum, to check the fast one against."""
    if len(data) % 2:
        data += b"\0"
    words = array.array("H", data)
    if sys.byteorder == "little":
        words.byteswap()
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_tcp(payload: bytes, seq=1000, flags=0x18, ident=7) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 1, 5 << 4, flags, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), ident, 0x4000, 64, 6, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    return mac(2) + mac(1) + b"\x08\x00" + ip + tcp + payload


def ipv6_tcp(payload: bytes, seq=5) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 1, 5 << 4, 0x19, 65535, 0, 0)
    ip = struct.pack("!IHBB16s16s", 0x60000000, len(tcp) + len(payload), 6, 64, b"\xfd" + b"\0" * 14 + b"\x01",
                     b"\xfd" + b"\0" * 14 + b"\x02")
    return mac(2) + mac(1) + b"\x86\xdd" + ip + tcp + payload


def gso(eth: bytes, gso_type: int, mss: int, l4: int) -> bytes:
    return struct.pack(HDR, vnet.F_NEEDS_CSUM, gso_type, l4 + 20, mss, l4, 16) + eth


def verify_tcp4(seg: bytes) -> None:
    ip = seg[14:34]
    assert rfc1071(ip) == 0, "bad IPv4 header checksum"
    tcp = seg[34:]
    pseudo = ip[12:20] + b"\0\x06" + struct.pack("!H", len(tcp))
    assert rfc1071(pseudo + tcp) == 0, "bad TCP checksum"
    assert struct.unpack("!H", ip[2:4])[0] == len(seg) - 14


def verify_tcp6(seg: bytes) -> None:
    ip, tcp = seg[14:54], seg[54:]
    pseudo = ip[8:40] + struct.pack("!I", len(tcp)) + b"\0\0\0\x06"
    assert rfc1071(pseudo + tcp) == 0, "bad TCP checksum"
    assert struct.unpack("!H", ip[4:6])[0] == len(tcp)


class Checksum(SynchronousTestCase):
    @given(st.binary(max_size=3000))
    @settings(max_examples=300, deadline=None)
    def test_matches_rfc1071(self, data):
        fast, slow = vnet.checksum(data), rfc1071(data)
        # 0x0000 and 0xffff are the same number in one's complement
        self.assertEqual(fast % 0xFFFF, slow % 0xFFFF)


class Segmentation(SynchronousTestCase):
    def test_tcpv4_super_frame(self):
        payload = bytes(range(256)) * 40  # 10240 bytes
        segs = vnet.to_plain(gso(ipv4_tcp(payload, flags=0x19), vnet.GSO_TCPV4, 1448, 34))
        self.assertEqual(len(segs), 8)
        got = b""
        for i, seg in enumerate(segs):
            verify_tcp4(seg)
            self.assertEqual(struct.unpack("!I", seg[38:42])[0], 1000 + i * 1448)
            self.assertEqual(struct.unpack("!H", seg[18:20])[0], 7 + i)  # IP ids count up
            flags = seg[47]
            self.assertEqual(bool(flags & 0x01), i == 7)  # FIN only on the last
            self.assertEqual(bool(flags & 0x08), i == 7)  # PSH only on the last
            self.assertLessEqual(len(seg), 14 + 20 + 20 + 1448)
            got += seg[54:]
        self.assertEqual(got, payload)

    def test_tcpv6_super_frame(self):
        payload = b"z" * 5000
        segs = vnet.to_plain(gso(ipv6_tcp(payload), vnet.GSO_TCPV6, 1400, 54))
        self.assertEqual(len(segs), 4)
        for seg in segs:
            verify_tcp6(seg)
        self.assertEqual(b"".join(s[74:] for s in segs), payload)

    def test_partial_checksum_completed(self):
        eth = bytearray(ipv4_tcp(b"hello world"))
        # what the kernel leaves: the pseudo-header sum, not inverted
        pseudo = bytes(eth[26:34]) + b"\0\x06" + struct.pack("!H", 20 + 11)
        eth[50:52] = struct.pack("!H", vnet.ones_sum(pseudo))
        ip = bytearray(eth[14:34])
        ip[10:12] = struct.pack("!H", rfc1071(bytes(ip)))
        eth[14:34] = ip
        hdr = struct.pack(HDR, vnet.F_NEEDS_CSUM, 0, 0, 0, 34, 16)
        [seg] = vnet.to_plain(hdr + bytes(eth))
        verify_tcp4(seg)

    def test_plain_frames_pass_and_gain_a_header(self):
        f = frame(mac(1), mac(2))
        self.assertEqual(vnet.to_plain(vnet.from_plain(f)), [f])
        self.assertEqual(len(vnet.from_plain(f)), len(f) + 10)


class Validation(SynchronousTestCase):
    def test_bad_headers(self):
        eth = ipv4_tcp(b"x" * 100)
        bad = [
            b"\0" * 12,  # too short
            struct.pack(HDR, 0x40, 0, 0, 0, 0, 0) + eth,  # unknown flag
            struct.pack(HDR, 1, 0, 0, 0, 34, 2000) + eth,  # checksum outside the frame
            struct.pack(HDR, 1, 0, 0, 0, 4, 0) + eth,  # checksum inside the Ethernet header
            struct.pack(HDR, 1, 3, 54, 1000, 34, 6) + eth,  # UFO, not negotiated
            struct.pack(HDR, 0, 1, 54, 1000, 34, 16) + eth,  # GSO without NEEDS_CSUM
            struct.pack(HDR, 1, 1, 54, 0, 34, 16) + eth,  # GSO size 0
            struct.pack(HDR, 0, 0x80, 0, 0, 0, 0) + eth,  # ECN without GSO
        ]
        for b in bad:
            self.assertFalse(vnet.valid(b), b[:10])
            self.assertRaises(vnet.BadFrame, vnet.to_plain, b)
        # a sound header on the wrong kind of frame cannot be segmented
        v6_of_v4 = struct.pack(HDR, 1, vnet.GSO_TCPV6, 54, 100, 34, 16) + eth
        self.assertRaises(vnet.BadFrame, vnet.to_plain, v6_of_v4)
        self.assertTrue(vnet.valid(gso(eth, vnet.GSO_TCPV4, 100, 34)))

    def test_amplification_is_refused(self):
        """A super-frame cut absurdly fine would become tens of thousands of segments: refused."""
        eth = ipv4_tcp(b"x" * 60000)
        self.assertFalse(vnet.valid(gso(eth, vnet.GSO_TCPV4, 1, 34)))
        self.assertRaises(vnet.BadFrame, vnet.to_plain, gso(eth, vnet.GSO_TCPV4, 1, 34))
        self.assertFalse(vnet.valid(gso(eth, vnet.GSO_TCPV4, vnet.MIN_GSO_SIZE - 1, 34)))
        self.assertFalse(vnet.valid(gso(eth, vnet.GSO_TCPV4, 400, 34)))  # 150 segments
        self.assertTrue(vnet.valid(gso(eth, vnet.GSO_TCPV4, 536, 34)))  # 112: an old default MSS
        self.assertEqual(len(vnet.to_plain(gso(eth, vnet.GSO_TCPV4, 536, 34))), 112)

    @given(st.binary(min_size=10, max_size=200))
    @settings(max_examples=500, deadline=None)
    def test_fuzz(self, data):
        """Garbage is refused with BadFrame, never anything else."""
        try:
            vnet.to_plain(data)
        except vnet.BadFrame:
            pass


# UDP segmentation frames, as a bridge port meets them (sevpn.bridge) ---------------


def ipv4_udp(payload: bytes, ident=9, link=None) -> bytes:
    udp = struct.pack("!HHHH", 4433, 9000, 8 + len(payload), 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp) + len(payload), ident, 0x4000, 64, 17, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    return (link or mac(2) + mac(1) + b"\x08\x00") + ip + udp + payload


def ipv6_udp(payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 4433, 9000, 8 + len(payload), 0)
    ip = struct.pack("!IHBB16s16s", 0x60000000, len(udp) + len(payload), 17, 64, b"\xfd" + b"\0" * 14 + b"\x01",
                     b"\xfd" + b"\0" * 14 + b"\x02")
    return mac(2) + mac(1) + b"\x86\xdd" + ip + udp + payload


def udp_gso(eth: bytes, mss: int, l4: int) -> bytes:
    return struct.pack(HDR, vnet.F_NEEDS_CSUM, vnet.GSO_UDP_L4, l4 + 8, mss, l4, 6) + eth


class UdpSegmentation(SynchronousTestCase):
    def test_ipv4(self):
        payload = bytes(range(256)) * 10  # 2560 bytes
        segs = vnet.segment_udp(udp_gso(ipv4_udp(payload), 1000, 34))
        self.assertEqual([len(s) - 42 for s in segs], [1000, 1000, 560])
        for i, seg in enumerate(segs):
            ip, udp = seg[14:34], seg[34:]
            self.assertEqual(rfc1071(ip), 0)
            self.assertEqual(struct.unpack("!H", ip[2:4])[0], len(seg) - 14)
            self.assertEqual(struct.unpack("!H", ip[4:6])[0], 9 + i)
            self.assertEqual(struct.unpack("!H", udp[4:6])[0], len(udp))
            pseudo = ip[12:20] + b"\0\x11" + struct.pack("!H", len(udp))
            self.assertEqual(rfc1071(pseudo + udp), 0, "bad UDP checksum")
        self.assertEqual(b"".join(s[42:] for s in segs), payload)

    def test_ipv6_behind_a_vlan_tag(self):
        payload = b"q" * 3000
        eth = ipv6_udp(payload)
        tagged = eth[:12] + b"\x81\x00\x00\x05" + eth[12:]
        segs = vnet.segment_udp(udp_gso(tagged, 1200, 58))
        self.assertEqual(len(segs), 3)
        for seg in segs:
            self.assertEqual(seg[12:18], b"\x81\x00\x00\x05\x86\xdd")
            ip, udp = seg[18:58], seg[58:]
            self.assertEqual(struct.unpack("!H", ip[4:6])[0], len(udp))
            pseudo = ip[8:40] + struct.pack("!I", len(udp)) + b"\0\0\0\x11"
            self.assertEqual(rfc1071(pseudo + udp), 0, "bad UDP checksum")
        self.assertEqual(b"".join(s[66:] for s in segs), payload)

    def test_what_is_not_udp_segmentation(self):
        for bad in [
            b"\0" * 12,
            udp_gso(ipv4_udp(b"x" * 100), 0, 34),  # segment size 0
            gso(ipv4_tcp(b"x" * 100), vnet.GSO_TCPV4, 50, 34),  # TCP segmentation
            udp_gso(ipv4_tcp(b"x" * 100), 50, 34),  # says UDP, is TCP
            udp_gso(ipv4_udp(b"")[:40], 50, 34),  # no UDP header
            udp_gso(ipv4_udp(b"x" * 1290), 10, 34),  # 129 segments: not a kernel's
        ]:
            self.assertRaises(vnet.BadFrame, vnet.segment_udp, bad)
        # the hub does not carry them whole
        self.assertFalse(vnet.valid(udp_gso(ipv4_udp(b"x" * 100), 50, 34)))

    @given(st.integers(0, 65535), st.binary(max_size=200))
    @settings(max_examples=300, deadline=None)
    def test_fuzz(self, mss, data):
        """A UDP segmentation header before garbage: BadFrame or frames, never anything else."""
        try:
            vnet.segment_udp(struct.pack(HDR, vnet.F_NEEDS_CSUM, vnet.GSO_UDP_L4, 0, mss, 34, 6) + data)
        except vnet.BadFrame:
            pass

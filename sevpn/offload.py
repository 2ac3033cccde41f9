"""
Kernel offload frames: a TAP opened with IFF_VNET_HDR and TUNSETOFFLOAD
hands over, and takes back, Ethernet frames of up to 64 KiB behind a
10-byte virtio_net_hdr ("super-frames": TCP segmentation and checksums
are left to whoever delivers the frame).  Carrying them whole is what
makes the data path fast: one read, one message, one write per 64 KiB
instead of per 1.5 KiB.

Pure code.  L{valid} checks a header that came from the network before it
may reach a kernel; L{to_plain} turns a super-frame into the ordinary
frames a card without offload expects (TCP segmentation and checksum
completion in software); L{from_plain} is the other way round.
"""

from __future__ import annotations

import struct
import sys
from typing import List

HEADER_SIZE = 10
#: virtio_net_hdr in the host's byte order (TUN's default).
_HDR = struct.Struct(("<" if sys.byteorder == "little" else ">") + "BBHHHH")
#: The header's layout (flags, gso_type, hdr_len, gso_size, csum_start,
#: csum_offset), for code that rewrites one (a bridge port putting a VLAN tag back).
HEADER = _HDR

F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
#: UDP segmentation (a LAN host's C{UDP_SEGMENT} sockets, QUIC): only a
#: bridge port meets it; see L{segment_udp}.
GSO_UDP_L4 = 5
#: The kernel sends at most this many segments in one UDP super-frame
#: (UDP_MAX_SEGMENTS); more is not a kernel's frame.
UDP_MAX_SEGMENTS = 128
GSO_ECN = 0x80

PLAIN_HEADER = bytes(HEADER_SIZE)  # "a complete frame, checksums done"
#: The smallest segment size a real TCP stack uses (Linux's TCP_MIN_MSS):
#: a super-frame cut finer is an amplification attack, not traffic.
MIN_GSO_SIZE = 88
#: The most segments one super-frame may stand for: 64 KiB at an MSS of 536
#: (the old default) is 123; a sender asking for more is refused.
MAX_SEGMENTS = 128

_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD
_ETH_P_8021Q = 0x8100
_TCP_FIN, _TCP_PSH, _TCP_CWR = 0x01, 0x08, 0x80


class BadFrame(ValueError):
    """An offload frame that must not be delivered; the message says why."""


def ones_sum(data) -> int:
    """The one's complement sum of 16-bit words (RFC 1071), folded."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    # 2**16 == 1 (mod 0xffff): a number's value mod 0xffff is the folded
    # sum of its 16-bit digits, computed in C.
    return int.from_bytes(data, "big") % 0xFFFF


def checksum(data) -> int:
    """
    The Internet checksum of C{data} (RFC 1071): the complement of
    L{ones_sum}, as IP, TCP and UDP headers carry it.
    """
    return ~ones_sum(data) & 0xFFFF


def valid(frame) -> bool:
    """Whether a header + frame is safe to hand to a TAP."""
    try:
        check(frame)
    except BadFrame:
        return False
    return True


def check(frame) -> tuple:
    """Parse and validate the header; return its fields or raise L{BadFrame}."""
    if len(frame) < HEADER_SIZE + 14:
        raise BadFrame("shorter than a header and an Ethernet header")
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = _HDR.unpack_from(frame)
    length = len(frame) - HEADER_SIZE
    if flags & ~(F_NEEDS_CSUM | F_DATA_VALID):
        raise BadFrame(f"unknown header flags {flags:#x}")
    if flags & F_NEEDS_CSUM and (csum_start < 14 or csum_start + csum_offset + 2 > length):
        raise BadFrame("checksum position outside the frame")
    gso = gso_type & ~GSO_ECN
    if gso == GSO_NONE:
        if gso_type & GSO_ECN:
            raise BadFrame("ECN flag without segmentation")
    elif gso in (GSO_TCPV4, GSO_TCPV6):
        if not flags & F_NEEDS_CSUM or hdr_len > length:
            raise BadFrame("inconsistent segmentation header")
        if gso_size < MIN_GSO_SIZE:
            raise BadFrame(f"segment size {gso_size} is below {MIN_GSO_SIZE}")
        if length > hdr_len + gso_size * MAX_SEGMENTS:
            raise BadFrame(f"a super-frame of more than {MAX_SEGMENTS} segments")
    else:
        raise BadFrame(f"unsupported segmentation type {gso_type:#x}")
    return flags, gso, gso_size, csum_start, csum_offset


def from_plain(frame) -> bytes:
    """An ordinary frame as an offload frame."""
    return PLAIN_HEADER + bytes(frame)


def to_plain(frame) -> List[bytes]:
    """
    The ordinary frames a super-frame stands for: segmented if it is a TCP
    GSO frame, its checksum completed if the kernel left it partial.
    Raises L{BadFrame} for what cannot be made right.
    """
    flags, gso, gso_size, csum_start, csum_offset = check(frame)
    eth = memoryview(frame)[HEADER_SIZE:]
    if gso == GSO_NONE:
        if not flags & F_NEEDS_CSUM:
            return [bytes(eth)]
        out = bytearray(eth)
        field = csum_start + csum_offset
        value = checksum(out[csum_start:])
        if value == 0 and csum_offset == 6:  # UDP sends 0 as 0xffff
            value = 0xFFFF
        out[field : field + 2] = value.to_bytes(2, "big")
        return [bytes(out)]
    return _segment(eth, gso, gso_size)


def _segment(eth: memoryview, gso: int, mss: int) -> List[bytes]:
    l3 = 14
    ethertype = int.from_bytes(eth[12:14], "big")
    if ethertype == _ETH_P_8021Q:
        l3 = 18
        ethertype = int.from_bytes(eth[16:18], "big")
    if gso == GSO_TCPV4:
        if ethertype != _ETH_P_IP or len(eth) < l3 + 20:
            raise BadFrame("TCPv4 segmentation of a frame that is not IPv4")
        ihl = (eth[l3] & 0x0F) * 4
        if ihl < 20 or eth[l3 + 9] != 6:
            raise BadFrame("TCPv4 segmentation of a frame that is not TCP")
    else:
        if ethertype != _ETH_P_IPV6 or len(eth) < l3 + 40 or eth[l3 + 6] != 6:
            raise BadFrame("TCPv6 segmentation of a frame that is not TCP over IPv6")
        ihl = 40
    l4 = l3 + ihl
    if len(eth) < l4 + 20:
        raise BadFrame("segmentation of a frame without a TCP header")
    thl = (eth[l4 + 12] >> 4) * 4
    start = l4 + thl
    if thl < 20 or start > len(eth):
        raise BadFrame("TCP header length outside the frame")
    payload = eth[start:]
    seq = int.from_bytes(eth[l4 + 4 : l4 + 8], "big")
    tcp_flags = eth[l4 + 13]
    ip_id = int.from_bytes(eth[l3 + 4 : l3 + 6], "big")
    link = bytes(eth[:l3])
    out = []
    count = max(1, -(-len(payload) // mss))
    for i in range(count):
        chunk = payload[i * mss : (i + 1) * mss]
        tcp = bytearray(eth[l4:start])
        tcp[4:8] = ((seq + i * mss) & 0xFFFFFFFF).to_bytes(4, "big")
        f = tcp_flags
        if i < count - 1:
            f &= ~(_TCP_FIN | _TCP_PSH)
        if i > 0:
            f &= ~_TCP_CWR
        tcp[13] = f
        tcp[16:18] = b"\0\0"
        ip = bytearray(eth[l3:l4])
        tcp_len = thl + len(chunk)
        if gso == GSO_TCPV4:
            ip[2:4] = (ihl + tcp_len).to_bytes(2, "big")
            ip[4:6] = ((ip_id + i) & 0xFFFF).to_bytes(2, "big")
            ip[10:12] = b"\0\0"
            ip[10:12] = checksum(ip).to_bytes(2, "big")
            pseudo = bytes(ip[12:20]) + b"\0\x06" + tcp_len.to_bytes(2, "big")
        else:
            ip[4:6] = tcp_len.to_bytes(2, "big")
            pseudo = bytes(ip[8:40]) + tcp_len.to_bytes(4, "big") + b"\0\0\0\x06"
        tcp[16:18] = checksum(pseudo + tcp + chunk).to_bytes(2, "big")
        out.append(link + ip + tcp + chunk)
    return out


def segment_udp(frame) -> List[bytes]:
    """
    The ordinary frames a UDP segmentation super-frame (C{GSO_UDP_L4}: a
    host's C{UDP_SEGMENT} send, as QUIC stacks do) stands for, checksums
    completed.  The hub does not carry such frames whole (L{check} refuses
    them, since cards never ask for them); a bridge port that reads one from
    its LAN segments it here.  Raises L{BadFrame}.
    """
    if len(frame) < HEADER_SIZE + 14:
        raise BadFrame("shorter than a header and an Ethernet header")
    flags, gso_type, _hdr_len, mss, _start, _offset = _HDR.unpack_from(frame)
    if gso_type != GSO_UDP_L4 or mss == 0:
        raise BadFrame("not a UDP segmentation frame")
    eth = memoryview(frame)[HEADER_SIZE:]
    l3 = 14
    ethertype = int.from_bytes(eth[12:14], "big")
    if ethertype == _ETH_P_8021Q:
        l3 = 18
        ethertype = int.from_bytes(eth[16:18], "big")
    if ethertype == _ETH_P_IP and len(eth) >= l3 + 20:
        ihl = (eth[l3] & 0x0F) * 4
        if ihl < 20 or eth[l3 + 9] != 17:
            raise BadFrame("UDP segmentation of a frame that is not UDP")
        ipv4 = True
    elif ethertype == _ETH_P_IPV6 and len(eth) >= l3 + 40 and eth[l3 + 6] == 17:
        ihl = 40
        ipv4 = False
    else:
        raise BadFrame("UDP segmentation of a frame that is not UDP over IP")
    l4 = l3 + ihl
    if len(eth) < l4 + 8:
        raise BadFrame("segmentation of a frame without a UDP header")
    payload = eth[l4 + 8 :]
    link = bytes(eth[:l3])
    ports = bytes(eth[l4 : l4 + 4])
    ip_id = int.from_bytes(eth[l3 + 4 : l3 + 6], "big")
    count = max(1, -(-len(payload) // mss))
    if count > UDP_MAX_SEGMENTS:
        raise BadFrame(f"UDP segmentation into {count} segments (at most {UDP_MAX_SEGMENTS})")
    out = []
    for i in range(count):
        chunk = payload[i * mss : (i + 1) * mss]
        udp_len = 8 + len(chunk)
        ip = bytearray(eth[l3:l4])
        if ipv4:
            ip[2:4] = (ihl + udp_len).to_bytes(2, "big")
            ip[4:6] = ((ip_id + i) & 0xFFFF).to_bytes(2, "big")
            ip[10:12] = b"\0\0"
            ip[10:12] = checksum(ip).to_bytes(2, "big")
            pseudo = bytes(ip[12:20]) + b"\0\x11" + udp_len.to_bytes(2, "big")
        else:
            ip[4:6] = udp_len.to_bytes(2, "big")
            pseudo = bytes(ip[8:40]) + udp_len.to_bytes(4, "big") + b"\0\0\0\x11"
        udp = ports + udp_len.to_bytes(2, "big")
        value = checksum(pseudo + udp + b"\0\0" + chunk) or 0xFFFF
        out.append(link + bytes(ip) + udp + value.to_bytes(2, "big") + bytes(chunk))
    return out

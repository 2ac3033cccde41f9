"""
MSS clamping: make the TCP connections inside the tunnel send segments
that fit one datagram of the UDP channel, as OpenVPN's C{mssfix} does.

An Ethernet frame of 1514 bytes does not fit a datagram on a 1500-byte
path once the channel's headers are added; the UDP socket would let IP
fragment it, and a lost fragment loses the whole frame.  A TCP connection
agrees on its segment size in its SYN and SYN-ACK (the MSS option), so a
card rewrites that option in the SYNs crossing it, both ways, to at most
what fits: both ends then send segments that need no fragmenting.  What is
not TCP (and TCP that says no MSS) still crosses whole, fragmented by IP.

Pure code: L{clamp} takes a frame and returns it, or a copy with a lower
MSS and a corrected TCP checksum.  A frame behind a virtio-net header
whose checksum is left to the kernel (C{NEEDS_CSUM}) keeps its checksum
field as it is: it covers the pseudo-header only.
"""

from __future__ import annotations

_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD
_ETH_P_8021Q = 0x8100
_TCP = 6
_SYN = 0x02
_OPT_END, _OPT_NOP, _OPT_MSS = 0, 1, 2
_F_NEEDS_CSUM = 1

#: Bytes between the inner IP packet and the end of a channel datagram's
#: plaintext that a clamped segment must leave room for: the DATA message
#: header (5 + 16), the frame's length (4), a virtio-net header (10), an
#: Ethernet header with a VLAN tag (18).
FRAME_OVERHEAD = 5 + 16 + 4 + 10 + 18


def limits(room: int) -> tuple:
    """The MSS for IPv4 and IPv6 inside a channel whose datagrams carry C{room} plaintext bytes."""
    packet = room - FRAME_OVERHEAD
    return packet - 40, packet - 60


def _fold(value: int) -> int:
    while value >> 16:
        value = (value & 0xFFFF) + (value >> 16)
    return value


def _words(data: bytes) -> int:
    return sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))


def clamp(frame, offset: int, mss4: int, mss6: int):
    """
    C{frame} (C{offset} bytes before its Ethernet header: 0, or 10 for a
    virtio-net header) with the MSS option of a TCP SYN lowered to
    C{mss4} or C{mss6}; any other frame is returned as it is.
    """
    l3 = offset + 14
    if len(frame) < l3 + 40:
        return frame
    ethertype = frame[l3 - 2] << 8 | frame[l3 - 1]
    if ethertype == _ETH_P_8021Q:
        l3 += 4
        if len(frame) < l3 + 40:
            return frame
        ethertype = frame[l3 - 2] << 8 | frame[l3 - 1]
    if ethertype == _ETH_P_IP:
        if frame[l3 + 9] != _TCP or frame[l3] >> 4 != 4 or (frame[l3 + 6] & 0x1F) or frame[l3 + 7]:
            return frame  # not TCP, or a fragment after the first (no TCP header)
        l4 = l3 + (frame[l3] & 0x0F) * 4
        limit = mss4
    elif ethertype == _ETH_P_IPV6:
        if frame[l3 + 6] != _TCP:
            return frame
        l4 = l3 + 40
        limit = mss6
    else:
        return frame
    if len(frame) < l4 + 20 or not frame[l4 + 13] & _SYN:
        return frame
    end = l4 + (frame[l4 + 12] >> 4) * 4
    if end > len(frame):
        return frame
    pos = l4 + 20
    while pos < end:
        kind = frame[pos]
        if kind == _OPT_END:
            return frame
        if kind == _OPT_NOP:
            pos += 1
            continue
        if pos + 1 >= end or frame[pos + 1] < 2:
            return frame  # a malformed option list: leave it to the receiver
        size = frame[pos + 1]
        if kind == _OPT_MSS and size == 4 and pos + 4 <= end:
            mss = frame[pos + 2] << 8 | frame[pos + 3]
            if mss <= limit:
                return frame
            return _rewrite(frame, offset, l4, pos + 2, limit)
        pos += size
    return frame


def _rewrite(frame, offset: int, l4: int, at: int, mss: int) -> bytes:
    out = bytearray(frame)
    # The checksum's 16-bit words are aligned on the TCP header: the bytes
    # changed may straddle two of them.
    start = at - ((at - l4) & 1)
    stop = start + (4 if (at - l4) & 1 else 2)
    old = _words(out[start:stop])
    out[at : at + 2] = mss.to_bytes(2, "big")
    partial = offset and out[0] & _F_NEEDS_CSUM
    if not partial:
        new = _words(out[start:stop])
        field = l4 + 16
        checksum = out[field] << 8 | out[field + 1]
        # RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')
        value = ~_fold((~checksum & 0xFFFF) + (~_fold(old) & 0xFFFF) + _fold(new)) & 0xFFFF
        out[field : field + 2] = value.to_bytes(2, "big")
    return bytes(out)

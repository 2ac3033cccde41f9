"""
Explicit congestion notification: tell a sender to slow down without
losing its packet.

A congested port that would drop a frame marks it instead when the IP
packet inside says its transport understands ECN (ECT(0) or ECT(1) in the
traffic class): the two ECN bits become CE, "congestion experienced"
(RFC 3168), and the receiver's TCP echoes that to the sender, which backs
off as if a packet were lost, with nothing lost.  IPv4's header checksum
is updated incrementally (RFC 1624); IPv6 has none.  A super-frame
(behind a virtio-net header) is marked once: the kernel copies its IP
header into every segment.

Pure code over bytes.
"""

from __future__ import annotations

from typing import Optional

_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD
_ETH_P_8021Q = 0x8100
NOT_ECT, ECT1, ECT0, CE = 0, 1, 2, 3


def mark(frame, offset: int = 0) -> Optional[bytearray]:
    """
    C{frame} with CE set, if it carries an ECN-capable IP packet; None if
    it does not (it must then be dropped to signal congestion).  A frame
    already marked CE is returned as it is.
    """
    l3 = offset + 14
    if len(frame) < l3 + 20:
        return None
    ethertype = (frame[l3 - 2] << 8) | frame[l3 - 1]
    if ethertype == _ETH_P_8021Q:
        l3 += 4
        if len(frame) < l3 + 20:
            return None
        ethertype = (frame[l3 - 2] << 8) | frame[l3 - 1]
    if ethertype == _ETH_P_IP:
        tos = frame[l3 + 1]
        if frame[l3] >> 4 != 4 or tos & 3 == NOT_ECT:
            return None
        out = bytearray(frame)
        if tos & 3 == CE:
            return out
        old_word = (out[l3] << 8) | tos
        out[l3 + 1] = tos | CE
        new_word = (out[l3] << 8) | out[l3 + 1]
        # RFC 1624: HC' = ~(~HC + ~m + m')
        checksum = (out[l3 + 10] << 8) | out[l3 + 11]
        total = (~checksum & 0xFFFF) + (~old_word & 0xFFFF) + new_word
        total = (total & 0xFFFF) + (total >> 16)
        total = (total & 0xFFFF) + (total >> 16)
        checksum = ~total & 0xFFFF
        out[l3 + 10] = checksum >> 8
        out[l3 + 11] = checksum & 0xFF
        return out
    if ethertype == _ETH_P_IPV6:
        if frame[l3] >> 4 != 6:
            return None
        traffic_class = ((frame[l3] & 0x0F) << 4) | (frame[l3 + 1] >> 4)
        if traffic_class & 3 == NOT_ECT:
            return None
        out = bytearray(frame)
        out[l3 + 1] |= CE << 4
        return out
    return None

"""
Raw Ethernet frames on an interface, for the bridge tests: send frames
exactly as given (802.1Q tags included), and capture the frames that
carry a marker, with the VLAN tag the kernel took off put back (as a
capture on a VLAN-offloading interface must: see L{sevpn.bridge}).

    python -m scripts.rawframe send IFACE HEX [HEX ...]
    python -m scripts.rawframe capture IFACE MARKER SECONDS [COUNT]

C{capture} prints C{ready} once it listens, then one JSON line: the
hex of each marked frame seen within SECONDS (it stops early after
COUNT of them).
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time

from sevpn.bridge import ETH_P_ALL, PACKET_AUXDATA, SOL_PACKET, insert_tag, vlan_tag


def send(interface: str, frames) -> None:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.bind((interface, 0))
    for frame in frames:
        sock.send(frame)
    sock.close()


def capture(interface: str, marker: bytes, seconds: float, count: int = 0) -> list:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    sock.bind((interface, ETH_P_ALL))
    print("ready", flush=True)
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (count and len(seen) >= count):
        if not select.select([sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
            break
        frame, ancillary, _flags, address = sock.recvmsg(1 << 16, socket.CMSG_SPACE(32))
        if address[2] == 4:  # PACKET_OUTGOING: what this host sent
            continue
        for level, kind, data in ancillary:
            if level == SOL_PACKET and kind == PACKET_AUXDATA:
                tag = vlan_tag(data)
                if tag is not None:
                    frame = insert_tag(frame, 0, tag)
        if marker in frame:
            seen.append(frame.hex())
    sock.close()
    return seen


def main(argv) -> int:
    if argv[0] == "send":
        send(argv[1], [bytes.fromhex(h) for h in argv[2:]])
    elif argv[0] == "capture":
        print(json.dumps(capture(argv[1], argv[2].encode(), float(argv[3]), int(argv[4]) if len(argv) > 4 else 0)))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""
Broadcast counting for the fabric system tests.

    python -m scripts.fabric_udp count PORT SECONDS MARKER   # prints how many datagrams with MARKER arrived
    python -m scripts.fabric_udp send ADDRESS PORT N MARKER  # sends N broadcast datagrams
"""

import socket
import sys
import time


def count(port: int, seconds: float, marker: bytes) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("", port))
    print("ready", flush=True)
    deadline = time.monotonic() + seconds
    seen = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            data = sock.recv(2048)
        except socket.timeout:
            break
        if marker in data:
            seen += 1
    print(seen, flush=True)
    return 0


def send(address: str, port: int, n: int, marker: bytes) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    for i in range(n):
        sock.sendto(marker + b" %d" % i, (address, port))
        time.sleep(0.005)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "count":
        sys.exit(count(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4].encode()))
    sys.exit(send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5].encode()))

"""
A hostile logged-in user for make soak: a wire-protocol client that floods
its virtual hub with broadcast from spoofed MACs, lies about frame numbers
now and then, and logs in again whenever the hub drops it.

    python -m scripts.hostile_flood HOST PORT CA_FILE USER PASSWORD_FILE SECONDS
"""

from __future__ import annotations

import os
import random
import socket
import ssl
import sys
import time

from sevpn import wire
from sevpn.users import read_password_file


def session(host: str, port: int, ca_file: str, user: str, password: str):
    context = ssl.create_default_context(cafile=ca_file)
    sock = context.wrap_socket(socket.create_connection((host, port), timeout=5), server_hostname=host)
    sock.sendall(wire.Hello("DEFAULT", user, password, "02:66:66:66:66:66", frozenset()).encode())
    sock.settimeout(0.2)
    return sock


def main() -> int:
    host, port, ca_file, user, password_file, seconds = sys.argv[1:7]
    password = read_password_file(password_file).decode()
    end = time.monotonic() + float(seconds)
    sent = logins = 0
    seq = 1
    sock = None
    while time.monotonic() < end:
        try:
            if sock is None:
                sock = session(host, int(port), ca_file, user, password)
                logins += 1
                seq = 1
            frames = [b"\xff" * 6 + bytes([2, 0xEE]) + os.urandom(4) + b"\x08\x06" + os.urandom(46)
                      for _ in range(64)]
            first = seq if random.random() > 0.01 else random.choice([0, 2**64 - 1])
            sock.sendall(wire.encode_data(first, 0, wire.encode_frames(frames)))
            seq += len(frames)
            sent += len(frames)
            try:
                sock.recv(1 << 16)  # whatever the hub says; drained so it never blocks on us
            except (socket.timeout, ssl.SSLWantReadError):
                pass
            time.sleep(0.01)
        except OSError:
            if sock is not None:
                sock.close()
            sock = None
            time.sleep(0.5)
    print(f"hostile: {sent} frames sent over {logins} logins", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

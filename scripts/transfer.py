"""
A TCP transfer for the system tests: ``serve`` receives one connection and
reports its size and sha256; ``send`` sends a file, optionally paced.

    python -m scripts.transfer serve HOST PORT REPORT.json
    python -m scripts.transfer send HOST PORT FILE [BYTES_PER_SECOND]
"""

import hashlib
import json
import socket
import sys
import time


def serve(host: str, port: int, report: str) -> int:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(1)
    listener.settimeout(120)
    conn, _ = listener.accept()
    conn.settimeout(120)
    digest, size, error = hashlib.sha256(), 0, None
    try:
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            digest.update(data)
            size += len(data)
    except OSError as e:
        error = f"{e.__class__.__name__}: {e}"
    with open(report, "w") as f:
        json.dump({"bytes": size, "sha256": digest.hexdigest(), "error": error}, f)
    return 0 if error is None else 1


def send(host: str, port: int, path: str, rate: float = 0) -> int:
    sock = socket.create_connection((host, port), timeout=120)
    start = time.monotonic()
    sent = 0
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(64 * 1024), b""):
                sock.sendall(block)
                sent += len(block)
                if rate:
                    ahead = sent / rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)
    except OSError as e:
        print(f"send failed after {sent} bytes: {e.__class__.__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        sys.exit(serve(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
    sys.exit(send(sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]) if len(sys.argv) > 5 else 0))

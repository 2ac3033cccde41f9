"""
A stand-in for a hub worker's fabric port, for the fabric system tests: it
opens a TAP device the way the hub will (python-pytun, carrier on, held open)
and reflects MACs into the node bridge with L{sevpn.netlink.FdbReflector}
on the Twisted reactor, as the hub process will.  It reads commands on
stdin, one per line, and answers each with one JSON line:

    add MAC | remove MAC     -> {"ok": true}   (queued)
    sync                     -> the reflector's stats, once nothing is pending
    frames                   -> {"frames": N, "marked": M}: frames read from the TAP,
                                and how many of them contain the marker

    python -m scripts.fabric_port TAP MARKER
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import sys

from twisted.internet import reactor, stdio
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.protocols.basic import LineReceiver

from sevpn.mac import parse_mac
from sevpn.netlink import FdbReflector

TUNSETCARRIER = 0x400454E2


class TapCounter:
    """Reads and counts what the bridge sends to the port."""

    def __init__(self, name: str, marker: bytes) -> None:
        import pytun

        self.device = pytun.TunTapDevice(name=name, flags=pytun.IFF_TAP | pytun.IFF_NO_PI)
        self.fd = self.device.fileno()
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        fcntl.ioctl(self.fd, TUNSETCARRIER, struct.pack("i", 1))
        self.device.up()
        self.marker = marker
        self.frames = self.marked = 0

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        while True:
            try:
                frame = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            self.frames += 1
            if self.marker in frame:
                self.marked += 1

    def connectionLost(self, reason) -> None:
        pass

    def logPrefix(self) -> str:
        return "tap"


class Commands(LineReceiver):
    delimiter = b"\n"

    def __init__(self, reflector: FdbReflector, tap: TapCounter) -> None:
        self.reflector = reflector
        self.tap = tap

    def lineReceived(self, line: bytes) -> None:
        words = line.decode().split()
        if not words:
            return
        if words[0] in ("add", "remove"):
            getattr(self.reflector, words[0])(parse_mac(words[1]))
            self.answer({"ok": True})
        elif words[0] == "sync":
            self.sync()
        elif words[0] == "frames":
            self.answer({"frames": self.tap.frames, "marked": self.tap.marked})
        else:
            self.answer({"error": f"unknown command {words[0]!r}"})

    def sync(self) -> None:
        stats = self.reflector.stats()
        if stats["pending"] or stats["in_flight"]:
            reactor.callLater(0.01, self.sync)
        else:
            self.answer(stats)

    def answer(self, obj: dict) -> None:
        self.sendLine(json.dumps(obj).encode())

    def connectionLost(self, reason) -> None:
        if reactor.running:
            reactor.stop()


def main(tap_name: str, marker: str) -> None:
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    tap = TapCounter(tap_name, marker.encode())
    reactor.addReader(tap)
    reflector = FdbReflector(tap_name, reactor)
    stdio.StandardIO(Commands(reflector, tap))
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

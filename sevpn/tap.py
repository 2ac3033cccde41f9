"""
The card's TAP device: what the OS sees as a network card.

L{TapDevice} opens a TAP with python-pytun (IFF_TAP|IFF_NO_PI, made
non-blocking), gives it the card's MAC, and sets its carrier with
TUNSETCARRIER, which pytun does not wrap: no carrier is what the OS shows
for "network cable unplugged" (seed fact 4).

As a reactor reader it reads the TAP until EAGAIN (within a budget, like
L{twisted.pair.tuntap.TuntapPort}) and hands each wakeup's frames over in
one batch, so they cross the link in one message.  No threads.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Callable, List

from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from sevpn import offload as vnet
from sevpn import wire

TUNSETCARRIER = 0x400454E2
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
#: Frames read per wakeup at most, so one busy TAP cannot starve the link.
READ_BUDGET = 256
READ_SIZE = wire.MAX_FRAME


class TapError(Exception):
    """The TAP device cannot be made; the message says why."""


@implementer(IReadDescriptor)
class TapDevice:
    log = Logger()

    def __init__(
        self, name: str, mac: bytes, reactor, on_frames: Callable[[List[bytes]], None], offload: bool = True
    ) -> None:
        import pytun

        flags = pytun.IFF_TAP | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if offload else 0)
        try:
            self.device = pytun.TunTapDevice(name=name, flags=flags)
        except pytun.Error as e:
            if "busy" in str(e).lower():
                raise TapError(f"cannot create TAP device {name}: another program (another card?) already uses it")
            raise TapError(f"cannot create TAP device {name}: {e} (is /dev/net/tun there, and are you root?)")
        self.name = self.device.name
        self.fd = self.device.fileno()
        fl = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
        #: Frames carry a virtio_net_hdr and may be 64 KiB super-frames.
        self.offload = offload
        self.min_frame = wire.MIN_FRAME + (vnet.HEADER_SIZE if offload else 0)
        if offload:
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", vnet.HEADER_SIZE))
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
        self.reactor = reactor
        self.on_frames = on_frames
        self.reading = False
        self.carrier = False
        self.write_drops = 0
        self.bad_frames = 0
        self.set_carrier(False)
        self.device.hwaddr = mac
        self.device.up()

    # carrier ---------------------------------------------------------------

    def set_carrier(self, on: bool) -> None:
        fcntl.ioctl(self.fd, TUNSETCARRIER, struct.pack("i", 1 if on else 0))
        self.carrier = on

    # reading ---------------------------------------------------------------

    def start_reading(self) -> None:
        if not self.reading and self.fd >= 0:
            self.reading = True
            self.reactor.addReader(self)

    def stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.reactor.removeReader(self)

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        read, fd = os.read, self.fd
        frames: List[bytes] = []
        size = 0
        for _ in range(READ_BUDGET):
            try:
                frame = read(fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EINTR):
                    break
                raise
            if len(frame) < self.min_frame:
                continue
            frames.append(frame)
            size += len(frame)
            if size >= wire.MAX_BATCH:
                self.on_frames(frames)
                frames = []
                size = 0
        if frames:
            self.on_frames(frames)

    def connectionLost(self, reason) -> None:
        self.reading = False

    def logPrefix(self) -> str:
        return f"tap {self.name}"

    # writing ---------------------------------------------------------------

    def write_frames(self, frames) -> None:
        """Write frames to the OS; an offload header must pass L{vnet.valid}."""
        write, fd = os.write, self.fd
        valid = vnet.valid if self.offload else None
        for frame in frames:
            if valid is not None and not valid(frame):
                self.bad_frames += 1
                continue
            try:
                write(fd, frame)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EIO, errno.EINVAL, errno.ENOBUFS):
                    raise
                self.write_drops += 1

    def close(self) -> None:
        self.stop_reading()
        if self.fd >= 0:
            try:
                self.set_carrier(False)
            except OSError:
                pass
            self.device.close()
            self.fd = -1

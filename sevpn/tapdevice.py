"""
A TAP device as a switch port: what the OS sees as a network card.

L{TapPort} opens a TAP with python-pytun (IFF_TAP|IFF_NO_PI, made
non-blocking), gives it a MAC, and sets its carrier with TUNSETCARRIER,
which pytun does not wrap: no carrier is what the OS shows for "network
cable unplugged".  A card has one (its own side); a hub may have some
(bridge ports an operator puts into a Linux bridge).

As a reactor reader it reads the TAP until EAGAIN (within a budget, like
L{twisted.pair.tuntap.TuntapPort}) and hands each wakeup's frames to its
sink in one batch, so they cross the link in one message.  No threads.

I{Persistent} TAPs (C{TUNSETPERSIST}; L{create_persistent_tap}, C{sevpn
nic create}) outlive the program that uses them, and with them their
addresses, routes and bridge membership.  A L{TapPort} of that name
attaches to one (or makes a TAP that goes when it closes).  On attaching,
the kernel takes the opener's flags (C{IFF_NO_PI}, C{IFF_VNET_HDR}), so a
card with or without offload can use any persistent TAP; it refuses a TUN
device of that name (EINVAL) and a TAP another program holds (EBUSY).
While nobody holds a persistent TAP the kernel shows it without carrier.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from typing import List, Optional

from twisted.logger import Logger

from sevpn import busypoll, wire
from sevpn import offload as vnet
from sevpn.fdport import DescriptorPort

TUNSETCARRIER = 0x400454E2
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETPERSIST = 0x400454CB
TUNGETIFF = 0x800454D2
IFF_PERSIST = 0x0800
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
#: Frames read per wakeup at most, so one busy TAP cannot starve the link.
READ_BUDGET = 256
READ_SIZE = wire.MAX_FRAME


class TapError(Exception):
    """The TAP device cannot be made; the message says why."""


class TapPort(DescriptorPort):
    """
    A TAP device as a port.  With C{backpressure} a full destination stops
    its reading (the kernel queues, then drops); without it, the card's
    choice, reading goes on and a full destination drops at once, so the
    OS's TCP backs off without a standing queue.
    """

    log = Logger()

    def __init__(
        self, name: str, mac: Optional[bytes], reactor, offload: bool = True, backpressure: bool = False,
        max_macs: int = 0, label: Optional[str] = None, keep_mac: bool = False,
    ) -> None:
        """
        @param mac: the MAC to give the device; None keeps the device's own
            (the kernel's random one for a TAP made now).
        @param keep_mac: a persistent TAP keeps its own MAC, whatever C{mac}
            says (C{sevpn nic create} gave it one).
        @param max_macs: how many source MACs a hub learns on it (a hub's
            bridge TAP: a LAN's worth); 0 is the virtual hub's default.
        @param label: the port's name for status and logs (default: the device's).
        """
        import pytun

        super().__init__(name, reactor, mac_offset=vnet.HEADER_SIZE if offload else 0, max_macs=max_macs)
        self.backpressure = backpressure

        flags = pytun.IFF_TAP | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if offload else 0)
        self.device = open_tap(name, flags)
        self.device_name = self.device.name
        self.name = label or self.device_name
        #: Whether the device outlives this port (made with 'sevpn nic create').
        self.persistent = bool(attached_flags(self.device) & IFF_PERSIST)
        if keep_mac and self.persistent:
            mac = None
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
        self.reading = False
        self.carrier = False
        self.write_drops = 0
        self.set_carrier(False)
        if mac is not None and self.device.hwaddr != mac:
            self.device.hwaddr = mac
        #: The device's MAC.
        self.mac = bytes(self.device.hwaddr)
        self.device.up()

    # carrier ---------------------------------------------------------------

    def set_carrier(self, on: bool) -> None:
        """Show the cable plugged in or not (TUNSETCARRIER)."""
        fcntl.ioctl(self.fd, TUNSETCARRIER, struct.pack("i", 1 if on else 0))
        self.carrier = on

    # reading ---------------------------------------------------------------

    def doRead(self) -> None:
        """Read what the OS sent, until EAGAIN or the budget, in batches to the sink."""
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
                self._hand_over(frames)
                frames = []
                size = 0
        if frames:
            self._hand_over(frames)

    def _hand_over(self, frames: List[bytes]) -> None:
        busypoll.activity()
        sink = self.sink
        sink.forward(self, frames)
        sink.flush(self)

    def pause_input(self) -> None:
        """A destination is full: stop reading, if this port takes backpressure."""
        if self.backpressure:
            self.stop_reading()

    def resume_input(self) -> None:
        """Read again, if this port takes backpressure."""
        if self.backpressure:
            self.start_reading()

    def logPrefix(self) -> str:
        """What the reactor's log lines about this reader say."""
        return f"tap {self.device_name}"

    # writing ---------------------------------------------------------------

    def transmit(self, frames) -> None:
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

    # segmentation (for the UDP channel, L{sevpn.channel}) ---------------------

    def segment_in_kernel(self, on: bool) -> None:
        """
        With C{on}, TCP super-frames are cut to the MTU by the kernel before
        they reach us (TSO off, checksum offload kept): a UDP channel would
        otherwise segment them in Python, at about twice the card's CPU per
        segment.  Off restores TSO.  Nothing changes without offload.
        """
        if self.offload and self.fd >= 0:
            tso = 0 if on else TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, TUN_F_CSUM | tso)

    def counters(self) -> dict:
        """The port's counters and the writes the kernel refused."""
        info = super().counters()
        info["tap_write_drops"] = self.write_drops
        return info

    def close(self) -> None:
        """Stop reading, unplug the cable and close the device (a persistent TAP stays)."""
        super().close()
        self.stop_reading()
        if self.fd >= 0:
            try:
                self.set_carrier(False)
            except OSError:
                pass
            self.device.close()
            self.fd = -1


# opening, and persistent TAPs ----------------------------------------------------


def open_tap(name: str, flags: int):
    """A pytun device for TAP C{name} (attached if it exists); L{TapError} with a sentence."""
    import pytun

    try:
        return pytun.TunTapDevice(name=name, flags=flags)
    except pytun.Error as e:
        code = e.args[0] if e.args and isinstance(e.args[0], int) else None
        if code == errno.EBUSY:
            raise TapError(f"cannot use TAP device {name}: another program (a card or a hub) already uses it")
        if code == errno.EINVAL and _exists(name):
            raise TapError(f"cannot use {name} as a TAP device: a network interface of another kind has that name")
        raise TapError(f"cannot create TAP device {name}: {e} (is /dev/net/tun there, and are you root?)")


def attached_flags(device) -> int:
    """The TUN/TAP flags (C{IFF_PERSIST}, ...) of an attached device (C{TUNGETIFF})."""
    answer = fcntl.ioctl(device.fileno(), TUNGETIFF, bytes(40))
    return struct.unpack_from("16sH", answer)[1]


def _exists(name: str) -> bool:
    """Whether this network namespace has an interface C{name} (asked of the kernel, not of /sys)."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def create_persistent_tap(name: str, mac: Optional[bytes] = None) -> bytes:
    """
    Make TAP C{name} persistent (C{sevpn nic create}): up, without carrier
    until a card or hub attaches, with C{mac} or the kernel's random one.
    Returns its MAC.
    """
    import pytun

    if _exists(name):
        raise TapError(f"{name} already exists; pick another name, or delete it first "
                       f"('sevpn nic delete {name}' if it is a persistent TAP)")
    device = open_tap(name, pytun.IFF_TAP | pytun.IFF_NO_PI | pytun.IFF_VNET_HDR | pytun.IFF_TUN_EXCL)
    try:
        device.persist(True)
        fcntl.ioctl(device.fileno(), TUNSETCARRIER, struct.pack("i", 0))
        if mac is not None:
            device.hwaddr = mac
        device.up()
        return bytes(device.hwaddr)
    finally:
        device.close()


def delete_persistent_tap(name: str) -> None:
    """Remove persistent TAP C{name} (C{sevpn nic delete}); L{TapError} with a sentence if it cannot be."""
    import pytun

    if not _exists(name):
        raise TapError(f"there is no TAP device named {name}")
    try:
        device = open_tap(name, pytun.IFF_TAP | pytun.IFF_NO_PI)
    except TapError as e:
        if "another kind" in str(e):
            raise TapError(f"{name} is not a TAP device; leaving it alone")
        if "already uses it" in str(e):
            raise TapError(f"cannot delete TAP device {name}: a program (a card or a hub) uses it; stop that first")
        raise
    try:
        if not attached_flags(device) & IFF_PERSIST:  # only if it appeared just now: made by open_tap
            raise TapError(f"there is no TAP device named {name}")
        device.persist(False)
    finally:
        device.close()

"""
A port whose frames come from a file descriptor the reactor watches: a
TAP device (L{sevpn.tapdevice.TapPort}) or a packet socket on a real
interface (L{sevpn.bridge.RawBridgePort}).  What both need from the
reactor is here once; how each reads its descriptor stays with it.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReadDescriptor
from zope.interface import implementer

from sevpn.port import Port


@implementer(IReadDescriptor)
class DescriptorPort(Port):
    """
    A L{Port} read in the reactor.  Subclasses set C{fd} (-1 once closed)
    and C{reactor}, and define C{doRead} and C{logPrefix}.
    """

    fd = -1
    reading = False

    def start_reading(self) -> None:
        """Read the descriptor in the reactor (while it is open)."""
        if not self.reading and self.fd >= 0:
            self.reading = True
            self.reactor.addReader(self)

    def stop_reading(self) -> None:
        """Stop reading the descriptor."""
        if self.reading:
            self.reading = False
            self.reactor.removeReader(self)

    def fileno(self) -> int:
        """IReadDescriptor: the descriptor."""
        return self.fd

    def connectionLost(self, reason) -> None:
        """IReadDescriptor: the reactor let go of the descriptor."""
        self.reading = False

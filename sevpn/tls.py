"""
TLS for links: Twisted's memory-BIO TLS, fed and drained in large pieces.

L{TLSMemoryBIOProtocol} hands OpenSSL 16 KiB per call (after slicing a
copy), reads the outgoing BIO 32 KiB at a time, and calls up into the
protocol once per received record.  At gigabit rates that per-record
Python is most of the cost of a hop.  A link writes whole DATA messages
(up to 256 KiB) and a memory BIO never blocks, so here one C{send}
encrypts a whole message, one pass drains the BIO into one transport
write, and the records of one socket read reach the link in one call.

Also no small-write aggregation (Twisted's default BufferingTLSTransport):
a link already writes once per wakeup, and waiting for the next reactor
iteration only adds latency to every hop.

This leans on three methods of L{TLSMemoryBIOProtocol} that are not public
API (C{_write}, C{_flushSendBIO}, C{_flushReceiveBIO}); the real-TLS tests
(tests/test_tls.py) and every system test go through them.
"""

from __future__ import annotations

from OpenSSL.SSL import Error, WantReadError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

#: The most bytes taken out of a BIO per call.
CHUNK = 1 << 18


class LinkTLSProtocol(TLSMemoryBIOProtocol):
    def _write(self, data) -> None:
        if self._lostTLSConnection:
            return
        view = memoryview(data)
        done = 0
        while done < len(view):
            try:
                done += self._tlsConnection.send(view[done:])
            except WantReadError:
                self._bufferedWrite(bytes(view[done:]))
                break
            except Error:
                self._tlsShutdownFinished(Failure())
                return
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        chunks = []
        while True:
            try:
                chunks.append(self._tlsConnection.bio_read(CHUNK))
            except WantReadError:
                break
        if chunks:
            self.transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _flushReceiveBIO(self) -> None:
        received = []
        while not self._lostTLSConnection:
            try:
                received.append(self._tlsConnection.recv(CHUNK))
            except WantReadError:
                break
            except Error:
                # The end of TLS (clean or not): deliver what came before
                # it, then let Twisted handle the ending as it always does.
                self._deliver(received)
                return TLSMemoryBIOProtocol._flushReceiveBIO(self)
        self._deliver(received)
        self._flushSendBIO()

    def _deliver(self, received) -> None:
        if received and not self._aborted:
            ProtocolWrapper.dataReceived(self, received[0] if len(received) == 1 else b"".join(received))


class TLSFactory(TLSMemoryBIOFactory):
    protocol = LinkTLSProtocol


@implementer(IStreamClientEndpoint)
class TLSClientEndpoint:
    """C{wrapClientTLS}, with L{TLSFactory}."""

    def __init__(self, options, endpoint) -> None:
        self.options = options
        self.endpoint = endpoint

    def connect(self, factory):
        d = self.endpoint.connect(TLSFactory(self.options, True, factory))
        return d.addCallback(lambda tls: tls.wrappedProtocol)

"""
TLS for links: Twisted's memory-BIO TLS, fed and drained in large pieces.

L{TLSMemoryBIOProtocol} hands OpenSSL 16 KiB per call (after slicing a
copy), reads the outgoing BIO 32 KiB at a time, and calls up into the
protocol once per received record.  At gigabit rates that per-record
Python is most of the cost of a hop.  Here:

 - one C{SSL_write} encrypts a whole message (partial writes off: the
   BIO is memory and never blocks);
 - the outgoing BIO is drained with one C{BIO_read} into a scratch buffer
   shared by all links, and handed straight to the socket when nothing is
   queued before it; only what the socket does not take is copied and
   left to the reactor (no extra reactor iteration per hop: latency);
 - the socket is read 256 KiB at a time (Twisted reads 64 KiB) into one
   shared buffer, and all records of a read are decrypted back to back
   into the scratch buffer with C{SSL_read}, reaching the link in one call.

No small-write aggregation either (Twisted's default
BufferingTLSTransport): a link already writes once per wakeup.

This leans on what is not public API: three methods of
L{TLSMemoryBIOProtocol} (C{_write}, C{_flushSendBIO}, C{_flushReceiveBIO}),
pyOpenSSL's cffi binding and handles (C{OpenSSL._util.lib},
C{Connection._ssl}, C{Connection._from_ssl}), and the TCP transport's
C{doRead}, replaced per connection.  constraints.txt pins the
versions; tests/test_tls.py checks every byte across real TLS, including
writes larger than the scratch buffer and partial socket writes, and every
system test goes through it.  Without the binding, Twisted's own methods
run (slower, same bytes).
"""

from __future__ import annotations

from OpenSSL.SSL import Error, WantReadError
from twisted.internet import main
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

try:  # pyOpenSSL's cffi binding of OpenSSL: the per-record fast path
    from OpenSSL._util import ffi as _ffi, lib as _lib

    _PARTIAL_WRITE = _lib.SSL_MODE_ENABLE_PARTIAL_WRITE
    _WANT_READ = _lib.SSL_ERROR_WANT_READ
except (ImportError, AttributeError):  # pragma: no cover - another pyOpenSSL
    _lib = None

#: Bytes taken from the socket per read (Twisted's TCP transport reads
#: 64 KiB): a DATA message is up to 128 KiB, and each read is a trip
#: through the reactor, TLS and the link.  Side by side on the bench
#: machine, 256 KiB reads moved 15-20% more.
READ_SIZE = 1 << 18
#: Scratch space for one pass of records in or out.  Every link of the
#: process shares it: the reactor runs one callback at a time, and nothing
#: keeps a view of it past the call that filled it.
SCRATCH = 1 << 19
_scratch = None
#: The socket reads' buffer, shared the same way: OpenSSL copies what is
#: read into its BIO before the call returns.
_inbox = None


def _scratch_buffer():
    global _scratch
    if _scratch is None:
        _scratch = _ffi.new("char[]", SCRATCH)
    return _scratch


class LinkTLSProtocol(TLSMemoryBIOProtocol):
    def makeConnection(self, transport) -> None:
        TLSMemoryBIOProtocol.makeConnection(self, transport)
        _read_in_large_pieces(transport)
        if _lib is not None:
            # One SSL_write takes a whole message (the BIO is memory, it
            # never blocks) instead of returning after every record.
            _lib.SSL_clear_mode(self._tlsConnection._ssl, _PARTIAL_WRITE)

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
        if _lib is None:  # pragma: no cover
            return TLSMemoryBIOProtocol._flushSendBIO(self)
        scratch = _scratch_buffer()
        bio = self._tlsConnection._from_ssl
        while True:
            n = _lib.BIO_read(bio, scratch, SCRATCH)
            if n <= 0:
                return
            self._send(_ffi.buffer(scratch, n))
            if n < SCRATCH:
                return

    def _send(self, data) -> None:
        """
        Hand C{data} (a view of the scratch buffer) to the socket now if
        nothing is queued before it; only what the socket does not take is
        copied, to wait for the reactor.
        """
        transport = self.transport
        sock = getattr(transport, "socket", None)
        sent = 0
        if not (sock is None or transport.dataBuffer or transport._tempDataBuffer
                or not transport.connected or transport.disconnecting):
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0  # full (EAGAIN), or broken: Twisted's write reports that
        if sent < len(data):
            transport.write(data[sent:])

    def _flushReceiveBIO(self) -> None:
        if _lib is None:  # pragma: no cover
            return TLSMemoryBIOProtocol._flushReceiveBIO(self)
        scratch = _scratch_buffer()
        ssl = self._tlsConnection._ssl
        got = 0
        while not self._lostTLSConnection:
            if got == SCRATCH:
                self._deliver(got)
                got = 0
            n = _lib.SSL_read(ssl, scratch + got, SCRATCH - got)
            if n > 0:
                got += n
                continue
            if _lib.SSL_get_error(ssl, n) == _WANT_READ:
                break
            # The end of TLS (clean or not): deliver what came before it,
            # then let Twisted read the ending again and handle it as always.
            self._deliver(got)
            return TLSMemoryBIOProtocol._flushReceiveBIO(self)
        self._deliver(got)
        self._flushSendBIO()

    def _deliver(self, size: int) -> None:
        if size and not self._aborted:
            ProtocolWrapper.dataReceived(self, _ffi.buffer(_scratch, size)[:])


def _read_in_large_pieces(transport) -> None:
    """
    Make a TCP transport read L{READ_SIZE} bytes at a time.  Its read
    size is also its write buffer's pause threshold (C{bufferSize}), which
    must stay as it is, so only the read is replaced, as Twisted's own.
    """
    sock = getattr(transport, "socket", None)
    if sock is None or not hasattr(transport, "doRead"):
        return  # not a TCP transport (tests): nothing to tune
    recv_into = sock.recv_into

    def doRead():
        global _inbox
        if _inbox is None:
            _inbox = memoryview(bytearray(READ_SIZE))
        try:
            n = recv_into(_inbox)
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not n:
            return main.CONNECTION_DONE
        transport.protocol.dataReceived(_inbox[:n])
        return None

    transport.doRead = doRead


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

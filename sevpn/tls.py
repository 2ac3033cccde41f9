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

The fence.  This fast path uses what is not public API, every piece of it
resolved once, at import (L{_resolve}):

 - Twisted's L{TLSMemoryBIOProtocol}: C{_write}, C{_flushSendBIO},
   C{_flushReceiveBIO}, C{_bufferedWrite}, C{_tlsShutdownFinished},
   C{_lostTLSConnection}, C{_aborted}, and the instance's C{_tlsConnection};
 - Twisted's TCP transport: C{dataBuffer}, C{_tempDataBuffer}, C{connected},
   C{disconnecting}, C{socket}, and its C{doRead}, replaced per connection;
 - pyOpenSSL's cffi binding C{OpenSSL._util} (C{ffi}, C{lib.BIO_read},
   C{lib.SSL_read}, C{lib.SSL_get_error}, C{lib.SSL_clear_mode},
   C{lib.ERR_clear_error}, C{lib.SSL_MODE_ENABLE_PARTIAL_WRITE},
   C{lib.SSL_ERROR_WANT_READ}) and C{Connection._ssl}/C{Connection._from_ssl}.

If any is missing, links use Twisted's plain L{TLSMemoryBIOProtocol} (same
bytes, slower) and one log line says why.

The UDP channel's keys (L{keying_material}) come through a second, smaller
fence, resolved at import too: Twisted's C{TLSMemoryBIOProtocol.getHandle}
(public, but documented as meant for certificates) and pyOpenSSL's
C{Connection.export_keying_material}.  Without them there are no keys, so
no UDP channel: cards and the hub stay on TLS over TCP
(L{EXPORTER_MISSING} says why; tests/test_channel.py runs that fallback).  setup.cfg bounds the versions
this was checked with; tests/test_tls.py runs the real-TLS tests through
both paths, including writes larger than the scratch buffer and partial
socket writes.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Tuple

from cryptography import x509
from OpenSSL.SSL import Error, WantReadError
from twisted.internet import main
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

#: Bytes taken from the socket per read (Twisted's TCP transport reads
#: 64 KiB): a DATA message is up to 128 KiB, and each read is a trip
#: through the reactor, TLS and the link.  Side by side on the bench
#: machine, 256 KiB reads moved 15-20% more.
READ_SIZE = 1 << 18
#: Scratch space for one pass of records in or out.  Every link of the
#: process shares it: the reactor runs one callback at a time, and nothing
#: keeps a view of it past the call that filled it.
SCRATCH = 1 << 19

_TWISTED_TLS = ("_write", "_flushSendBIO", "_flushReceiveBIO", "_bufferedWrite", "_tlsShutdownFinished",
                "_lostTLSConnection", "_aborted")
_OPENSSL = ("BIO_read", "SSL_read", "SSL_get_error", "SSL_clear_mode", "ERR_clear_error",
            "SSL_MODE_ENABLE_PARTIAL_WRITE", "SSL_ERROR_WANT_READ")


def _resolve() -> Tuple[Optional[SimpleNamespace], Optional[str]]:
    """The private pieces the fast path needs, or None and why not."""
    missing = [name for name in _TWISTED_TLS if not hasattr(TLSMemoryBIOProtocol, name)]
    if missing:
        return None, f"Twisted's TLSMemoryBIOProtocol lacks {', '.join(missing)}"
    try:
        from twisted.internet import abstract, tcp

        probe = abstract.FileDescriptor(reactor=object())
        missing = [n for n in ("dataBuffer", "_tempDataBuffer", "connected", "disconnecting") if not hasattr(probe, n)]
        if missing or not hasattr(tcp.Connection, "doRead"):
            return None, f"Twisted's TCP transport lacks {', '.join(missing) or 'doRead'}"
    except Exception as e:  # an unexpected shape: the plain path is always right
        return None, f"Twisted's TCP transport could not be checked ({e})"
    try:
        from OpenSSL import SSL
        from OpenSSL._util import ffi, lib

        lib_names = {name: getattr(lib, name) for name in _OPENSSL}
        connection = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        connection._ssl, connection._from_ssl  # noqa: B018 - the probe
    except (ImportError, AttributeError) as e:
        return None, f"pyOpenSSL's binding is not the one this was checked with ({e})"
    return SimpleNamespace(ffi=ffi, lib=lib, **lib_names), None


def _resolve_exporter() -> Optional[str]:
    """Why TLS keying material cannot be exported here, or None if it can."""
    from OpenSSL import SSL

    if not callable(getattr(TLSMemoryBIOProtocol, "getHandle", None)):
        return "Twisted's TLSMemoryBIOProtocol has no getHandle"
    if not callable(getattr(SSL.Connection, "export_keying_material", None)):
        return "pyOpenSSL's Connection has no export_keying_material"
    return None


#: Why the UDP channel cannot have keys here (None: it can).
EXPORTER_MISSING = _resolve_exporter()


def keying_material(transport, label: bytes, length: int, context: bytes) -> Optional[bytes]:
    """
    C{length} bytes exported (RFC 5705) from the TLS session under a link:
    C{transport} is the link's transport, the TLS protocol.  Both ends of
    one session get the same bytes for the same label and context.  None
    where there is nothing to export from: no fence (L{EXPORTER_MISSING}),
    a transport that is not TLS, a handshake not finished.
    """
    if EXPORTER_MISSING is not None:
        return None
    get_handle = getattr(transport, "getHandle", None)
    export = getattr(get_handle() if get_handle is not None else None, "export_keying_material", None)
    if export is None:
        return None
    try:
        material = export(label, length, context)
    except Error:
        return None
    return material if isinstance(material, bytes) and len(material) == length else None


_fast, FALLBACK_REASON = _resolve()
if _fast is None:
    log.warn("TLS fast path off, links use Twisted's plain TLS (slower): {why}", why=FALLBACK_REASON)

_scratch = None
#: The socket reads' buffer, shared the same way: OpenSSL copies what is
#: read into its BIO before the call returns.
_inbox = None


def fast_path() -> bool:
    """Whether links use the fast path."""
    return _fast is not None


def _scratch_buffer():
    global _scratch
    if _scratch is None:
        _scratch = _fast.ffi.new("char[]", SCRATCH)
    return _scratch


class LinkTLSProtocol(TLSMemoryBIOProtocol):
    """L{TLSMemoryBIOProtocol} with the fast path; see the module docstring."""

    def makeConnection(self, transport) -> None:
        """Twisted's, then large reads and whole-message writes."""
        TLSMemoryBIOProtocol.makeConnection(self, transport)
        _read_in_large_pieces(transport)
        # One SSL_write takes a whole message (the BIO is memory, it never
        # blocks) instead of returning after every record.
        _fast.SSL_clear_mode(self._tlsConnection._ssl, _fast.SSL_MODE_ENABLE_PARTIAL_WRITE)

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
        scratch = _scratch_buffer()
        bio = self._tlsConnection._from_ssl
        bio_read, buffer = _fast.BIO_read, _fast.ffi.buffer
        while True:
            n = bio_read(bio, scratch, SCRATCH)
            if n <= 0:
                return
            self._send(buffer(scratch, n))
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
        scratch = _scratch_buffer()
        ssl = self._tlsConnection._ssl
        ssl_read, get_error, clear = _fast.SSL_read, _fast.SSL_get_error, _fast.ERR_clear_error
        got = 0
        while not self._lostTLSConnection:
            if got == SCRATCH:
                self._deliver(got)
                got = 0
            # SSL_get_error is only right with an empty error queue before the call.
            clear()
            n = ssl_read(ssl, scratch + got, SCRATCH - got)
            if n > 0:
                got += n
                continue
            if get_error(ssl, n) == _fast.SSL_ERROR_WANT_READ:
                break
            # The end of TLS (clean or not): deliver what came before it,
            # then let Twisted read the ending again and handle it as always.
            # The error queue is left as this read left it: after a fatal
            # alert (the hub refusing this card's certificate) it holds the
            # only record of why, which Twisted's read then reports.
            self._deliver(got)
            return TLSMemoryBIOProtocol._flushReceiveBIO(self)
        self._deliver(got)
        self._flushSendBIO()

    def _deliver(self, size: int) -> None:
        if size and not self._aborted:
            ProtocolWrapper.dataReceived(self, _fast.ffi.buffer(_scratch, size)[:])


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


def peer_certificate(transport) -> Optional[x509.Certificate]:
    """
    The certificate the peer of a TLS C{transport} presented, or None (also
    for a transport that is not TLS).  Public API only
    (C{ISSLTransport.getPeerCertificate}).  On the hub a certificate that
    is there was verified: its TLS options (L{sevpn.pki.server_tls_options})
    fail the handshake of one that does not chain to its CA.
    """
    get = getattr(transport, "getPeerCertificate", None)
    cert = get() if get is not None else None
    return cert.to_cryptography() if cert is not None else None


class TLSFactory(TLSMemoryBIOFactory):
    """Wraps links in TLS: the fast path when it resolved, else Twisted's plain one."""

    @property
    def protocol(self):
        """The fast path's protocol if it resolved, else Twisted's plain one."""
        return LinkTLSProtocol if _fast is not None else TLSMemoryBIOProtocol


@implementer(IStreamClientEndpoint)
class TLSClientEndpoint:
    """C{wrapClientTLS}, with L{TLSFactory}."""

    def __init__(self, options, endpoint) -> None:
        self.options = options
        self.endpoint = endpoint

    def connect(self, factory):
        """Connect, wrap in TLS, fire with the caller's protocol."""
        d = self.endpoint.connect(TLSFactory(self.options, True, factory))
        return d.addCallback(lambda tls: tls.wrappedProtocol)

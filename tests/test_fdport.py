"""The reactor half of a descriptor-read port."""

from __future__ import annotations

from twisted.internet.interfaces import IReadDescriptor
from twisted.trial.unittest import SynchronousTestCase

from sevpn.fdport import DescriptorPort


class FakeReactor:
    def __init__(self):
        self.readers = []

    def addReader(self, reader):
        self.readers.append(reader)

    def removeReader(self, reader):
        self.readers.remove(reader)


class Reader(DescriptorPort):
    def __init__(self, reactor, fd):
        super().__init__("reader", reactor)
        self.reactor = reactor
        self.fd = fd

    def doRead(self):
        pass

    def logPrefix(self):
        return "reader"


class DescriptorPortTests(SynchronousTestCase):
    def test_reading_starts_and_stops_once(self):
        reactor = FakeReactor()
        port = Reader(reactor, 7)
        self.assertTrue(IReadDescriptor.providedBy(port))
        self.assertEqual(port.fileno(), 7)
        port.start_reading()
        port.start_reading()
        self.assertEqual(reactor.readers, [port])
        port.stop_reading()
        port.stop_reading()
        self.assertEqual(reactor.readers, [])

    def test_a_closed_descriptor_is_not_read(self):
        reactor = FakeReactor()
        port = Reader(reactor, -1)
        port.start_reading()
        self.assertEqual((reactor.readers, port.reading), ([], False))

    def test_the_reactor_letting_go_stops_reading(self):
        reactor = FakeReactor()
        port = Reader(reactor, 7)
        port.start_reading()
        port.connectionLost(None)
        self.assertFalse(port.reading)

"""
Many virtual LAN cards without TAP devices, for the hub's session-scaling
benchmark: each is a real L{sevpn.card.Card} (TLS, hello, keepalives,
reconnecting) whose TAP is a null device.

    python scripts/idle_cards.py COUNT HOST:PORT USER PASSWORD_FILE CA_FILE
    python scripts/idle_cards.py COUNT HOST:PORT USER CERT_FILE:KEY_FILE CA_FILE

With a certificate and key instead of a password file they log in with
the certificate (no password check on the hub).  SOURCES=N (a hub on
loopback) spreads them over N source addresses 127.1.x.y, as a fleet of
cards comes from many addresses: the hub's bounds per address (handshakes
at once, new connections a second) hold as they would.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import reactor  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint  # noqa: E402
from twisted.python import log  # noqa: E402

from sevpn.accounts import Account  # noqa: E402
from sevpn.card import Card, NicSide  # noqa: E402
from sevpn.mac import generate_mac  # noqa: E402
from sevpn.port import Port  # noqa: E402
from sevpn.cardservice import tls_endpoint_for  # noqa: E402
from sevpn.pki import client_tls_options, load_client_identity  # noqa: E402
from sevpn.tls import TLSClientEndpoint  # noqa: E402
from sevpn.users import read_password_file  # noqa: E402


class NullTap(Port):
    """A TAP that is not there: takes nothing from the OS, drops what it is given."""

    carrier = False

    def __init__(self):
        super().__init__("null", reactor)

    def transmit(self, frames):
        pass

    def set_carrier(self, on):
        self.carrier = on


def from_source(source: str):
    """An endpoint factory like the card's, dialling from address C{source}."""

    def endpoint_for(account: Account):
        identity = load_client_identity(account.cert_file, account.key_file) if account.cert_file else None
        options = client_tls_options(account.ca_file, account.server_name or account.nodes[0][1], identity)
        return [TLSClientEndpoint(options, TCP4ClientEndpoint(reactor, host, port, bindAddress=(source, 0)))
                for _, host, port in account.nodes]

    return endpoint_for


def main():
    count, hub, user, secret, ca_file = sys.argv[1:6]
    if ":" in secret:
        cert_file, key_file = secret.split(":", 1)
        login = dict(password=None, cert_file=cert_file, key_file=key_file)
    else:
        login = dict(password=read_password_file(secret).decode())
    sources = int(os.environ.get("SOURCES", "0"))
    dialers = ([from_source(f"127.1.{n // 250}.{n % 250 + 1}") for n in range(sources)] if sources
               else [tls_endpoint_for(reactor)])
    cards = []

    def start(i):
        if i >= int(count):
            return
        card = Card(reactor, NicSide(NullTap()), generate_mac(), dialers[i % len(dialers)])
        card.connect(Account(name=f"idle{i}", hub=hub, user=user, ca_file=ca_file, **login))
        cards.append(card)
        reactor.callLater(0.005, start, i + 1)

    def report():
        connected = sum(1 for c in cards if c.state == "connected")
        print(f"{connected} of {count} idle cards connected", flush=True)
        reactor.callLater(2, report)

    if os.environ.get("IDLE_CARDS_LOG"):
        log.startLogging(sys.stdout)
    reactor.callWhenRunning(start, 0)
    reactor.callLater(2, report)
    reactor.run()


if __name__ == "__main__":
    main()

"""
Many virtual LAN cards without TAP devices, for the hub's session-scaling
benchmark: each is a real L{sevpn.card.Card} (TLS, hello, keepalives,
reconnecting) whose TAP is a null device.

    python scripts/idle_cards.py COUNT HOST:PORT USER PASSWORD_FILE CA_FILE
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import reactor  # noqa: E402
from twisted.python import log  # noqa: E402

from sevpn.accounts import Account  # noqa: E402
from sevpn.card import Card, NicSide  # noqa: E402
from sevpn.mac import generate_mac  # noqa: E402
from sevpn.port import Port  # noqa: E402
from sevpn.cardservice import tls_endpoint_for  # noqa: E402
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


def main():
    count, hub, user, password_file, ca_file = sys.argv[1:6]
    password = read_password_file(password_file).decode()
    endpoint_for = tls_endpoint_for(reactor)
    cards = []

    def start(i):
        if i >= int(count):
            return
        card = Card(reactor, NicSide(NullTap()), generate_mac(), endpoint_for)
        card.connect(Account(name=f"idle{i}", hub=hub, user=user, password=password, ca_file=ca_file))
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

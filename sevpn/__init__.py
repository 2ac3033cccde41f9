"""
sevpn: a layer-2 VPN after SoftEther's virtual HUB and virtual LAN card.

A virtual HUB (L{sevpn.hub}) is an Ethernet switch in software; a virtual
LAN card (L{sevpn.card}) is a Linux TAP device whose frames cross the hub
over TLS.  Pure logic lives in L{sevpn.wire}, L{sevpn.switch},
L{sevpn.sequencing}, L{sevpn.timing}; Twisted adapters in
L{sevpn.connection}; wiring in the services and twistd plugins.
"""

__version__ = "0.1.0"

"""
The node's bridge as backplane: how the workers of one hub (C{--workers
N}) make one switch per virtual hub.

Each worker process has its own switch per virtual hub (L{VirtualHub})
and its own cards.  To join them, every worker gives each virtual hub a
TAP port (L{TapPort}: backpressure, carrier on, room for the whole MAC
table), and the TAPs of one virtual hub are ports of one Linux bridge::

    worker 0: VirtualHub DEFAULT ── TAP vs-DEFAULT-0 ─┐
    worker 1: VirtualHub DEFAULT ── TAP vs-DEFAULT-1 ─┼─ bridge br-DEFAULT
    worker 2: VirtualHub DEFAULT ── TAP vs-DEFAULT-2 ─┘

A frame from a card to a card of another worker leaves its worker through
the TAP, the bridge forwards it to the other worker's TAP, and that
worker's switch hands it to the card.  Broadcast and unknown unicast go to
every other TAP once and no switch sends a frame back out of the port it
came in on, so each card gets a broadcast once and there are no loops
(the bridge has no STP and needs none: it is the only path between the
workers).

The bridge learns where a MAC is from the frames crossing it, which are
exactly the frames whose way it decides, so no FDB entries are written
here (L{sevpn.netlink.FdbReflector} is the fabric's need: FRR advertises
only what is in the FDB, including MACs whose frames never leave their
worker).

A virtual hub in the fabric (C{--fabric HUB=VNI}) has its backplane
already: each worker's fabric port (L{sevpn.fabricport}, the TAP
C{Segment.tap_name(worker)} in C{br-VNI}, made by C{sevpn fabric up})
joins the node's workers as it joins the nodes; no second TAP is made
for it here.  Any other virtual hub gets C{br-HUB} and C{vs-HUB-WORKER} when those fit
Linux's 15 characters, else names made from a hash of the hub's name
(C{bh-…}, C{vh…-WORKER}); the hub makes these bridges (the main process
before the workers start, a worker for a virtual hub created while it
runs) and removes them when it stops, unless other ports are still in
them.  Two hubs in one network namespace serving a virtual hub of the same
name would meet in its bridge; the second one's TAPs collide with the
first's (the TAP is in use) and it refuses to start.

Bridges are made with C{addrgenmode none} (the node is the segment's
switch, not a host on it: no router solicitations, no MLD), multicast
snooping off (the virtual hubs flood multicast; so does the backplane),
and C{group_fwd_mask 0xfff8} (LLDP, 802.1X and the like cross as they do
inside one worker's switch).  The worker TAPs get C{addrgenmode none} too,
before their carrier goes on, and the largest MTU (the virtual hubs carry
whatever frames the cards send; a bridge port of a smaller MTU, a fabric
segment's VXLAN device, limits only what goes out there).

Link changes are blocking rtnetlink requests (L{Links}): made at start
and when a virtual hub appears, microseconds each, never on the data path.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from twisted.logger import Logger

from sevpn.fabric import FabricError, Segment, check_ifname
from sevpn.netlink import (
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSGHDR,
    Message, NetlinkError, attribute, attributes, parse_ack, parse_messages,
)

#: The MTU of a worker TAP outside a fabric: the largest a TAP takes (64 KiB less its Ethernet header).
TAP_MTU = 65521

# linux/rtnetlink.h, linux/if_link.h, linux/if.h
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
IFLA_IFNAME, IFLA_MTU, IFLA_MASTER, IFLA_LINKINFO, IFLA_AF_SPEC = 3, 4, 10, 18, 26
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_BR_STP_STATE, IFLA_BR_GROUP_FWD_MASK, IFLA_BR_MCAST_SNOOPING = 5, 9, 23
IFLA_INET6_ADDR_GEN_MODE, IN6_ADDR_GEN_MODE_NONE = 8, 1
NLA_F_NESTED = 0x8000
IFF_UP = 0x1
#: Every link-local group a Linux bridge may forward (01:80:C2:00:00:00-02 it never does).
GROUP_FWD_MASK = 0xFFF8

_IFINFOMSG = struct.Struct("=BxHiII")


class BackplaneError(Exception):
    """The backplane cannot be made; the message is the sentence for the operator."""


# names ---------------------------------------------------------------------------


def _digest(hub: str) -> str:
    return hashlib.sha256(hub.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Backplane:
    """
    A virtual hub's bridge on this node and its workers' TAP ports in it.

    @ivar segment: the virtual hub's fabric segment, if it is in the
        fabric: its names, and its bridge is made by C{sevpn fabric up}.
    """

    hub: str
    bridge: str
    segment: Optional[Segment] = None

    @property
    def managed(self) -> bool:
        """Whether the hub makes and removes the bridge (not in a fabric)."""
        return self.segment is None

    @property
    def mtu(self) -> int:
        return self.segment.mtu if self.segment is not None else TAP_MTU

    def tap_name(self, worker: int) -> str:
        """Worker C{worker}'s TAP port in the bridge."""
        if self.segment is not None:
            return self.segment.tap_name(worker)
        name = f"vs-{self.hub}-{worker}"
        if len(name.encode()) > 15 or len(self.hub.encode()) > 8:
            # A name that fits for worker 0 but not for worker 100 would
            # make one hub's TAPs look like two hubs': hash from 9 characters.
            name = f"vh{_digest(self.hub)[:8]}-{worker}"
        return check_ifname(name, "TAP name")


def backplane_for(hub: str, segments: Sequence[Segment] = ()) -> Backplane:
    """The backplane of virtual hub C{hub}: its fabric segment's, if it has one."""
    for segment in segments:
        if segment.hub == hub:
            return Backplane(hub, segment.bridge, segment)
    bridge = f"br-{hub}"
    if len(bridge.encode()) > 15:
        bridge = f"bh-{_digest(hub)[:12]}"
    taken = {s.bridge: s for s in segments}
    if bridge in taken:
        raise BackplaneError(f"virtual hub {hub}'s bridge would be {bridge}, the bridge of VNI "
                             f"{taken[bridge].vni} (virtual hub {taken[bridge].hub}): rename one of them")
    try:
        return Backplane(hub, check_ifname(bridge, "bridge name"))
    except FabricError as e:
        raise BackplaneError(f"virtual hub {hub}: {e}")


# rtnetlink -------------------------------------------------------------------------


def _nest(kind: int, *inner: bytes) -> bytes:
    return attribute(kind | NLA_F_NESTED, b"".join(inner))


def encode_link(kind: int, flags: int, seq: int, index: int = 0, ifi_flags: int = 0, change: int = 0,
                attrs: bytes = b"") -> bytes:
    """One C{RTM_*LINK} request."""
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, ifi_flags, change) + attrs
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def bridge_attributes(name: str) -> bytes:
    """What C{ip link add NAME type bridge stp_state 0 mcast_snooping 0 group_fwd_mask 0xfff8} sends."""
    return attribute(IFLA_IFNAME, name.encode() + b"\0") + _nest(
        IFLA_LINKINFO,
        attribute(IFLA_INFO_KIND, b"bridge"),
        _nest(
            IFLA_INFO_DATA,
            attribute(IFLA_BR_STP_STATE, struct.pack("=I", 0)),
            attribute(IFLA_BR_GROUP_FWD_MASK, struct.pack("=H", GROUP_FWD_MASK)),
            attribute(IFLA_BR_MCAST_SNOOPING, struct.pack("=B", 0)),
        ),
    )


def no_addresses_attribute() -> bytes:
    """C{addrgenmode none}: no IPv6 link-local address (so nothing sent from it)."""
    return _nest(IFLA_AF_SPEC, _nest(socket.AF_INET6, attribute(IFLA_INET6_ADDR_GEN_MODE, b"\x01")))


@dataclass(frozen=True)
class LinkInfo:
    """What the kernel says of one network device."""

    index: int
    name: str
    kind: str
    master: Optional[int]
    up: bool


def parse_link(message: Message) -> LinkInfo:
    """An C{RTM_NEWLINK} message (an answer to C{RTM_GETLINK})."""
    if len(message.body) < _IFINFOMSG.size:
        raise NetlinkError(f"a link message of {len(message.body)} bytes is truncated")
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(message.body)
    attrs = attributes(message.body, _IFINFOMSG.size)
    name = attrs.get(IFLA_IFNAME, b"").split(b"\0", 1)[0].decode("utf-8", "replace")
    master = attrs.get(IFLA_MASTER)
    kind = b""
    if IFLA_LINKINFO in attrs:
        kind = attributes(attrs[IFLA_LINKINFO], 0).get(IFLA_INFO_KIND, b"").split(b"\0", 1)[0]
    return LinkInfo(index, name, kind.decode("ascii", "replace"),
                    struct.unpack("=I", master)[0] if master is not None and len(master) == 4 else None,
                    bool(flags & IFF_UP))


class Links:
    """
    Blocking rtnetlink requests for the backplane's devices, in this
    process's network namespace: for start-up and a new virtual hub, never
    for the data path.  Errors are L{OSError}s with the kernel's words.
    """

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self._seq = 0

    def _request(self, kind: int, flags: int, **fields) -> List[Message]:
        self._seq += 1
        seq = self._seq
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        replies: List[Message] = []
        try:
            sock.settimeout(self.timeout)
            sock.bind((0, 0))
            sock.send(encode_link(kind, flags | NLM_F_REQUEST | NLM_F_ACK, seq, **fields))
            while True:
                for message in parse_messages(sock.recv(1 << 16)):
                    if message.seq != seq:
                        continue
                    if message.type == NLMSG_ERROR:
                        ack = parse_ack(message)
                        if ack.errno:
                            raise OSError(ack.errno, ack.sentence())
                        return replies
                    if message.type == NLMSG_DONE:
                        return replies
                    replies.append(message)
        finally:
            sock.close()

    def get(self, name: str) -> Optional[LinkInfo]:
        """The device C{name}, or None."""
        try:
            index = socket.if_nametoindex(name)
        except OSError:
            return None
        try:
            replies = self._request(RTM_GETLINK, 0, index=index)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == 19:  # ENODEV: gone in between
                return None
            raise
        return parse_link(replies[0]) if replies else None

    def ports(self, bridge: int) -> List[str]:
        """The names of the ports of the bridge with index C{bridge}."""
        return [link.name for link in map(parse_link, self._request(RTM_GETLINK, NLM_F_DUMP))
                if link.master == bridge]

    def add_bridge(self, name: str) -> None:
        """Make bridge C{name} (see the module docstring), up; L{OSError} C{EEXIST} if a device has that name."""
        self._request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, attrs=bridge_attributes(name))
        index = socket.if_nametoindex(name)
        self._no_addresses(index)
        self._request(RTM_NEWLINK, 0, index=index, ifi_flags=IFF_UP, change=IFF_UP)

    def join(self, port: str, bridge: str, mtu: int) -> None:
        """Make device C{port} a port of C{bridge}: no addresses of its own, C{mtu}, up."""
        index = socket.if_nametoindex(port)
        self._no_addresses(index)
        self._request(
            RTM_NEWLINK, 0, index=index, ifi_flags=IFF_UP, change=IFF_UP,
            attrs=attribute(IFLA_MTU, struct.pack("=I", mtu))
            + attribute(IFLA_MASTER, struct.pack("=I", socket.if_nametoindex(bridge))),
        )

    def delete(self, name: str) -> None:
        self._request(RTM_DELLINK, 0, index=socket.if_nametoindex(name))

    def _no_addresses(self, index: int) -> None:
        try:
            self._request(RTM_NEWLINK, 0, index=index, attrs=no_addresses_attribute())
        except OSError as e:
            if e.errno not in (97, 95):  # EAFNOSUPPORT, EOPNOTSUPP: no IPv6 here, so no addresses anyway
                raise


# the node's bridges (the main process) ----------------------------------------------


def ensure_bridge(backplane: Backplane, links: Links) -> bool:
    """
    The bridge of C{backplane} (one the hub manages) exists and is up:
    made if missing; True if it was made now.  Raises L{BackplaneError}
    with a sentence.
    """
    name = backplane.bridge
    try:
        link = links.get(name)
        if link is not None:
            if link.kind != "bridge":
                raise BackplaneError(f"virtual hub {backplane.hub}'s backplane bridge {name} exists but is a "
                                     f"{link.kind or 'plain'} device: remove it ('ip link del {name}')")
            return False
        try:
            links.add_bridge(name)
        except FileExistsError:
            return False  # another worker made it just now
        return True
    except PermissionError:
        raise BackplaneError(f"cannot make bridge {name} for virtual hub {backplane.hub}: the hub needs "
                             "CAP_NET_ADMIN for --workers")
    except OSError as e:
        raise BackplaneError(f"cannot make bridge {name} for virtual hub {backplane.hub}: {e.strerror or e}")


def remove_bridge(backplane: Backplane, links: Links) -> Optional[str]:
    """
    Remove a bridge the hub manages once no port is left in it; a sentence
    saying what was done (or kept, and why), or None if there was nothing.
    """
    if not backplane.managed:
        return None
    try:
        link = links.get(backplane.bridge)
        if link is None or link.kind != "bridge":
            return None
        ports = links.ports(link.index)
        if ports:
            return f"kept bridge {backplane.bridge}: {', '.join(sorted(ports))} still in it"
        links.delete(backplane.bridge)
        return f"removed bridge {backplane.bridge}"
    except OSError as e:
        return f"could not remove bridge {backplane.bridge}: {e.strerror or e}"


def netfilter_warning(proc: str = "/proc/sys/net/bridge") -> Optional[str]:
    """
    A sentence if bridged frames go through the host's iptables here
    (C{br_netfilter} with C{bridge-nf-call-*} on, as Docker sets it):
    then frames between workers cross the FORWARD chain and connection
    tracking, and a FORWARD policy of DROP cuts cards on different
    workers apart.  The setting belongs to the whole network namespace,
    so the hub only says so.
    """
    on = []
    for family in ("iptables", "ip6tables", "arptables"):
        try:
            with open(os.path.join(proc, f"bridge-nf-call-{family}")) as f:
                if f.read().strip() == "1":
                    on.append(f"net.bridge.bridge-nf-call-{family}")
        except OSError:
            continue  # no br_netfilter: bridged frames never meet iptables
    if not on:
        return None
    return (f"{', '.join(on)} {'is' if len(on) == 1 else 'are'} 1 in this network namespace (br_netfilter): "
            "frames between the hub's workers go through this host's firewall rules and connection tracking, "
            "and a FORWARD policy of DROP cuts cards on different workers apart; set "
            f"{'them' if len(on) > 1 else 'it'} to 0 unless something here needs it")


# one worker's ports ------------------------------------------------------------------


class WorkerBackplane:
    """
    One worker's TAP ports, one per virtual hub, each in its virtual hub's
    bridge.  L{attach} is the hub's hook for a new virtual hub
    (C{Hub.vhub_added}); at start every virtual hub of the state dir gets
    its port before any card arrives.

    @param plan: the L{Backplane} of a virtual hub, by name.
    @param tap_port: makes the TAP port (L{TapPort}'s signature; tests).
    """

    log = Logger()

    def __init__(self, worker: int, reactor, plan: Callable[[str], Backplane], links: Optional[Links] = None,
                 tap_port=None) -> None:
        if tap_port is None:
            from sevpn.tapdevice import TapPort as tap_port
        self.worker = worker
        self.reactor = reactor
        self.plan = plan
        self.links = links or Links()
        self.tap_port = tap_port
        #: virtual hub name -> (virtual hub, its TAP port, its backplane)
        self.ports: Dict[str, Tuple[object, object, Backplane]] = {}

    def attach(self, vhub) -> None:
        """Give C{vhub} this worker's port in its bridge; L{BackplaneError} with a sentence."""
        from sevpn.tapdevice import TapError

        if vhub.name in self.ports:
            return
        backplane = self.plan(vhub.name)
        if backplane.segment is not None:
            return  # in the fabric: the worker's fabric port (sevpn.fabricport) is its backplane port
        name = backplane.tap_name(self.worker)
        ensure_bridge(backplane, self.links)
        try:
            tap = self.tap_port(name, None, self.reactor, offload=True, backpressure=True,
                                max_macs=vhub.max_entries, label=f"backplane:{name}")
        except TapError as e:
            raise BackplaneError(f"virtual hub {vhub.name}'s backplane port: {e}")
        try:
            self.links.join(name, backplane.bridge, backplane.mtu)
        except OSError as e:
            tap.close()
            raise BackplaneError(f"cannot put {name} into bridge {backplane.bridge}: {e.strerror or e}")
        tap.set_carrier(True)
        vhub.add_port(tap)
        tap.start_reading()
        self.ports[vhub.name] = (vhub, tap, backplane)
        self.log.info("virtual hub {hub}: backplane port {tap} in bridge {bridge}",
                      hub=vhub.name, tap=name, bridge=backplane.bridge)

    def vhub_added(self, vhub) -> None:
        """The hub's hook: a virtual hub appeared while running (failures are logged, not raised)."""
        try:
            self.attach(vhub)
        except BackplaneError as e:
            self.log.error("{why}; its cards on this worker do not reach those on other workers", why=str(e))

    def port(self, hub: str):
        """This worker's port in virtual hub C{hub}'s bridge, or None."""
        entry = self.ports.get(hub)
        return entry[1] if entry is not None else None

    def owns(self, port) -> bool:
        """Whether C{port} is one of this worker's backplane ports."""
        return any(port is tap for _, tap, _ in self.ports.values())

    def close(self) -> None:
        for vhub, tap, _ in self.ports.values():
            vhub.remove_port(tap)
            tap.close()
        self.ports = {}

    def describe(self) -> List[dict]:
        return [
            {"hub": name, "bridge": backplane.bridge, "port": tap.device_name, "macs": len(tap.macs),
             **tap.counters()}
            for name, (vhub, tap, backplane) in sorted(self.ports.items())
        ]

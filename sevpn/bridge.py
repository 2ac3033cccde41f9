"""
Local bridges: a virtual hub's port on a real LAN.

C{twistd sevpn-hub --bridge HUB=IFACE} gives virtual hub C{HUB} a port on
the network interface C{IFACE} (L{RawBridgePort}): an C{AF_PACKET} raw
socket bound to it in promiscuous mode, so the LAN's frames enter the
virtual hub and the cards' frames leave on the LAN, and a card at home is
on the office LAN as if plugged into its switch.  C{--bridge-tap HUB=NAME}
gives it a TAP port instead (L{sevpn.tapdevice.TapPort}), which the
operator puts into a Linux bridge.

What the kernel does to frames on their way to a packet socket, and what
the port does about it:

 - B{VLAN tags}: an interface with VLAN offload (veth, most NICs) strips
   the 802.1Q tag into C{PACKET_AUXDATA}; the port reads it with
   C{recvmsg} and puts the tag back (L{insert_tag}), so tagged frames
   cross the hub unchanged.  Tagged frames sent out go out as they are.
 - B{Super-frames}: a veth hands over its peer's TSO frames whole (64 KiB,
   checksum partial), and GRO merges what a NIC receives.  The socket
   opens with C{PACKET_VNET_HDR}: frames come and go behind the same
   10-byte virtio-net header a card's TAP uses (C{mac_offset} 10), so
   super-frames cross the hub whole in both directions.  Switching offload
   off instead cannot work on a veth: its super-frames come from the
   peer's TSO, which the hub does not control.  Two kinds are not carried
   whole: UDP segmentation frames are segmented on arrival
   (L{sevpn.offload.segment_udp}), and LRO, whose merged frames carry no
   partial checksum, is switched off at start with one log line (as the
   Linux bridge does).
 - B{Our own frames}: what the hub sends is not read back (the kernel
   never loops a packet socket's frames to itself), and what the host
   itself sends on the interface (C{PACKET_OUTGOING}) or receives for its
   own MAC (C{PACKET_HOST}) is not the LAN's traffic for the cards: it is
   skipped and counted (else every card would be sent the host's unicast
   traffic, flooded to an unknown MAC).
 - B{Writes} are non-blocking C{send}s: a full device queue (C{ENOBUFS},
   C{EAGAIN}) drops the frame and counts it; a frame over the interface's
   MTU (C{EMSGSIZE}) likewise.  The port cannot pause its input: a LAN
   does not do flow control.

The LAN's MACs are learned on the port, up to L{BRIDGE_MAX_MACS}.

The host cannot reach the cards through the bridged interface (frames
from the cards to the host's own address on it go out on the wire, never
up the host's stack), which is why an interface carrying an address the
hub listens on is refused (L{listening_conflict}) unless forced.

Needs C{CAP_NET_RAW} (the socket) and C{CAP_NET_ADMIN} (promiscuous mode,
LRO, TAP devices).
"""

from __future__ import annotations

import array
import errno
import fcntl
import ipaddress
import socket
import struct
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from twisted.logger import Logger

from sevpn import offload as vnet
from sevpn import wire
from sevpn.fabric import FabricError, check_ifname
from sevpn.fdport import DescriptorPort
from sevpn.port import Port

#: Source MACs a bridge port may own: a LAN of a few thousand hosts (the
#: switch's table, shared by the virtual hub, is the other bound).
BRIDGE_MAX_MACS = 4096
#: Frames read per wakeup at most (as for a TAP).
READ_BUDGET = 256
READ_SIZE = wire.MAX_FRAME
#: Kernel buffer for the socket each way: with 64 KiB super-frames the
#: default (about 200 KiB) holds three.
SOCKET_BUFFER = 4 << 20

# linux/if_packet.h, linux/if_ether.h, linux/ethtool.h, linux/sockios.h
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_AUXDATA = 8
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
PACKET_MR_PROMISC = 1
PACKET_HOST, PACKET_BROADCAST, PACKET_MULTICAST, PACKET_OTHERHOST, PACKET_OUTGOING = 0, 1, 2, 3, 4
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6
ETH_P_ALL = 0x0003
ETH_P_8021Q = 0x8100
SO_RCVBUFFORCE, SO_SNDBUFFORCE = 33, 32
SIOCETHTOOL = 0x8946
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
IFF_UP = 0x1
ETHTOOL_GFLAGS, ETHTOOL_SFLAGS = 0x25, 0x26
ETH_FLAG_LRO = 1 << 15

#: struct tpacket_auxdata: status, len, snaplen, mac, net, vlan_tci, vlan_tpid.
_AUXDATA = struct.Struct("=IIIHHHH")
_AUX_SPACE = socket.CMSG_SPACE(_AUXDATA.size)
_VNET = vnet.HEADER
_MREQ = struct.Struct("=iHH8s")


class BridgeError(Exception):
    """A bridge cannot be made; the message is the sentence for the operator."""


# the option --------------------------------------------------------------------


def parse_bridge_option(text: str, option: str = "--bridge") -> Tuple[str, str]:
    """C{HUB=IFACE} -> (virtual hub, interface name); L{BridgeError} if malformed."""
    hub, sep, name = text.partition("=")
    if not sep or not hub or not name:
        raise BridgeError(f"{option} {text!r}: expected HUB=INTERFACE, e.g. {option} DEFAULT=eth1")
    if not wire.valid_name(hub):
        raise BridgeError(f"{option} {text!r}: {hub!r} is not a virtual hub name")
    try:
        check_ifname(name, "interface name")
    except FabricError as e:
        raise BridgeError(f"{option} {text!r}: {e}")
    return hub, name


# frames --------------------------------------------------------------------------


def vlan_tag(auxdata: bytes) -> Optional[bytes]:
    """The 802.1Q tag (TPID and TCI, 4 bytes) the kernel took off a frame, or None."""
    if len(auxdata) < _AUXDATA.size:
        return None
    status, _len, _snap, _mac, _net, tci, tpid = _AUXDATA.unpack_from(auxdata)
    if not status & TP_STATUS_VLAN_VALID:
        return None
    if not status & TP_STATUS_VLAN_TPID_VALID or not tpid:
        tpid = ETH_P_8021Q
    return struct.pack("!HH", tpid, tci)


def insert_tag(frame: bytes, offset: int, tag: bytes) -> bytes:
    """
    C{frame} with C{tag} back after its MAC addresses.  With an offload
    header (C{offset} 10) the checksum start and header length move with
    the data they point into, as the TAP driver does for the tags it puts
    back.
    """
    at = offset + 12
    out = frame[:at] + tag + frame[at:]
    if offset and len(frame) >= offset:
        flags, gso, hdr_len, gso_size, csum_start, csum_offset = _VNET.unpack_from(frame)
        if flags & vnet.F_NEEDS_CSUM:
            csum_start += len(tag)
        if gso != vnet.GSO_NONE:
            hdr_len += len(tag)
        out = _VNET.pack(flags, gso, hdr_len, gso_size, csum_start, csum_offset) + out[offset:]
    return out


# the listening check -------------------------------------------------------------


def listening_conflict(interface: str, addresses: Iterable[str], listening: Iterable[str]) -> Optional[str]:
    """
    Why bridging C{interface} (which has C{addresses}) would cut the hub
    off from the cards that reach it there, or None.  C{listening} are the
    addresses the hub listens on: C{0.0.0.0} stands for every IPv4
    address, C{::} for every address (link-local ones excepted: cards do
    not dial them).
    """
    mine = []
    for text in addresses:
        address = ipaddress.ip_address(text.split("%")[0])
        if not address.is_link_local:
            mine.append(address)
    for text in listening:
        wanted = ipaddress.ip_address(text.split("%")[0])
        for address in mine:
            if (
                address == wanted
                or (wanted == ipaddress.IPv4Address("0.0.0.0") and address.version == 4)
                or wanted == ipaddress.IPv6Address("::")
            ):
                return (
                    f"{interface} carries {address}, an address the hub listens on ({text}): cards that "
                    f"reach the hub there would lose it, since a bridged interface's frames go to the LAN, "
                    f"not to this host; bridge an interface without such an address, or give --bridge-force"
                )
    return None


# the interface ---------------------------------------------------------------------


def _ifreq_ioctl(name: str, request: int, value: int, *, ethtool: bool = False) -> int:
    """An C{ifreq} ioctl on C{name}: flags (C{SIOC[GS]IFFLAGS}) or an C{ethtool_value} command."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        if ethtool:
            command = array.array("I", [request, value])
            address, _ = command.buffer_info()
            fcntl.ioctl(sock.fileno(), SIOCETHTOOL, struct.pack("16sP16x", name.encode(), address))
            return command[1]
        answer = fcntl.ioctl(sock.fileno(), request, struct.pack("16sH22x", name.encode(), value))
        return struct.unpack_from("16sH", answer)[1]


def bring_up(name: str) -> bool:
    """Set C{name} up; True if it was down."""
    flags = _ifreq_ioctl(name, SIOCGIFFLAGS, 0)
    if flags & IFF_UP:
        return False
    _ifreq_ioctl(name, SIOCSIFFLAGS, flags | IFF_UP)
    return True


def disable_lro(name: str) -> bool:
    """Switch large receive offload off on C{name}; True if it was on."""
    try:
        flags = _ifreq_ioctl(name, ETHTOOL_GFLAGS, 0, ethtool=True)
    except OSError:
        return False  # no ethtool support: no LRO either
    if not flags & ETH_FLAG_LRO:
        return False
    _ifreq_ioctl(name, ETHTOOL_SFLAGS, flags & ~ETH_FLAG_LRO, ethtool=True)
    return True


def open_packet_socket(interface: str, offload: bool) -> socket.socket:
    """
    A non-blocking raw socket on C{interface} in promiscuous mode, with
    VLAN tags as ancillary data and (with C{offload}) virtio-net headers.
    It is made with protocol 0 (it hears nothing) and bound to the one
    interface with C{ETH_P_ALL}, so it never sees another interface's frames.
    """
    try:
        ifindex = socket.if_nametoindex(interface)
    except OSError:
        raise BridgeError(f"there is no network interface named {interface}")
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, 0)
    except PermissionError:
        raise BridgeError(f"cannot open a raw socket on {interface}: the hub needs CAP_NET_RAW (run it as root)")
    try:
        sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        if offload:
            sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        try:
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        except OSError:
            pass  # before Linux 4.20: the sll_pkttype check below does it
        for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
        sock.bind((interface, ETH_P_ALL))
        sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, _MREQ.pack(ifindex, PACKET_MR_PROMISC, 0, b""))
    except PermissionError:
        sock.close()
        raise BridgeError(f"cannot put {interface} into promiscuous mode: the hub needs CAP_NET_ADMIN")
    except OSError as e:
        sock.close()
        raise BridgeError(f"cannot bridge {interface}: {e.strerror}")
    return sock


class RawBridgePort(DescriptorPort):
    """
    A virtual hub's port on a real network interface (see the module
    docstring).  C{offload} opens it with virtio-net headers (super-frames
    cross whole); without, it reads and writes plain frames.
    """

    log = Logger()

    def __init__(self, interface: str, reactor, offload: bool = True, max_macs: int = BRIDGE_MAX_MACS,
                 sock: Optional[socket.socket] = None) -> None:
        """
        @param sock: the socket, already open (tests); by default
            L{open_packet_socket} opens one.
        """
        super().__init__(f"bridge:{interface}", reactor, mac_offset=vnet.HEADER_SIZE if offload else 0,
                         max_macs=max_macs)
        self.interface = interface
        self.reactor = reactor
        self.offload = offload
        self.sock = sock if sock is not None else open_packet_socket(interface, offload)
        self.fd = self.sock.fileno()
        self.reading = False
        self.frames_in = self.bytes_in = 0
        self.frames_out = self.bytes_out = 0
        #: Frames of the host's own (sent by it, or to its MAC): not the cards' business.
        self.host_frames = 0
        #: Frames longer than the read buffer.
        self.truncated = 0
        #: Sends the interface refused: its queue full, over its MTU, or it is down.
        self.write_drops = 0
        self.oversized_drops = 0
        self.down_drops = 0
        self._complained: Dict[str, int] = {}
        self._min_frame = self.mac_offset + wire.MIN_FRAME

    # reading -----------------------------------------------------------------

    def doRead(self) -> None:
        """
        Read up to L{READ_BUDGET} frames from the LAN and hand them to the
        hub in batches: the host's own frames, truncated and runt frames are
        skipped and counted; VLAN tags stripped by the kernel are put back.
        """
        recvmsg = self.sock.recvmsg
        offset = self.mac_offset
        frames: List[bytes] = []
        size = 0
        for _ in range(READ_BUDGET):
            try:
                frame, ancillary, flags, address = recvmsg(READ_SIZE, _AUX_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                # A socket error (the interface went down, or was down when
                # bound) is reported once, then reading goes on.
                self._read_failed(e)
                if e.errno == errno.ENETDOWN:
                    continue
                break
            if address[2] == PACKET_OUTGOING or address[2] == PACKET_HOST:
                self.host_frames += 1
                continue
            if flags & socket.MSG_TRUNC:
                self.truncated += 1
                continue
            if len(frame) < self._min_frame:
                self.bad_frames += 1
                continue
            for level, kind, data in ancillary:
                if kind == PACKET_AUXDATA and level == SOL_PACKET:
                    tag = vlan_tag(data)
                    if tag is not None:
                        frame = insert_tag(frame, offset, tag)
            if offset and frame[1] != vnet.GSO_NONE:
                if not self._super_frame(frame, frames):
                    continue
            else:
                frames.append(frame)
            size += len(frame)
            if size >= wire.MAX_BATCH:
                self._hand_over(frames)
                frames = []
                size = 0
        if frames:
            self._hand_over(frames)

    def _super_frame(self, frame: bytes, frames: List[bytes]) -> bool:
        """Add a segmentation frame to C{frames} as the hub carries it; False if dropped."""
        try:
            if frame[1] & ~vnet.GSO_ECN == vnet.GSO_UDP_L4:
                frames.extend(vnet.from_plain(f) for f in vnet.segment_udp(frame))
                return True
            vnet.check(frame)
        except vnet.BadFrame:
            self.bad_frames += 1
            return False
        frames.append(frame)
        return True

    def _hand_over(self, frames: List[bytes]) -> None:
        self.frames_in += len(frames)
        self.bytes_in += sum(map(len, frames)) - self.mac_offset * len(frames)
        sink = self.sink
        sink.forward(self, frames)
        sink.flush(self)

    def _read_failed(self, error: OSError) -> None:
        if error.errno == errno.ENETDOWN:
            self._complain("down", f"bridge {self.interface}: the interface is down; frames flow again once it is up")
        else:
            self._complain(f"read-{error.errno}", f"bridge {self.interface}: reading failed: {error.strerror}")

    def _complain(self, key: str, sentence: str) -> None:
        """Log a kind of failure once (counted after that)."""
        count = self._complained.get(key, 0)
        self._complained[key] = count + 1
        if not count:
            self.log.warn("{sentence}", sentence=sentence)

    def logPrefix(self) -> str:
        return f"bridge {self.interface}"

    # writing -----------------------------------------------------------------

    def transmit(self, frames: Sequence) -> None:
        """Send frames to the LAN; what the interface cannot take is dropped and counted."""
        send = self.sock.send
        valid = vnet.valid if self.offload else None
        sent = size = 0
        for frame in frames:
            if valid is not None and not valid(frame):
                self.bad_frames += 1
                continue
            try:
                send(frame)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.ENOBUFS):
                    self.write_drops += 1
                elif e.errno == errno.EMSGSIZE:
                    self.oversized_drops += 1
                elif e.errno in (errno.ENETDOWN, errno.ENXIO, errno.ENODEV):
                    self.down_drops += 1
                elif e.errno == errno.EINVAL:
                    self.bad_frames += 1
                else:
                    self.write_drops += 1
                    self._complain(f"write-{e.errno}", f"bridge {self.interface}: sending failed: {e.strerror}")
                continue
            sent += 1
            size += len(frame)
        self.frames_out += sent
        self.bytes_out += size - self.mac_offset * sent

    # life and status -----------------------------------------------------------

    def close(self) -> None:
        """Leave the LAN: stop reading and close the packet socket (once)."""
        if self.closed:
            return
        super().close()
        self.stop_reading()
        self.sock.close()
        self.fd = -1

    def counters(self) -> dict:
        info = super().counters()
        info.update(
            frames_in=self.frames_in, bytes_in=self.bytes_in, frames_out=self.frames_out, bytes_out=self.bytes_out,
            host_frames=self.host_frames, truncated=self.truncated, write_drops=self.write_drops,
            oversized_drops=self.oversized_drops, down_drops=self.down_drops,
        )
        return info


# attaching bridges to a hub's virtual hubs -----------------------------------------


def attach_bridges(
    vhub_for, reactor, interfaces: Sequence[Tuple[str, str]], taps: Sequence[Tuple[str, str]],
    listening: Sequence[str], force: bool = False,
) -> List[Tuple[object, Port]]:
    """
    Give virtual hubs their bridge ports: a L{RawBridgePort} per
    C{(hub, interface)} in C{interfaces}, a TAP port (carrier on, for a
    Linux bridge) per C{(hub, name)} in C{taps}.  C{vhub_for(name)} is the
    virtual hub of that name.  Returns (virtual hub, port) pairs for
    L{detach_bridges}; on a L{BridgeError} (a sentence naming the option)
    nothing stays attached.
    """
    from sevpn.netlink import interface_addresses
    from sevpn.tapdevice import TapError, TapPort

    log = RawBridgePort.log
    attached: List[Tuple[object, Port]] = []
    try:
        for hub_name, interface in interfaces:
            where = f"--bridge {hub_name}={interface}"
            try:
                ifindex = socket.if_nametoindex(interface)
            except OSError:
                raise BridgeError(f"{where}: there is no network interface named {interface}")
            if not force:
                why = listening_conflict(interface, interface_addresses(ifindex), listening)
                if why:
                    raise BridgeError(f"{where}: {why}")
            try:
                if bring_up(interface):
                    log.info("bridge {iface}: the interface was down; set it up", iface=interface)
                if disable_lro(interface):
                    log.info("bridge {iface}: switched large receive offload (LRO) off: its merged frames "
                             "cannot be forwarded", iface=interface)
            except PermissionError:
                raise BridgeError(f"{where}: cannot configure {interface}: the hub needs CAP_NET_ADMIN")
            except OSError as e:
                raise BridgeError(f"{where}: cannot configure {interface}: {e.strerror}")
            try:
                port = RawBridgePort(interface, reactor)
            except BridgeError as e:
                raise BridgeError(f"{where}: {e}")
            vhub = vhub_for(hub_name)
            vhub.add_port(port)
            port.start_reading()
            attached.append((vhub, port))
            log.info(
                "virtual hub {hub} bridged to {iface}: its LAN's frames reach the cards (promiscuous mode; "
                "up to {n} LAN MACs learned)", hub=hub_name, iface=interface, n=port.max_macs,
            )
        for hub_name, name in taps:
            try:
                tap = TapPort(name, None, reactor, offload=True, backpressure=True, max_macs=BRIDGE_MAX_MACS,
                              label=f"tap:{name}")
            except TapError as e:
                raise BridgeError(f"--bridge-tap {hub_name}={name}: {e}")
            tap.set_carrier(True)
            vhub = vhub_for(hub_name)
            vhub.add_port(tap)
            tap.start_reading()
            attached.append((vhub, tap))
            log.info(
                "virtual hub {hub} has TAP port {name} ({life}), carrier on: put it into a Linux bridge "
                "(ip link set {name} master BRIDGE)", hub=hub_name, name=name,
                life="persistent: it stays in its bridge across hub restarts" if tap.persistent
                else "made now, gone when the hub stops; 'sevpn nic create' makes one that stays",
            )
    except BaseException:
        detach_bridges(attached)
        raise
    return attached


def detach_bridges(attached: Sequence[Tuple[object, Port]]) -> None:
    """Take bridge ports off their virtual hubs and close them (a persistent TAP stays, without carrier)."""
    for vhub, port in attached:
        vhub.remove_port(port)
        port.close()


def describe_bridges(attached: Sequence[Tuple[object, Port]]) -> List[dict]:
    """The bridge ports for C{sevpn hub status}."""
    return [dict(port.counters(), port=port.name, hub=vhub.name, macs=len(port.macs)) for vhub, port in attached]

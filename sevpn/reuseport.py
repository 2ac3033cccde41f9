"""
One listening port, several hub processes: a C{SO_REUSEPORT} group whose
socket the kernel picks by the card's source address.

With C{--workers N} every worker has its own listening socket on the same
address and port (C{SO_REUSEPORT}); the kernel hands each new connection
to one socket of the group.  By default it hashes the 4-tuple, so a card
that reconnects (a new source port) could land on another worker, one
that does not hold its session, and resumption would fail.  So the group
gets a classic BPF program (C{SO_ATTACH_REUSEPORT_CBPF}) that returns the
socket's index from the source I{address} alone:

 - IPv4 (also an IPv4 card on a dual-stack IPv6 socket: the packet is
   IPv4): the source address as a number, modulo N;
 - IPv6: the four 32-bit words of the source address XORed, modulo N.

The kernel runs it on each SYN with the data pointer past the TCP header;
the network header is reached with negative offsets (C{SKF_NET_OFF}), as
the kernel's own reuseport tests do.  An index at or past the group's
size makes the kernel fall back to its hash (never the case here: the
main process holds every socket of the group for as long as it runs).

A socket's index is the order in which it joined the group (at
C{listen}); L{listening_group} makes the N sockets in order, so socket
I{k} is worker I{k}'s and L{worker_for} tells, in Python, which worker
the kernel picks for an address.  A card that keeps its address keeps its
worker; one that changes it (another network, a NAT that rebinds) lands
where its new address maps and gets a fresh session there.  Cards behind
one NAT address all share a worker.

Pure except L{attach_program} and L{listening_group}, which make sockets.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from dataclasses import dataclass
from typing import List, Sequence, Tuple

# asm-generic/socket.h
SO_ATTACH_REUSEPORT_CBPF = 51
# linux/filter.h: loads at this offset (and above) read the network header.
SKF_NET_OFF = -0x100000

# linux/bpf_common.h: classes, sizes, modes, operations, sources
BPF_LD, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = 0x00, 0x04, 0x05, 0x06, 0x07
BPF_W, BPF_B = 0x00, 0x10
BPF_ABS = 0x20
BPF_RSH, BPF_MOD, BPF_XOR = 0x70, 0x90, 0xA0
BPF_JEQ = 0x10
BPF_K, BPF_X = 0x00, 0x08
BPF_A = 0x10
BPF_TAX = 0x00

#: struct sock_filter: code, jt, jf, k.
INSTRUCTION = struct.Struct("=HBBI")
#: Most workers a group has (and the kernel's limit is far above).
MAX_WORKERS = 1024
#: Twisted's listening backlog, kept for the group's sockets.
BACKLOG = 50

Instruction = Tuple[int, int, int, int]


class ListenError(Exception):
    """A listening group cannot be made; the message names the endpoint."""


# the program ---------------------------------------------------------------------


def _net(offset: int) -> int:
    """C{k} for a load at C{offset} into the network header (as the u32 the kernel takes)."""
    return (SKF_NET_OFF + offset) & 0xFFFFFFFF


def program(workers: int) -> List[Instruction]:
    """
    The classic BPF program that picks one of C{workers} sockets by the
    source address (see the module docstring), as (code, jt, jf, k)::

        ldb [net+0]      ; the version nibble
        rsh #4
        jeq #6, v6       ; IPv6: skip the IPv4 part
        ld  [net+12]     ; IPv4 source address
        mod #N
        ret a
    v6: ld  [net+8]      ; IPv6 source address, word 0
        tax
        ld  [net+12]     ; ^ word 1
        xor x
        tax
        ld  [net+16]     ; ^ word 2
        xor x
        tax
        ld  [net+20]     ; ^ word 3
        xor x
        mod #N
        ret a
    """
    if not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be 1 to {MAX_WORKERS}, not {workers!r}")
    ld_word = BPF_LD | BPF_W | BPF_ABS
    mod = (BPF_ALU | BPF_MOD | BPF_K, 0, 0, workers)
    ret_a = (BPF_RET | BPF_A, 0, 0, 0)
    tax = (BPF_MISC | BPF_TAX, 0, 0, 0)
    xor_x = (BPF_ALU | BPF_XOR | BPF_X, 0, 0, 0)
    ipv4 = [(ld_word, 0, 0, _net(12)), mod, ret_a]
    ipv6 = [
        (ld_word, 0, 0, _net(8)), tax,
        (ld_word, 0, 0, _net(12)), xor_x, tax,
        (ld_word, 0, 0, _net(16)), xor_x, tax,
        (ld_word, 0, 0, _net(20)), xor_x,
        mod, ret_a,
    ]
    head = [
        (BPF_LD | BPF_B | BPF_ABS, 0, 0, _net(0)),
        (BPF_ALU | BPF_RSH | BPF_K, 0, 0, 4),
        (BPF_JMP | BPF_JEQ | BPF_K, len(ipv4), 0, 6),
    ]
    return head + ipv4 + ipv6


def assemble(instructions: Sequence[Instruction]) -> bytes:
    """The program as the kernel reads it: an array of struct sock_filter."""
    return b"".join(INSTRUCTION.pack(*i) for i in instructions)


def worker_for(address: str, workers: int) -> int:
    """
    Which of C{workers} the program picks for a card at C{address} (an IPv4
    or IPv6 address as text; an IPv4-mapped IPv6 address counts as IPv4,
    as its packets are IPv4 on the wire).
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 4:
        return int(ip) % workers
    w0, w1, w2, w3 = struct.unpack("!4I", ip.packed)
    return (w0 ^ w1 ^ w2 ^ w3) % workers


def attach_program(sock: socket.socket, workers: int) -> None:
    """Give C{sock}'s reuseport group the program for C{workers}."""
    import ctypes

    code = assemble(program(workers))
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HP", len(code) // INSTRUCTION.size, ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


# the sockets --------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A TCP endpoint to listen on, from a C{--listen} description."""

    description: str
    family: int
    host: str
    port: int
    backlog: int = BACKLOG


def parse_endpoint(description: str) -> Endpoint:
    """
    C{tcp:PORT[:interface=ADDRESS][:backlog=N]} or the same with C{tcp6};
    other endpoint kinds cannot be shared by workers (L{ListenError}).
    """
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description)]
    kind = parts[0].strip().lower()
    if kind not in ("tcp", "tcp6"):
        raise ListenError(f"--listen {description}: with --workers the hub listens on tcp: or tcp6: endpoints only")
    port = None
    host = "::" if kind == "tcp6" else "0.0.0.0"
    backlog = BACKLOG
    try:
        for part in parts[1:]:
            key, equals, value = part.partition("=")
            if not equals:
                key, value = "port", part
            if key == "port":
                port = int(value)
            elif key == "interface":
                host = value
            elif key == "backlog":
                backlog = int(value)
            else:
                raise ListenError(f"--listen {description}: {key}= is not a TCP listening parameter")
    except ValueError:
        raise ListenError(f"--listen {description}: the port and backlog must be numbers")
    if port is None or not 0 <= port <= 65535:
        raise ListenError(f"--listen {description}: give a port from 0 to 65535")
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        raise ListenError(f"--listen {description}: interface={host} is not an IP address")
    family = socket.AF_INET6 if kind == "tcp6" or address.version == 6 else socket.AF_INET
    if (family == socket.AF_INET6) != (address.version == 6):
        raise ListenError(f"--listen {description}: interface={host} is not an IPv{6 if kind == 'tcp6' else 4} "
                          "address")
    return Endpoint(description, family, host, port, backlog)


def _socket(endpoint: Endpoint, port: int, reuseport: bool, kind: int = socket.SOCK_STREAM) -> socket.socket:
    sock = socket.socket(endpoint.family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((endpoint.host, port))
    except OSError:
        sock.close()
        raise
    return sock


def listening_group(endpoint: Endpoint, workers: int, kind: int = socket.SOCK_STREAM) -> List[socket.socket]:
    """
    C{workers} listening sockets sharing C{endpoint} (non-blocking,
    close-on-exec), socket I{k} at index I{k} of the group, with the
    program attached.  Whoever holds them keeps the group's indices
    stable: a socket that closes leaves a hole the kernel fills with the
    last one.  Raises L{ListenError} with a sentence.

    @param kind: C{SOCK_DGRAM} makes a group of UDP sockets on the same
        terms (a card's datagrams reach the worker its TCP connection
        does, as long as both come from one address).
    """
    where = f"cannot listen on {endpoint.description}"
    # Nobody else may be in the group: a socket of someone else's (the same
    # user's, with SO_REUSEPORT) would take part of our indices.  A socket
    # without SO_REUSEPORT cannot bind where anybody listens.
    try:
        probe = _socket(endpoint, endpoint.port, reuseport=False, kind=kind)
    except OSError as e:
        raise ListenError(f"{where}: {e.strerror}")
    port = probe.getsockname()[1]
    probe.close()
    sockets: List[socket.socket] = []
    try:
        for _ in range(workers):
            sock = _socket(endpoint, port, reuseport=True, kind=kind)
            sockets.append(sock)
            if kind == socket.SOCK_STREAM:
                sock.listen(endpoint.backlog)
        attach_program(sockets[0], workers)
    except OSError as e:
        for sock in sockets:
            sock.close()
        raise ListenError(f"{where}: {e.strerror or e}")
    return sockets
